"""The generalized suffix automaton against brute-force substring search on small random sequences."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from hsd_rag.drafters.suffix_automaton import ROOT, SuffixAutomaton

VOCAB = 3  # a tiny alphabet makes repeats, clones and multi-way continuations frequent
MAX_LEN = 12  # tokens per generated sequence: keeps the brute force instant
EXAMPLES = 150

tokens_st = st.lists(st.integers(0, VOCAB - 1), max_size=MAX_LEN)


# ---- brute force ------------------------------------------------------------------------------------------------


def ends(seqs: list[list[int]], x: tuple[int, ...]):
    """(sequence, end) pairs where x ends (x non-empty)."""
    n = len(x)
    return [(s, e) for s, seq in enumerate(seqs) for e in range(n, len(seq) + 1) if tuple(seq[e - n : e]) == x]


def continuations(seqs: list[list[int]], x: tuple[int, ...]) -> set[int]:
    if not x:
        return {t for seq in seqs for t in seq}
    return {seqs[s][e] for s, e in ends(seqs, x) if e < len(seqs[s])}


def brute_longest(seqs: list[list[int]], stream: list[int]) -> tuple[int, set[int]]:
    for length in range(len(stream), -1, -1):
        nexts = continuations(seqs, tuple(stream[len(stream) - length :]))
        if nexts:
            return length, nexts
    return 0, set()


def substrings(seqs: list[list[int]]) -> set[tuple[int, ...]]:
    return {tuple(seq[i:j]) for seq in seqs for i in range(len(seq)) for j in range(i + 1, len(seq) + 1)}


def check_against_brute(sam: SuffixAutomaton, seqs: list[list[int]], streams: dict[int, list[int]]) -> None:
    """Every substring's state has the brute-force continuations and count; every stream's match is right."""
    for x in substrings(seqs):
        state = sam.walk(x)
        assert state is not None, x
        assert set(sam.transitions(state)) == continuations(seqs, x), x
        assert sam.count(state) == len(ends(seqs, x)), x
    for seq_id, stream in streams.items():
        state, length = sam.longest_match(seq_id)
        want_length, want_next = brute_longest(seqs, stream)
        assert length == want_length
        assert set(sam.transitions(state)) == want_next
        assert sam.sequence_length(seq_id) == len(stream)


# ---- hand cases -------------------------------------------------------------------------------------------------


def test_match_inside_document_with_two_continuations():
    # "1 2" occurs twice in the document, followed by 3 and by 4; the stream ends in "5 1 2".
    sam = SuffixAutomaton()
    sam.add_sequence([1, 2, 3, 1, 2, 4])
    stream = sam.add_sequence([5, 1, 2])
    state, length = sam.longest_match(stream)
    assert length == 2
    assert set(sam.transitions(state)) == {3, 4}
    assert sam.count(state) == 3  # twice in the document, once at the end of the stream
    assert [sam.count(sam.transitions(state)[t]) for t in (3, 4)] == [1, 1]


def test_occurrence_only_at_a_sequence_end_has_no_continuation():
    # "8" occurs only at the document's end and the stream's end: back off to the empty context (the root).
    sam = SuffixAutomaton()
    sam.add_sequence([7, 8])
    stream = sam.add_sequence([8])
    assert sam.longest_match(stream) == (ROOT, 0)
    assert set(sam.transitions(ROOT)) == {7, 8}


def test_stream_matches_its_own_past():
    # The answer repeats itself: "1" was followed by 2 earlier in the stream.
    sam = SuffixAutomaton()
    stream = sam.add_sequence([1, 2, 1])
    state, length = sam.longest_match(stream)
    assert (length, set(sam.transitions(state))) == (1, {2})


def test_existing_transition_is_cloned():
    # The document makes "2" and "1 2" one state; the stream's "2" (no 1 before it) must split it.
    sam = SuffixAutomaton()
    sam.add_sequence([1, 2, 3])
    stream = sam.add_sequence([2])
    assert sam.count(sam.walk([2])) == 2
    assert sam.count(sam.walk([1, 2])) == 1
    sam.append(stream, 3)
    assert sam.count(sam.walk([2, 3])) == 2
    assert sam.count(sam.walk([1, 2, 3])) == 1


def test_interleaved_streams_and_late_document():
    # Two streams grow alternately; a document arriving in between is visible to both.
    sam = SuffixAutomaton()
    a, b = sam.add_sequence([1]), sam.add_sequence([2])
    sam.append(a, 2)
    sam.append(b, 1)
    sam.add_sequence([2, 1, 2, 2])
    sam.append(a, 1)
    seqs = [[1, 2, 1], [2, 1], [2, 1, 2, 2]]
    check_against_brute(sam, seqs, {a: seqs[0], b: seqs[1]})


def test_absent_string_walks_to_none():
    # A string that occurs nowhere has no state.
    sam = SuffixAutomaton()
    sam.add_sequence([1, 2])
    assert sam.walk([2, 1]) is None


# ---- property tests ---------------------------------------------------------------------------------------------

op_st = st.one_of(
    st.tuples(st.just("doc"), tokens_st),
    st.tuples(st.just("append"), st.integers(0, 1), st.integers(0, VOCAB - 1)),
)


@settings(max_examples=EXAMPLES, deadline=None)
@given(prompts=st.tuples(tokens_st, tokens_st), ops=st.lists(op_st, max_size=8))
def test_interleaved_operations_match_brute_force(prompts, ops):
    sam = SuffixAutomaton()
    seqs: list[list[int]] = []
    streams = {}
    for prompt in prompts:
        streams[sam.add_sequence(prompt)] = len(seqs)
        seqs.append(list(prompt))
    stream_ids = list(streams)
    for op in ops:
        if op[0] == "doc":
            assert sam.add_sequence(op[1]) == len(seqs)
            seqs.append(list(op[1]))
        else:
            seq_id = stream_ids[op[1]]
            sam.append(seq_id, op[2])
            seqs[streams[seq_id]].append(op[2])
    check_against_brute(sam, seqs, {seq_id: seqs[i] for seq_id, i in streams.items()})


@settings(max_examples=EXAMPLES, deadline=None)
@given(docs=st.lists(tokens_st, max_size=3), prompt=tokens_st,
       appended=st.lists(st.integers(0, VOCAB - 1), max_size=MAX_LEN))
def test_online_counts_and_rankings_are_exact_within_the_walk_limit(docs, prompt, appended):
    # wide_state=0 memoizes every ranking, so the incremental memo update is exercised on every append.
    sam = SuffixAutomaton(wide_state=0, top_cache_size=2)
    for doc in docs:
        sam.add_sequence(doc)
    stream = sam.add_sequence(prompt)
    sam.recount()
    seqs = [*map(list, docs), list(prompt)]
    for i, token in enumerate(appended):
        sam.append(stream, token)
        seqs[-1].append(token)
        if i % 2 == 0:  # rank some states mid-stream so later appends must update their memos
            state, _ = sam.longest_match(stream)
            sam.top_transitions(state, 2)
    assert not sam.needs_recount  # the counts below are the online ones
    check_against_brute(sam, seqs, {stream: seqs[-1]})
    for x in [(), *substrings(seqs)]:
        state = sam.walk(x)
        ranked, total = sam.top_transitions(state, 2)
        want = Counter({t: len(ends(seqs, (*x, t))) for t in continuations(seqs, x)})
        assert total == sum(want.values())
        assert [c for _, _, c in ranked] == sorted(want.values(), reverse=True)[:2]
        assert all(want[t] == c and sam.transitions(state)[t] == child for t, child, c in ranked)


@settings(max_examples=EXAMPLES, deadline=None)
@given(doc=tokens_st, prompt=tokens_st, appended=st.lists(st.integers(0, VOCAB - 1), max_size=MAX_LEN))
def test_capped_online_counts_lag_by_at_most_the_appended_tokens(doc, prompt, appended):
    sam = SuffixAutomaton(count_walk_limit=1)  # only the new end state is updated online
    sam.add_sequence(doc)
    stream = sam.add_sequence(prompt)
    sam.recount()
    sam.extend(stream, appended)
    seqs = [doc, [*prompt, *appended]]
    for x in substrings(seqs):
        lag = len(ends(seqs, x)) - sam.count(sam.walk(x))
        assert 0 <= lag <= len(appended)
    sam.recount()
    check_against_brute(sam, seqs, {stream: seqs[-1]})
