"""One in-flight vLLM request as our drafter sees it: an `NgramDrafter` kept in step with vLLM's token row.

vLLM tells a custom proposer nothing but token rows (no request id), so a request is recognised by its tokens:
`continues` is the cheap per-step check that a row is this request one step later (same length bookkeeping,
same recent tokens, the newly sampled tokens appended), `resumes` the full check used when rows were reordered
or a preempted request comes back. Mistaking one request for another can only cost speed: vLLM verifies every
draft against the target, so the output never depends on what we propose.
"""

from __future__ import annotations

from collections.abc import Sequence

from hsd_rag.drafters.base import DraftContext, StepOutcome
from hsd_rag.drafters.ngram import NgramDrafter
from hsd_rag.engines.vllm.answer_index import AnswerIndex
from hsd_rag.engines.vllm.chain import best_chain
from hsd_rag.tree import SOURCE_NGRAM, TokenTree

TAIL_CHECK = 16  # recent tokens compared by the per-step identity check
# Nodes the per-request drafter may put in its tree per chain token: room for a few alternatives at each level,
# so the best chain is found among branches, not just along the first one.
TREE_NODES_PER_DRAFT = 3
SOURCE_PROMPT = "ngram"  # the request's own documents + prompt + output
SOURCE_ANSWERS = "answers"  # earlier requests' outputs


class RequestDrafts:
    """Drafting state of one request: its n-gram drafter, its tokens, and the chain proposed last step."""

    def __init__(self, tokens: Sequence[int], prompt_length: int, documents: Sequence[Sequence[int]] = (),
                 max_depth: int = 8):
        if not 0 < prompt_length <= len(tokens):
            raise ValueError(f"prompt_length must be in 1..{len(tokens)}, got {prompt_length}")
        self.tokens = [int(token) for token in tokens]  # prompt + output so far (vLLM's row)
        self.prompt_length = prompt_length
        self.drafter = NgramDrafter(max_depth=max_depth, max_depth_long_match=max_depth)  # vLLM takes <= k
        self.drafter.start(self.tokens, documents)
        self.retired = False  # its output went to the answer index (it left the batch once)
        self._chain: TokenTree | None = None  # the drafts vLLM verifies this step, as a one-path tree
        self._chain_source = SOURCE_PROMPT
        self._chain_buckets: list[int] = []  # answer-index calibrator buckets of an SOURCE_ANSWERS chain

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def output(self) -> list[int]:
        return self.tokens[self.prompt_length :]

    # ---- identity -----------------------------------------------------------------------------------------

    def continues(self, row: Sequence[int], num_tokens: int, sampled: Sequence[int]) -> bool:
        """Is `row[:num_tokens]` this request one step later, `sampled` being the tokens the step emitted?"""
        known = len(self.tokens)
        if num_tokens - len(sampled) != known:
            return False
        tail = min(known, TAIL_CHECK)
        return (
            [int(t) for t in row[known - tail : known]] == self.tokens[known - tail :]
            and [int(t) for t in row[known:num_tokens]] == [int(t) for t in sampled]
        )

    def resumes(self, row: Sequence[int], num_tokens: int) -> bool:
        """Is `row[:num_tokens]` this request, any number of tokens later (full comparison)?"""
        known = len(self.tokens)
        return known <= num_tokens and int(row[known - 1]) == self.tokens[-1] and [
            int(t) for t in row[:known]
        ] == self.tokens

    # ---- one step -----------------------------------------------------------------------------------------

    def advance(self, new_tokens: Sequence[int], answers: AnswerIndex | None, verified: bool) -> None:
        """Append the tokens emitted since the last step; when `verified` (they are exactly the outcome of the
        chain proposed last step: accepted drafts then the bonus token), calibrate its source on them."""
        new_tokens = [int(token) for token in new_tokens]
        if not new_tokens:
            return
        chain = self._chain
        accepted = len(new_tokens) - 1
        outcome_known = (
            verified and chain is not None and chain.tokens[0] == self.tokens[-1]
            and chain.tokens[1 : accepted + 1] == new_tokens[:accepted]
        )
        if outcome_known and self._chain_source == SOURCE_PROMPT:
            assert chain is not None
            accepted_nodes = list(range(min(accepted, chain.num_drafts) + 1))  # a chain's node ids are depths
            self.drafter.observe(StepOutcome(chain, accepted_nodes, new_tokens))
        else:
            if outcome_known and answers is not None:
                answers.record(self._chain_buckets, accepted)
            self.drafter.observe(StepOutcome(TokenTree.root(self.tokens[-1]), [0], new_tokens))
        self.tokens.extend(new_tokens)
        self._chain = None

    def candidates(self, max_length: int, answers: AnswerIndex | None) -> tuple[list[int], list[float], str, list[int]]:
        """The best chain (tokens, scores, source, answer buckets) of at most `max_length` drafts: from the
        request's own drafter or from earlier answers, whichever expects more accepted tokens."""
        if max_length <= 0:
            return [], [], SOURCE_PROMPT, []
        context = DraftContext(self.tokens, self.prompt_length, max_length * TREE_NODES_PER_DRAFT)
        tokens, scores = best_chain(self.drafter.propose(context), max_length)
        if answers is not None and len(answers):
            other, other_scores, buckets = answers.chain(self.tokens, max_length)
            if sum(other_scores) > sum(scores):
                return other, other_scores, SOURCE_ANSWERS, buckets
        return tokens, scores, SOURCE_PROMPT, []

    def submit(self, tokens: Sequence[int], scores: Sequence[float], source: str, buckets: Sequence[int]) -> None:
        """Remember the chain vLLM will verify, to calibrate on its outcome at the next step."""
        chain = TokenTree.root(self.tokens[-1])
        chain.add_path(tokens, scores, SOURCE_NGRAM)
        self._chain = chain
        self._chain_source = source
        self._chain_buckets = list(buckets[: len(tokens)])
