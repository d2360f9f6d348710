"""Earlier answers as a draft source: a bounded index of what this decoder generated for previous requests.

Why: answers to a RAG app's questions share phrasing — the chat template's openings, "Based on the provided
context, ...", the way the model words dates, names and lists — so the answer to today's question often repeats
spans of yesterday's answers. Suffix decoding (Oliaro et al., 2024; vLLM's `suffix` method) keeps such a global
tree over earlier outputs beside each request's own prompt tree; this is the same idea on our suffix automaton.

Privacy by construction: only *generated* tokens are ever added — never another request's prompt or documents.
The index is bounded (least recently added answers are dropped past `max_answers` or `max_tokens`) and rebuilt from
the retained answers when it overflows; queries and additions take one lock, so requests on other threads may
add answers while a request drafts.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

from hsd_rag.drafters.ngram_calibration import NgramCalibrator
from hsd_rag.drafters.suffix_automaton import ROOT, SuffixAutomaton

DEFAULT_MAX_ANSWERS = 256
DEFAULT_MAX_TOKENS = 16384  # ~16k tokens index in tens of milliseconds and match in microseconds
MAX_MATCH = 32  # longest suffix of the current answer looked up (longer matches add nothing to the ranking)
MIN_ANSWER_TOKENS = 4  # shorter answers carry no phrasing worth indexing
# Outcomes per calibration bucket the shared calibrator remembers: enough to hold a steady estimate, few enough
# that a change of workload (another language, another prompt template) shows within a few requests.
CALIBRATION_MEMORY = 64
# Another answer predicts this one less surely than the request's own documents after a short match: a sole
# continuation of a 1/2/3-token match was accepted 32/35/47 % of the time (the request's own index: 49 % after
# 1 token, 80 % after 3), after 8+ tokens 93-100 % (`python scripts/ngram_acceptance.py --source history`, 20
# train-side prompts per language, 1,450 decided drafts). The n-gram prior's shape with a longer
# half-saturation length fits that.
HISTORY_HALF_LENGTH = 2.0


def history_calibrator() -> NgramCalibrator:
    return NgramCalibrator(half_length=HISTORY_HALF_LENGTH, memory=CALIBRATION_MEMORY)


class AnswerHistory:
    """A thread-safe, bounded suffix automaton over previous answers (token ids)."""

    def __init__(self, max_answers: int = DEFAULT_MAX_ANSWERS, max_tokens: int = DEFAULT_MAX_TOKENS):
        if max_answers < 0 or max_tokens < 0:
            raise ValueError(f"max_answers and max_tokens must be >= 0, got {max_answers}, {max_tokens}")
        self.max_answers = max_answers
        self.max_tokens = max_tokens
        self.lock = threading.Lock()
        self._answers: OrderedDict[tuple[int, ...], None] = OrderedDict()  # oldest first, deduplicated
        self._tokens = 0
        self.automaton = SuffixAutomaton()
        self.version = 0  # bumped on every change, so a reader can tell its cached match is stale
        # How often drafts copied from earlier answers were accepted, learned over this history's requests
        # (guarded by `lock`). A request's own n-gram calibration starts fresh, but how well *other* answers
        # predict this one is a property of the workload, and ~25 steps are too few to learn it anew each
        # time: a fresh start spent 16 % of a Spanish budget-16 tree on history drafts accepted 6 % of the time.
        self.calibrator = history_calibrator()

    def __len__(self) -> int:
        return len(self._answers)

    @property
    def num_tokens(self) -> int:
        return self._tokens

    def add(self, token_ids: Sequence[int]) -> None:
        """Remember one generated answer (a repeated answer only moves to the newest place)."""
        answer = tuple(int(t) for t in token_ids)
        if len(answer) < MIN_ANSWER_TOKENS or self.max_answers == 0 or len(answer) > self.max_tokens:
            return
        with self.lock:
            if answer in self._answers:
                self._answers.move_to_end(answer)
                return
            self._answers[answer] = None
            self._tokens += len(answer)
            overflow = len(self._answers) > self.max_answers or self._tokens > self.max_tokens
            while len(self._answers) > self.max_answers or self._tokens > self.max_tokens:
                oldest, _ = self._answers.popitem(last=False)
                self._tokens -= len(oldest)
            if overflow:  # an automaton cannot forget: rebuild it from what is retained
                self.automaton = SuffixAutomaton()
                for kept in self._answers:
                    self.automaton.add_sequence(kept)
            else:
                self.automaton.add_sequence(answer)
            self.version += 1

    def clear(self) -> None:
        with self.lock:
            self._answers.clear()
            self._tokens = 0
            self.automaton = SuffixAutomaton()
            self.calibrator = history_calibrator()
            self.version += 1


def longest_suffix_match(automaton: SuffixAutomaton, tokens: Sequence[int], max_match: int = MAX_MATCH):
    """(state, length) of the longest suffix of `tokens` (at most `max_match` long) that occurs in `automaton`
    followed by some token; (ROOT, 0) when none does. Call under the owner's lock."""
    tail = [int(t) for t in tokens[-max_match:]]
    for start in range(len(tail)):
        state = automaton.walk(tail[start:])
        if state is not None and automaton.transitions(state):
            return state, len(tail) - start
    return ROOT, 0
