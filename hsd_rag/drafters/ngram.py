"""NgramDrafter: drafts continuations of the answer copied from what the request has already seen.

Why: answers in RAG pipelines copy spans of the retrieved documents and the prompt (names, numbers, quoted
sentences) and repeat themselves. A suffix automaton over the documents and the prompt+answer stream finds the
longest suffix of the stream seen before; what followed it there is the draft. Branches are scored with an
online-calibrated acceptance probability so the tree can be truncated (or fused with other drafters) by score.

Earlier answers (answer_history.py), when the decoder keeps them, are a second index: the longest suffix of the
stream found there adds its continuations too, labelled SOURCE_HISTORY and calibrated on their own, so the report
can tell what they bring; their calibration is learned across the history's requests (AnswerHistory.calibrator).

Stream invariant: the stream indexed for a request is exactly `DraftContext.token_ids` at every step. `start`
indexes the whole prompt (its last token is the first pending root) and `observe` appends
`StepOutcome.new_tokens` (accepted drafts then the bonus token, which is the next root). So the pending root is
always already in the index, and the query "longest suffix of the stream" includes it.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from hsd_rag.drafters.answer_history import AnswerHistory, longest_suffix_match
from hsd_rag.drafters.base import DraftContext, StepOutcome, record_outcomes
from hsd_rag.drafters.ngram_calibration import NgramCalibrator
from hsd_rag.drafters.suffix_automaton import MATCH_WALK_LIMIT, NO_LINK, SuffixAutomaton
from hsd_rag.tree import SOURCE_HISTORY, SOURCE_NGRAM, TokenTree

# Shortest matched suffix (tokens, root included) that may propose anything. 1 = the pending token alone.
# A one-token context is the common case at the start of a copied span in BPE text (the first sub-word of a
# rare name already pins the rest of it), and the calibrator gives ambiguous one-token contexts low scores so
# they lose to better drafts under the budget; 2 would miss every copy whose entry point is a single token.
MIN_MATCH = 1
MAX_DEPTH = 10  # deepest draft (tokens after the root); copies rarely stay accepted longer per step
# ... unless the match the chain started from is longer: then the chain may be as deep as that match (suffix
# decoding's rule, speculation sized by match length), up to this many tokens.
MAX_DEPTH_LONG_MATCH = 24
MAX_BRANCH = 4  # continuations considered per node, most frequent first
# Shorter suffix matches whose extra continuations are also offered at the root (alternatives the longest
# match never saw); 0 = the longest match only.
MAX_BACKOFF = 2


@dataclass
class _Index:
    """One suffix automaton the drafter reads, with its calibration and where its proposals are remembered."""

    automaton: SuffixAutomaton
    calibrator: NgramCalibrator
    source: int  # the tree label of its drafts
    proposed: dict[tuple[int, ...], int]  # draft token path below the root -> calibrator bucket
    state: int  # the longest match of the stream's suffix
    length: int


class NgramDrafter:
    """Drafter over a per-request suffix automaton of documents + prompt + answer (see module docstring)."""

    name = "ngram"

    def __init__(
        self,
        min_match: int = MIN_MATCH,
        max_depth: int = MAX_DEPTH,
        max_depth_long_match: int = MAX_DEPTH_LONG_MATCH,
        max_branch: int = MAX_BRANCH,
        max_backoff: int = MAX_BACKOFF,
        match_walk_limit: int = MATCH_WALK_LIMIT,
        calibrator_factory: Callable[[], NgramCalibrator] = NgramCalibrator,
        history: AnswerHistory | None = None,
    ):
        if min_match < 1 or max_depth < 0 or max_branch < 1 or max_backoff < 0:
            raise ValueError("need min_match >= 1, max_depth >= 0, max_branch >= 1, max_backoff >= 0")
        self.min_match = min_match
        self.max_depth = max_depth
        self.max_depth_long_match = max(max_depth, max_depth_long_match)
        self.max_branch = max_branch
        self.max_backoff = max_backoff
        self.match_walk_limit = match_walk_limit
        self.calibrator_factory = calibrator_factory
        self.history = history
        self._reset()

    def _reset(self) -> None:
        self.automaton: SuffixAutomaton | None = None
        self.calibrator: NgramCalibrator | None = None
        self._stream = -1  # sequence id of prompt + answer in the automaton
        self._stream_length = 0  # tokens in the stream
        self._stream_tail = -1  # last stream token (the pending root)
        self._proposed_root = -1  # root token of the last proposal
        self._proposed: dict[tuple[int, ...], int] = {}  # draft token path below the root -> calibrator bucket
        self.history_calibrator: NgramCalibrator | None = None
        self._proposed_history: dict[tuple[int, ...], int] = {}  # the same for drafts from earlier answers

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
        # drafts from earlier answers: calibrated across the history's requests (AnswerHistory.calibrator)
        self.history_calibrator = self.history.calibrator if self.history is not None else None
        self._stream_length = len(prompt_ids)
        self._stream_tail = int(prompt_ids[-1])

    def propose(self, context: DraftContext) -> TokenTree:
        """Best-first tree of continuations of the longest match, at most `budget` drafts, `max_depth` deep.

        A node's score is its parent's times the calibrated conditional acceptance of its bucket, so scores
        never increase along a path and best-first order is the order `TokenTree.truncate` keeps. The indexes
        are only read (at most the automaton's frequency-ranking memo gets filled).
        """
        automaton, calibrator = self.automaton, self.calibrator
        if automaton is None or calibrator is None:
            raise RuntimeError("NgramDrafter.propose called before start")
        self._check_synced(context.token_ids)
        root = int(context.token_ids[-1])
        tree = TokenTree.root(root)
        self._proposed_root = root
        self._proposed, self._proposed_history = {}, {}
        if context.budget <= 0 or self.max_depth <= 0:
            return tree
        history = self.history
        if history is None or len(history) == 0:
            self._grow(tree, context.budget, [self._request_index()])
            return tree
        with history.lock:
            indexes = [self._request_index()]
            state, length = longest_suffix_match(history.automaton, context.token_ids)
            if length >= self.min_match:
                index = _Index(history.automaton, self.history_calibrator, SOURCE_HISTORY,
                               self._proposed_history, state, length)
                indexes.insert(0 if length > indexes[0].length else 1, index)  # the longer match ranks first
            self._grow(tree, context.budget, indexes)
        return tree

    def _request_index(self) -> _Index:
        state, length = self.automaton.longest_match(self._stream)
        return _Index(self.automaton, self.calibrator, SOURCE_NGRAM, self._proposed, state, length)

    def _grow(self, tree: TokenTree, budget: int, indexes: list[_Index]) -> None:
        """Best-first expansion of the continuations of every index's match into `tree`."""
        counter = itertools.count()  # heap tie-break: earlier pushes (more frequent, shallower) first
        # Heap entries: (-score, tie, parent node, token, index, automaton state, context length, depth, bucket,
        # token path below the root).
        heap: list = []

        def push_children(index: _Index, node: int, score: float, state: int, context_length: int, depth: int,
                          path: tuple[int, ...], skip: set[int] | None = None) -> None:
            automaton = index.automaton
            children, total = automaton.top_transitions(state, self.max_branch)
            while not children and depth > 0:
                # The drafted context reached the end of the text it was copied from (e.g. the latest period
                # of a repetition, whose next period is still being drafted): continue from the longest
                # shorter suffix that occurs with a continuation, scored by its shorter match length.
                state = automaton.link(state)
                if state == NO_LINK or automaton.length(state) < self.min_match:
                    return
                context_length = automaton.length(state)
                children, total = automaton.top_transitions(state, self.max_branch)
            for token, child, count in children:
                if skip is not None:
                    if token in skip:
                        continue
                    skip.add(token)
                bucket = index.calibrator.bucket(context_length, count / total)
                child_score = score * index.calibrator.estimate(bucket)
                heapq.heappush(heap, (-child_score, next(counter), node, token, index, child, context_length + 1,
                                      depth + 1, bucket, path + (token,)))

        # Root: each index's longest match first, then its shorter suffix matches for continuations it never saw
        # (among their `max_branch` most frequent). A token both indexes offer becomes one node with both
        # labels, and each index keeps expanding its own continuations below it.
        for index in indexes:
            seen: set[int] = set()
            state, length = index.state, index.length
            for _ in range(self.max_backoff + 1):
                if length < self.min_match:
                    break
                push_children(index, 0, 1.0, state, length, 0, (), seen)
                state = index.automaton.link(state)
                length = index.automaton.length(state)

        while heap and tree.num_drafts < budget:
            neg_score, _, parent, token, index, state, context_length, depth, bucket, path = heapq.heappop(heap)
            node = tree.add(parent, token, -neg_score, index.source)
            index.proposed[path] = bucket
            root_match = context_length - depth  # the match the chain started from (less after a back-off)
            if depth < min(self.max_depth_long_match, max(self.max_depth, root_match)):
                push_children(index, node, -neg_score, state, context_length, depth, path)

    def observe(self, outcome: StepOutcome) -> None:
        """Calibrate on the verified n-gram nodes, then append the step's tokens to the stream.

        A verified n-gram node counts once it was decided, i.e. its parent was accepted: accepted if it is on
        the accepted path, rejected otherwise. Nodes are matched to the proposal by token path, so a tree that
        was truncated or fused with other drafters (renumbered nodes) still calibrates correctly.
        """
        automaton, calibrator = self.automaton, self.calibrator
        if automaton is None or calibrator is None:
            raise RuntimeError("NgramDrafter.observe called before start")
        if outcome.tree.tokens[0] == self._proposed_root:
            if self._proposed:
                record_outcomes(outcome, SOURCE_NGRAM, self._proposed, calibrator.record)
            if self._proposed_history:
                with self.history.lock:  # other requests of the decoder share this calibrator
                    record_outcomes(outcome, SOURCE_HISTORY, self._proposed_history, self.history_calibrator.record)
        self._proposed, self._proposed_history = {}, {}
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
