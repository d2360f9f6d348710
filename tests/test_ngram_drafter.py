"""NgramDrafter: tree shape, scores, copying from documents, calibration and per-request isolation."""

from __future__ import annotations

import pytest

from hsd_rag.bench.ngram_index import measure_query_time
from hsd_rag.drafters.base import DraftContext, Drafter, StepOutcome
from hsd_rag.drafters.ngram import NgramDrafter
from hsd_rag.drafters.ngram_calibration import NgramCalibrator
from hsd_rag.tree import SOURCE_EAGLE, SOURCE_NGRAM, TokenTree

DOC = list(range(100, 130))  # distinct tokens: every phrase of it has exactly one continuation
NOISE = [1, 2, 3, 1, 3, 2, 2, 1, 1, 3]  # a small alphabet, so contexts have several continuations
BIG_BUDGET = 64


def context(tokens: list[int], budget: int, prompt_length: int | None = None) -> DraftContext:
    return DraftContext(token_ids=list(tokens), prompt_length=prompt_length or len(tokens), budget=budget)


def started(prompt: list[int], documents: list[list[int]], **kwargs) -> NgramDrafter:
    drafter = NgramDrafter(**kwargs)
    drafter.start(prompt, documents)
    return drafter


def first_child_chain(tree: TokenTree) -> list[int]:
    """Tokens along the best-scored child at each level."""
    out, node = [], 0
    while tree.children(node):
        node = max(tree.children(node), key=lambda child: tree.scores[child])
        out.append(tree.tokens[node])
    return out


def step(drafter: NgramDrafter, tokens: list[int], tree: TokenTree, accepted: list[int], bonus: int) -> None:
    """Report an outcome and grow `tokens` exactly as the decode loop does."""
    new_tokens = [tree.tokens[node] for node in accepted[1:]] + [bonus]
    drafter.observe(StepOutcome(tree=tree, accepted_nodes=accepted, new_tokens=new_tokens))
    tokens.extend(new_tokens)


def test_implements_the_protocol():
    assert isinstance(NgramDrafter(), Drafter)
    assert NgramDrafter.name == "ngram"


@pytest.mark.parametrize("budget", [0, 1, 3, 16, BIG_BUDGET])
def test_tree_rooted_within_budget_and_depth_with_monotone_scores(budget):
    prompt = [*NOISE, *NOISE[:4]]
    max_depth = 5
    drafter = started(prompt, [NOISE, NOISE[::-1]], max_depth=max_depth)
    tree = drafter.propose(context(prompt, budget))
    assert tree.tokens[0] == prompt[-1]
    assert tree.num_drafts <= budget
    assert max(tree.depths) <= max_depth
    assert all(tree.parents[i] < i for i in range(1, len(tree)))
    assert all(tree.sources[i] == SOURCE_NGRAM for i in range(1, len(tree)))
    assert all(0.0 < tree.scores[i] <= tree.scores[tree.parents[i]] for i in range(1, len(tree)))
    if budget >= BIG_BUDGET:
        assert len(tree.children(0)) > 1  # several distinct continuations
    assert tree.truncate(budget).num_drafts == tree.num_drafts  # already within budget


def test_copying_a_document_phrase_drafts_its_continuation():
    prompt = [7, 8, *DOC[3:6]]  # the question quotes the document
    drafter = started(prompt, [DOC], max_depth=6)
    tokens = list(prompt)
    tree = drafter.propose(context(tokens, 16))
    assert first_child_chain(tree) == DOC[6:12]  # depth 1..6
    # Accept two drafts, the target adds a third token of its own (the document's), then drafts resume there.
    accepted = [0, tree.children(0)[0]]
    accepted.append(tree.children(accepted[-1])[0])
    step(drafter, tokens, tree, accepted, bonus=DOC[8])
    tree = drafter.propose(context(tokens, 16, len(prompt)))
    assert tree.tokens[0] == DOC[8]
    assert first_child_chain(tree) == DOC[9:15]


def test_a_repetition_is_drafted_past_the_end_of_its_latest_period():
    """A looping answer ("A B C A B C A B C"): the longest match ends where the text ends, one period on; the
    draft continues from the shorter suffix that occurs earlier, as deep as max_depth allows."""
    period = [40, 41, 42, 43, 44]
    prompt = [7, 8, 9] + period * 3
    drafter = started(prompt, [], max_depth=12)
    chain = first_child_chain(drafter.propose(context(prompt, BIG_BUDGET)))
    assert chain == (period * 3)[:12]
    shallow = started(prompt, [], max_depth=4, max_depth_long_match=4)
    assert first_child_chain(shallow.propose(context(prompt, BIG_BUDGET))) == period[:4]


def test_a_long_match_may_draft_as_deep_as_the_match():
    """Speculation sized by match length (suffix decoding's rule): past max_depth only after a longer match."""
    doc = list(range(200, 260))
    long_prompt = [7, *doc[:20]]  # the answer so far copies 20 tokens of the document
    tree = started(long_prompt, [doc], max_depth=6, max_depth_long_match=14).propose(context(long_prompt, 64))
    assert first_child_chain(tree) == doc[20:34]  # 14 deep: min(max_depth_long_match, match of 20)
    mid_prompt = [7, *doc[:9]]
    tree = started(mid_prompt, [doc], max_depth=6, max_depth_long_match=14).propose(context(mid_prompt, 64))
    assert first_child_chain(tree) == doc[9:18]  # as deep as the 9-token match
    short_prompt = [7, *doc[:3]]
    tree = started(short_prompt, [doc], max_depth=6, max_depth_long_match=14).propose(context(short_prompt, 64))
    assert first_child_chain(tree) == doc[3:9]  # a short match keeps max_depth


def test_longer_match_ranks_first_and_shorter_matches_add_alternatives():
    # "1 2" was followed by 3; "2" alone also by 5 and 6: the root offers 3 first, then 5 and 6 below it.
    drafter = started([9, 1, 2], [[1, 2, 3], [4, 2, 5], [4, 2, 6]])
    tree = drafter.propose(context([9, 1, 2], 16))
    children = {tree.tokens[c]: tree.scores[c] for c in tree.children(0)}
    assert set(children) == {3, 5, 6}
    assert children[3] > max(children[5], children[6])


def test_min_match_filters_short_contexts():
    # Only the root token "2" matches: proposals with min_match=1, none with min_match=2.
    prompt, docs = [9, 2], [[4, 2, 5]]
    assert started(prompt, docs, min_match=1).propose(context(prompt, 16)).num_drafts > 0
    assert started(prompt, docs, min_match=2).propose(context(prompt, 16)).num_drafts == 0


def test_propose_does_not_mutate_the_index():
    prompt = [*NOISE, 1, 2]
    drafter = started(prompt, [NOISE])
    states = drafter.automaton.num_states
    first = drafter.propose(context(prompt, 16))
    second = drafter.propose(context(prompt, 16))
    assert drafter.automaton.num_states == states
    assert (first.tokens, first.parents, first.scores) == (second.tokens, second.parents, second.scores)


def test_out_of_sync_context_is_refused():
    drafter = started([1, 2, 3], [DOC])
    with pytest.raises(RuntimeError, match="out of sync"):
        drafter.propose(context([1, 2, 3, 4], 16))


def test_requests_do_not_share_state():
    drafter = started([5, *DOC[:3]], [DOC])
    tokens = [5, *DOC[:3]]
    tree = drafter.propose(context(tokens, 16))
    assert tree.num_drafts > 0
    step(drafter, tokens, tree, [0], bonus=77)  # a rejection is recorded
    assert drafter.calibrator.observations > 0
    drafter.close()
    drafter.start([5, *DOC[:3]], [])  # same prompt, no documents
    assert drafter.calibrator.observations == 0
    assert drafter.propose(context([5, *DOC[:3]], 16)).num_drafts == 0


def test_outcomes_move_the_scores_of_their_bucket():
    prompt = [9, *DOC[:4]]
    drafter = started(prompt, [DOC], max_depth=1)
    calibrator = drafter.calibrator
    bucket = calibrator.bucket(4, 1.0)  # the sole continuation DOC[4] of a 4-token match
    tokens = list(prompt)
    tree = drafter.propose(context(tokens, 1))
    assert (tree.tokens[1], tree.scores[1]) == (DOC[4], calibrator.estimate(bucket))
    prior = calibrator.estimate(bucket)
    step(drafter, tokens, tree, [0], bonus=DOC[0])  # DOC[4] rejected
    assert calibrator.estimate(bucket) < prior
    tree = drafter.propose(context(tokens, 1))  # the stream ends in DOC[0]: a 1-token match now
    step(drafter, tokens, tree, [0, 1], bonus=DOC[2])  # DOC[1] accepted
    assert calibrator.estimate(calibrator.bucket(1, 1.0)) > NgramCalibrator().estimate(calibrator.bucket(1, 1.0))


def test_calibration_survives_fusion_with_other_drafters():
    # A merged tree renumbers nodes; n-gram nodes are matched by token path, EAGLE-only nodes are ignored.
    prompt = [9, *DOC[:4]]
    drafter = started(prompt, [DOC], max_depth=2)
    tokens = list(prompt)
    ngram_tree = drafter.propose(context(tokens, 2))
    fused = TokenTree.root(prompt[-1])
    fused.add(0, 555, 0.9, SOURCE_EAGLE)
    fused.merge(ngram_tree)
    first = fused.children(0)[1]
    accepted = [0, first]  # DOC[4] accepted, DOC[5] rejected (the bonus differs)
    step(drafter, tokens, fused, accepted, bonus=777)
    assert drafter.calibrator.observations == 2


def test_calibrator_priors_favour_long_matches_and_dominant_branches():
    calibrator = NgramCalibrator()
    by_length = [calibrator.estimate(calibrator.bucket(length, 1.0)) for length in (1, 2, 4, 8, 16, 32)]
    by_share = [calibrator.estimate(calibrator.bucket(4, share)) for share in (0.1, 0.3, 0.5, 0.9, 1.0)]
    assert by_length == sorted(by_length) and len(set(by_length)) == len(by_length)
    assert by_share == sorted(by_share) and len(set(by_share)) == len(by_share)
    assert all(0.0 < p < 1.0 for p in by_length + by_share)


def test_index_benchmark_runs():
    result = measure_query_time(indexed_tokens=3_000, queries=20)
    assert {"mean_ms", "p95_ms", "max_ms", "num_states", "queries", "mean_drafts"} <= set(result)
    assert result["queries"] == 20
    assert 0.0 < result["mean_ms"] <= result["max_ms"]
    assert 0 < result["mean_drafts"] <= result["budget"]
