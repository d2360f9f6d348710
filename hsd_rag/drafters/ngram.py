"""NgramDrafter: drafts continuations of the answer copied from what the request has already seen.

Why: answers in RAG pipelines copy spans of the retrieved documents and the prompt (names, numbers, quoted
sentences) and repeat themselves. A suffix automaton over the documents and the prompt+answer stream finds the
longest suffix of the stream seen before; what followed it there is the draft. Branches are scored with an
online-calibrated acceptance probability so the tree can be truncated (or fused with other drafters) by score.

Stream invariant: the stream indexed for a request is exactly `DraftContext.token_ids` at every step. `start`
indexes the whole prompt (its last token is the first pending root) and `observe` appends
`StepOutcome.new_tokens` (accepted drafts then the bonus token, which is the next root). So the pending root is
always already in the index, and the query "longest suffix of the stream" includes it.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Sequence

from hsd_rag.drafters.base import DraftContext, StepOutcome
from hsd_rag.drafters.ngram_calibration import NgramCalibrator
from hsd_rag.drafters.suffix_automaton import MATCH_WALK_LIMIT, SuffixAutomaton
from hsd_rag.tree import SOURCE_NGRAM, TokenTree

# Shortest matched suffix (tokens, root included) that may propose anything. 1 = the pending token alone.
# A one-token context is the common case at the start of a copied span in BPE text (the first sub-word of a
# rare name already pins the rest of it), and the calibrator gives ambiguous one-token contexts low scores so
# they lose to better drafts under the budget; 2 would miss every copy whose entry point is a single token.
MIN_MATCH = 1
MAX_DEPTH = 10  # deepest draft (tokens after the root); copies rarely stay accepted longer per step
MAX_BRANCH = 4  # continuations considered per node, most frequent first
# Shorter suffix matches whose extra continuations are also offered at the root (alternatives the longest
# match never saw); 0 = the longest match only.
MAX_BACKOFF = 2


class NgramDrafter:
    """Drafter over a per-request suffix automaton of documents + prompt + answer (see module docstring)."""

    name = "ngram"

    def __init__(
        self,
        min_match: int = MIN_MATCH,
        max_depth: int = MAX_DEPTH,
        max_branch: int = MAX_BRANCH,
        max_backoff: int = MAX_BACKOFF,
        match_walk_limit: int = MATCH_WALK_LIMIT,
        calibrator_factory: Callable[[], NgramCalibrator] = NgramCalibrator,
    ):
        if min_match < 1 or max_depth < 0 or max_branch < 1 or max_backoff < 0:
            raise ValueError("need min_match >= 1, max_depth >= 0, max_branch >= 1, max_backoff >= 0")
        self.min_match = min_match
        self.max_depth = max_depth
        self.max_branch = max_branch
        self.max_backoff = max_backoff
        self.match_walk_limit = match_walk_limit
        self.calibrator_factory = calibrator_factory
        self._reset()

    def _reset(self) -> None:
        self.automaton: SuffixAutomaton | None = None
        self.calibrator: NgramCalibrator | None = None
        self._stream = -1  # sequence id of prompt + answer in the automaton
        self._stream_length = 0  # tokens in the stream
        self._stream_tail = -1  # last stream token (the pending root)
        self._proposed_root = -1  # root token of the last proposal
        self._proposed: dict[tuple[int, ...], int] = {}  # draft token path below the root -> calibrator bucket

    # ---- Drafter protocol -------------------------------------------------------------------------------------

    def start(self, prompt_ids: Sequence[int], documents: Sequence[Sequence[int]]) -> None:
        """Fresh index and calibrator: nothing of an earlier request survives."""
        self._reset()
        if len(prompt_ids) == 0:
            raise ValueError("the prompt must hold at least one token (the first pending root)")
        automaton = SuffixAutomaton(match_walk_limit=self.match_walk_limit)
        for document in documents:
            automaton.add_sequence(document)
        self._stream = automaton.add_sequence(prompt_ids)
        automaton.recount()  # exact counts now, so proposals never trigger the bulk pass
        self.automaton = automaton
        self.calibrator = self.calibrator_factory()
        self._stream_length = len(prompt_ids)
        self._stream_tail = int(prompt_ids[-1])

    def propose(self, context: DraftContext) -> TokenTree:
        """Best-first tree of continuations of the longest match, at most `budget` drafts, `max_depth` deep.

        A node's score is its parent's times the calibrated conditional acceptance of its bucket, so scores
        never increase along a path and best-first order is the order `TokenTree.truncate` keeps. The index is
        only read (at most the automaton's frequency-ranking memo gets filled).
        """
        automaton, calibrator = self.automaton, self.calibrator
        if automaton is None or calibrator is None:
            raise RuntimeError("NgramDrafter.propose called before start")
        self._check_synced(context.token_ids)
        root = int(context.token_ids[-1])
        tree = TokenTree.root(root)
        self._proposed_root = root
        self._proposed = proposed = {}
        if context.budget <= 0 or self.max_depth <= 0:
            return tree

        counter = itertools.count()  # heap tie-break: earlier pushes (more frequent, shallower) first
        # Heap entries: (-score, tie, parent node, token, automaton state, context length, depth, bucket, path).
        heap: list[tuple[float, int, int, int, int, int, int, int, tuple[int, ...]]] = []

        def push_children(node: int, score: float, state: int, context_length: int, depth: int,
                          path: tuple[int, ...], skip: set[int] | None = None) -> None:
            children, total = automaton.top_transitions(state, self.max_branch)
            for token, child, count in children:
                if skip is not None:
                    if token in skip:
                        continue
                    skip.add(token)
                bucket = calibrator.bucket(context_length, count / total)
                child_score = score * calibrator.estimate(bucket)
                heapq.heappush(heap, (-child_score, next(counter), node, token, child, context_length + 1,
                                      depth + 1, bucket, path + (token,)))

        # Root: the longest match first, then shorter suffix matches for continuations it never saw (among
        # their `max_branch` most frequent).
        state, length = automaton.longest_match(self._stream)
        seen: set[int] = set()
        for _ in range(self.max_backoff + 1):
            if length < self.min_match:
                break
            push_children(0, 1.0, state, length, 0, (), seen)
            state = automaton.link(state)
            length = automaton.length(state)

        while heap and tree.num_drafts < context.budget:
            neg_score, _, parent, token, state, context_length, depth, bucket, path = heapq.heappop(heap)
            node = tree.add(parent, token, -neg_score, SOURCE_NGRAM)
            proposed[path] = bucket
            if depth < self.max_depth:
                push_children(node, -neg_score, state, context_length, depth, path)
        return tree

    def observe(self, outcome: StepOutcome) -> None:
        """Calibrate on the verified n-gram nodes, then append the step's tokens to the stream.

        A verified n-gram node counts once it was decided, i.e. its parent was accepted: accepted if it is on
        the accepted path, rejected otherwise. Nodes are matched to the proposal by token path, so a tree that
        was truncated or fused with other drafters (renumbered nodes) still calibrates correctly.
        """
        automaton, calibrator = self.automaton, self.calibrator
        if automaton is None or calibrator is None:
            raise RuntimeError("NgramDrafter.observe called before start")
        tree = outcome.tree
        if self._proposed and outcome.accepted_nodes and tree.tokens[0] == self._proposed_root:
            accepted = outcome.accepted_nodes
            accepted_set = set(accepted)
            paths: dict[int, tuple[int, ...]] = {accepted[0]: ()}  # accepted node -> token path below root
            for node in accepted[1:]:
                paths[node] = paths[tree.parents[node]] + (tree.tokens[node],)
            for node in range(1, len(tree)):
                parent = tree.parents[node]
                if parent in accepted_set and tree.sources[node] & SOURCE_NGRAM:
                    bucket = self._proposed.get(paths[parent] + (tree.tokens[node],))
                    if bucket is not None:
                        calibrator.record(bucket, node in accepted_set)
        self._proposed = {}
        new_tokens = [int(token) for token in outcome.new_tokens]
        automaton.extend(self._stream, new_tokens)
        if new_tokens:
            self._stream_length += len(new_tokens)
            self._stream_tail = new_tokens[-1]

    def close(self) -> None:
        self._reset()

    # ---- helpers ----------------------------------------------------------------------------------------------

    def _check_synced(self, token_ids: Sequence[int]) -> None:
        """The decode loop must feed back every emitted token: the stream is `token_ids` (cheap O(1) check)."""
        if len(token_ids) != self._stream_length or int(token_ids[-1]) != self._stream_tail:
            raise RuntimeError(
                f"NgramDrafter out of sync: context has {len(token_ids)} tokens ending in {int(token_ids[-1])}, "
                f"the indexed stream {self._stream_length} ending in {self._stream_tail}; observe() must get "
                "every step's new_tokens (accepted drafts then the bonus token)"
            )
