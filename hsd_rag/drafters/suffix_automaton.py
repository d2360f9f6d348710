"""A generalized suffix automaton over integer token sequences, extended online.

Why an automaton: one structure indexes every substring of the retrieved documents, the prompt and the answer
generated so far, and answers "longest suffix of the answer seen before, and what followed it" in time that does
not depend on how much is indexed. Sequences are independent (each has its own *last* state) and may be
extended interleaved in any order: documents are added whole, the prompt+answer stream one token at a time.

States follow the textbook construction (state 0 is the root, the empty string). A state is a class of
substrings sharing the same end positions; `length` is its longest member and the suffix link points to the
class of the longest suffix outside it. Following transition `a` from the state of `w` gives the state of `w·a`.

Occurrence counts (|endpos|, how many (sequence, position) pairs a substring ends at) are
* exact after `recount()` (a bulk pass over states in decreasing length; `count` runs it lazily after
  `add_sequence`), and
* kept approximately up to date by `append`/`extend`: each new position adds 1 to the new last state and its
  suffix-link ancestors, but only `count_walk_limit` of them. Ancestors further up (the shortest contexts, which
  already have the largest counts) miss the increment, so their counts lag by at most the number of tokens
  appended since the last recount. A state cloned during an append starts from its source's count, which keeps
  cloning exact. With streams shorter than the walk limit the online counts are exact.

Ranking continuations by frequency must not cost a scan of a frequent token's thousands of continuations per
query, so states with more than `wide_state` continuations memoize their `top_cache_size` most frequent ones
and the sum of all their counts. The memo is kept current on append: every state whose continuation counts or
transitions an append changes holds a suffix of the stream before the append (a continuation `y·a` of `y` that
gains an occurrence is a suffix of the new stream), so walking that suffix-link path (`count_walk_limit` steps,
the same approximation as the counts) and re-ranking the appended token's continuation keeps the top list and
the sum exact.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType

ROOT = 0  # the state of the empty string
NO_LINK = -1  # the root's suffix link
# Suffix-link steps a query may take before giving up: it bounds the per-query cost independently of the
# indexed length (in natural text the first or second step already has a continuation).
MATCH_WALK_LIMIT = 64
# Suffix-link ancestors of a new end position whose occurrence count an append updates (see module docstring).
COUNT_WALK_LIMIT = 64
WIDE_STATE = 32  # continuations above which a state's frequency ranking is memoized instead of scanned
TOP_CACHE_SIZE = 8  # continuations memoized per wide state (requests for more fall back to a scan)


class SuffixAutomaton:
    """Generalized suffix automaton with per-sequence last states and occurrence counts."""

    def __init__(
        self,
        match_walk_limit: int = MATCH_WALK_LIMIT,
        count_walk_limit: int = COUNT_WALK_LIMIT,
        wide_state: int = WIDE_STATE,
        top_cache_size: int = TOP_CACHE_SIZE,
    ):
        if match_walk_limit < 1 or count_walk_limit < 1:
            raise ValueError("walk limits must be >= 1")
        if wide_state < 0 or top_cache_size < 1:
            raise ValueError("need wide_state >= 0 and top_cache_size >= 1")
        self.match_walk_limit = match_walk_limit
        self.count_walk_limit = count_walk_limit
        self.wide_state = wide_state
        self.top_cache_size = top_cache_size
        # Per state ([num_states] each); plain lists because attribute-free list indexing is the fast path.
        self._next: list[dict[int, int]] = [{}]  # token -> state
        self._link: list[int] = [NO_LINK]  # suffix link
        self._len: list[int] = [0]  # tokens in the longest member of the class
        self._base: list[int] = [0]  # end positions whose whole sequence prefix is this state's longest member
        self._count: list[int] = [0]  # |endpos|: sum of _base over the suffix-link subtree
        # Per sequence ([num_sequences] each).
        self._last: list[int] = []  # state of the whole sequence so far
        self._seq_len: list[int] = []  # tokens in the sequence
        self._dirty = False  # counts stale since an add_sequence; recount() before reading them
        # Wide state -> [sum of continuation counts, [(token, next state)] most frequent first, top_cache_size].
        self._top: dict[int, list] = {}

    # ---- building ---------------------------------------------------------------------------------------------

    def add_sequence(self, tokens: Iterable[int] = ()) -> int:
        """Index a new sequence (a document, or the start of a stream); returns its id for `append`/queries.

        Counts are not maintained token by token here; the next `count` (or an explicit `recount`) recomputes
        them exactly in one pass.
        """
        seq_id = len(self._last)
        self._last.append(ROOT)
        self._seq_len.append(0)
        self._dirty = True
        last = ROOT
        n = 0
        for token in tokens:
            last = self._extend(last, int(token))
            n += 1
        self._last[seq_id] = last
        self._seq_len[seq_id] = n
        return seq_id

    def append(self, seq_id: int, token: int) -> None:
        """Extend one sequence by one token (counts updated approximately, see the module docstring)."""
        token = int(token)
        previous = self._last[seq_id]
        last = self._extend(previous, token)
        self._last[seq_id] = last
        self._seq_len[seq_id] += 1
        if self._dirty:
            return  # the pending recount fixes counts and memos
        count, link = self._count, self._link
        state = last
        for _ in range(self.count_walk_limit):
            if state == NO_LINK:
                break
            count[state] += 1
            state = link[state]
        if self._top:
            state = previous
            for _ in range(self.count_walk_limit):
                if state == NO_LINK:
                    break
                memo = self._top.get(state)
                if memo is not None:
                    self._rerank(memo, token, self._next[state][token])
                state = link[state]

    def _rerank(self, memo: list, token: int, child: int) -> None:
        """Memo update after `token`'s continuation (now `child`, maybe a fresh clone) gained an occurrence."""
        count = self._count
        memo[0] += 1
        ranked = [item for item in memo[1] if item[0] != token]
        ranked.append((token, child))
        ranked.sort(key=lambda item: count[item[1]], reverse=True)
        memo[1] = ranked[: self.top_cache_size]

    def extend(self, seq_id: int, tokens: Iterable[int]) -> None:
        for token in tokens:
            self.append(seq_id, token)

    def _new_state(self, length: int, link: int, transitions: dict[int, int], count: int) -> int:
        self._next.append(transitions)
        self._link.append(link)
        self._len.append(length)
        self._base.append(0)
        self._count.append(count)
        return len(self._len) - 1

    def _clone(self, p: int, token: int, q: int) -> int:
        """Split `q` so the strings of length <= len(p) + 1 get their own state; redirect p's chain to it."""
        nxt = self._next
        clone = self._new_state(self._len[p] + 1, self._link[q], dict(nxt[q]), self._count[q])
        self._link[q] = clone
        while p != NO_LINK and nxt[p].get(token) == q:
            nxt[p][token] = clone
            p = self._link[p]
        return clone

    def _extend(self, last: int, token: int) -> int:
        """The state of (sequence ending at `last`) + `token`, creating or splitting states as needed."""
        nxt, length = self._next, self._len
        q = nxt[last].get(token)
        if q is not None:
            # Generalized case: the extended string already occurs elsewhere. It must be the longest member of
            # its state (a sequence prefix cannot be extended to the left within its own occurrence), so split
            # when the existing state is longer.
            new_last = q if length[q] == length[last] + 1 else self._clone(last, token, q)
        else:
            cur = self._new_state(length[last] + 1, ROOT, {}, 0)
            p = last
            while p != NO_LINK and token not in nxt[p]:
                nxt[p][token] = cur
                p = self._link[p]
            if p != NO_LINK:
                q = nxt[p][token]
                self._link[cur] = q if length[p] + 1 == length[q] else self._clone(p, token, q)
            new_last = cur
        self._base[new_last] += 1
        return new_last

    def recount(self) -> None:
        """Exact |endpos| for every state: children in the suffix-link tree are longer, so sum longest first."""
        count = list(self._base)
        link = self._link
        for state in sorted(range(1, len(count)), key=self._len.__getitem__, reverse=True):
            count[link[state]] += count[state]
        self._count = count
        self._dirty = False
        self._top.clear()

    # ---- queries ----------------------------------------------------------------------------------------------

    def longest_match(self, seq_id: int) -> tuple[int, int]:
        """(state, length) of the longest suffix of a sequence that also occurs followed by some token.

        The sequence's own occurrence at its end has no continuation, so requiring outgoing transitions excludes
        it automatically. Returns (ROOT, 0) when nothing matches within `match_walk_limit` suffix-link steps.
        """
        nxt, link = self._next, self._link
        state = self._last[seq_id]
        for _ in range(self.match_walk_limit):
            if nxt[state]:
                return state, self._len[state]
            state = link[state]
            if state == NO_LINK:
                break
        return ROOT, 0

    def transitions(self, state: int) -> Mapping[int, int]:
        """Read-only token -> state map: the continuations seen after this state's strings."""
        return MappingProxyType(self._next[state])

    def count(self, state: int) -> int:
        """How many (sequence, end position) pairs the state's strings occur at."""
        if self._dirty:
            self.recount()
        return self._count[state]

    def top_transitions(self, state: int, k: int) -> tuple[list[tuple[int, int, int]], int]:
        """The `k` most frequent continuations as (token, next state, count), most frequent first, and the sum
        of the counts of all continuations (the denominator of a frequency share)."""
        if self._dirty:
            self.recount()
        count = self._count
        transitions = self._next[state]
        memo = self._top.get(state)
        if memo is None:
            if k > self.top_cache_size or len(transitions) <= self.wide_state:
                best, total = self._scan(transitions, k)
                return [(token, child, count[child]) for token, child in best], total
            best, total = self._scan(transitions, self.top_cache_size)
            memo = self._top[state] = [total, best]
        elif k > self.top_cache_size:
            best, total = self._scan(transitions, k)
            return [(token, child, count[child]) for token, child in best], total
        return [(token, child, count[child]) for token, child in memo[1][:k]], memo[0]

    def _scan(self, transitions: dict[int, int], k: int) -> tuple[list[tuple[int, int]], int]:
        """The k most frequent (token, next state) pairs and the sum of all continuation counts."""
        count = self._count
        total = 0
        for child in transitions.values():
            total += count[child]
        return heapq.nlargest(k, transitions.items(), key=lambda item: count[item[1]]), total

    def length(self, state: int) -> int:
        """Tokens in the longest string of the state."""
        return self._len[state]

    def link(self, state: int) -> int:
        """Suffix link (NO_LINK for the root)."""
        return self._link[state]

    def last_state(self, seq_id: int) -> int:
        return self._last[seq_id]

    def sequence_length(self, seq_id: int) -> int:
        return self._seq_len[seq_id]

    def walk(self, tokens: Sequence[int]) -> int | None:
        """The state of `tokens` read from the root, or None if it occurs nowhere."""
        state = ROOT
        for token in tokens:
            state = self._next[state].get(int(token))
            if state is None:
                return None
        return state

    @property
    def needs_recount(self) -> bool:
        """True between an `add_sequence` and the next `recount` (the next `count` will run it)."""
        return self._dirty

    @property
    def num_states(self) -> int:
        return len(self._len)

    @property
    def num_sequences(self) -> int:
        return len(self._last)
