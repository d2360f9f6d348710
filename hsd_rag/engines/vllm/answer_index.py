"""Earlier answers as a draft source: the generated outputs of finished requests, bounded, oldest out first.

Why: answers to RAG questions share template phrasing ("Based on the context provided, ..."), so one request's
output drafts the next, as suffix decoding's global tree does. Only generated tokens go in, never a request's
prompt or documents, so nothing a user sent is ever proposed to another user (drafts are verified anyway, but
timing must not reveal other users' context either).

Answers are appended to one stream of the suffix automaton, each followed by `SEPARATOR` (no token id), so a
match never spans two answers and a continuation stops at an answer's end; appending keeps the automaton's
online counts (no bulk recount per answer). The automaton cannot forget, so evicted answers stay indexed until
the stale share reaches `REBUILD_STALE_SHARE`; then it is rebuilt from the live answers (amortised O(1) per
token). Draft scores come from one `NgramCalibrator` shared by all requests: how far earlier answers can be
trusted is a property of the workload, not of one request.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from hsd_rag.drafters.ngram_calibration import NgramCalibrator
from hsd_rag.drafters.suffix_automaton import ROOT, SuffixAutomaton

SEPARATOR = -1  # ends every answer in the stream (never a token id)
MAX_ANSWERS = 1000  # answers kept (suffix decoding keeps up to 10,000 in C++; this index is pure Python)
MAX_TOKENS = 200_000  # tokens kept whatever the number of answers (bounds the automaton's memory)
REBUILD_STALE_SHARE = 0.5  # rebuild once evicted tokens reach this share of the indexed ones
MATCH_CONTEXT = 32  # trailing tokens of a request matched against the index (longer matches are rare)
MIN_MATCH = 2  # shortest matched suffix that may propose: one shared token says little across answers


class AnswerIndex:
    """Generated outputs of earlier requests; `chain` drafts a continuation of a request's recent tokens."""

    def __init__(self, max_answers: int = MAX_ANSWERS, max_tokens: int = MAX_TOKENS, min_match: int = MIN_MATCH):
        if max_answers < 1 or max_tokens < 1 or min_match < 1:
            raise ValueError("need max_answers >= 1, max_tokens >= 1 and min_match >= 1")
        self.max_answers = max_answers
        self.max_tokens = max_tokens
        self.min_match = min_match
        self.calibrator = NgramCalibrator()
        self._answers: deque[list[int]] = deque()  # live answers, oldest first
        self._live_tokens = 0  # tokens in live answers
        self._indexed_tokens = 0  # tokens in the automaton, evicted ones included
        self._rebuild([])

    def __len__(self) -> int:
        return len(self._answers)

    def add(self, output: Sequence[int]) -> None:
        """Index one finished request's generated tokens (the caller passes no prompt tokens)."""
        output = [int(token) for token in output][-self.max_tokens :]
        if not output:
            return
        self._answers.append(output)
        self._automaton.extend(self._stream, output + [SEPARATOR])
        self._live_tokens += len(output)
        self._indexed_tokens += len(output)
        while len(self._answers) > self.max_answers or self._live_tokens > self.max_tokens:
            self._live_tokens -= len(self._answers.popleft())
        if self._indexed_tokens - self._live_tokens > REBUILD_STALE_SHARE * self._indexed_tokens:
            self._rebuild(list(self._answers))

    def chain(self, context: Sequence[int], max_length: int) -> tuple[list[int], list[float], list[int]]:
        """(tokens, scores, calibrator buckets) continuing the longest suffix of `context` seen in an earlier
        answer: each step takes the most frequent continuation, scored like the per-request drafter's."""
        automaton, calibrator = self._automaton, self.calibrator
        state, length = self._match(context[-MATCH_CONTEXT:])
        tokens: list[int] = []
        scores: list[float] = []
        buckets: list[int] = []
        if length < self.min_match:
            return tokens, scores, buckets
        score = 1.0
        while len(tokens) < max_length:
            best, total = automaton.top_transitions(state, 1)
            if not best or best[0][0] == SEPARATOR:
                break
            token, state, count = best[0]
            bucket = calibrator.bucket(length, count / total)
            score *= calibrator.estimate(bucket)
            tokens.append(token)
            scores.append(score)
            buckets.append(bucket)
            length += 1
        return tokens, scores, buckets

    def record(self, buckets: Sequence[int], accepted: int) -> None:
        """Calibrate on a verified chain: drafts before `accepted` were accepted, the next one rejected."""
        for depth, bucket in enumerate(buckets[: accepted + 1]):
            self.calibrator.record(bucket, depth < accepted)

    def _match(self, tokens: Sequence[int]) -> tuple[int, int]:
        """(state, length) of the longest suffix of `tokens` that occurs in an answer and continues there."""
        automaton = self._automaton
        state, length = ROOT, 0
        for token in tokens:
            token = int(token)
            while state != ROOT and token not in automaton.transitions(state):
                state = automaton.link(state)
                length = automaton.length(state)
            following = automaton.transitions(state).get(token)
            if following is None:
                state, length = ROOT, 0
            else:
                state, length = following, length + 1
        while state != ROOT and not automaton.transitions(state):  # the stream's own end continues nowhere
            state = automaton.link(state)
            length = automaton.length(state)
        return state, length

    def _rebuild(self, answers: list[list[int]]) -> None:
        self._automaton = SuffixAutomaton()
        self._stream = self._automaton.add_sequence(())
        self._automaton.recount()  # from here on, appends keep the counts current
        for answer in answers:
            self._automaton.extend(self._stream, answer + [SEPARATOR])
        self._indexed_tokens = sum(len(answer) for answer in answers)
