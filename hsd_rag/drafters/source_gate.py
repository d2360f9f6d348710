"""Whether asking a costly draft source (an EAGLE head) for drafts pays at this step, learned per request.

Why: n-gram drafts cost nothing to make, but every EAGLE level costs a share of a target forward. When the free
sources already fill the tree with likely drafts, or when the head's drafts are rarely accepted (a language it was
not trained on, a passage it copies badly), asking it lowers tokens per second even though it raises τ.

The rule. Let r_free be the expected tokens per unit of time of the best tree from the free sources alone, and
r_with that of the fused tree once the costly source's drafts are added, its drafting cost included (scores are
calibrated acceptance estimates, costs come from the device's CostProfile, hsd_rag.budget). A step's gain is
log(r_with / r_free). Both are known exactly after a step that asked the source, so the gate keeps, per bucket of
r_free (how good the free tree already is), a running mean of the gain over the steps that asked. It asks when
the bucket's mean gain is positive or the bucket has too few samples, and otherwise re-asks only after a skip
streak that doubles each time the gain stays negative (so a collapsed head costs O(log steps) asks per request,
and one that recovers is noticed).

A decoder keeps one gate per costly source across its requests (`new_request` restarts only the skip streaks;
`asked` / `skipped` count over the gate's life, the fusion counts each request's): a ~25-step answer is too short to learn the buckets from scratch, and what the head
was worth on the last requests (a language it does not know, say) is the best first guess for the next one.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from dataclasses import dataclass

# Buckets of the free tree's expected tokens per unit of time (1.0 = no better than plain decoding).
RATE_EDGES = (1.1, 1.3, 1.6, 2.0, 2.5)
MIN_SAMPLES = 2  # steps that must ask in a bucket before its mean may say "skip"
GAIN_MEMORY = 0.3  # weight of the newest gain in the running mean (an exponential moving average)
FIRST_PROBE = 2  # skipped steps in a bucket before asking again; doubles while the gain stays negative
MAX_PROBE = 32


@dataclass
class _Bucket:
    mean_gain: float = 0.0
    samples: int = 0
    skipped: int = 0
    probe_after: int = FIRST_PROBE


class SourceGate:
    """Per-request decision to ask one costly source, from the measured gains of the steps that asked it."""

    def __init__(self):
        self._buckets: dict[int, _Bucket] = {}
        self.asked = 0
        self.skipped = 0

    @staticmethod
    def bucket(free_rate: float) -> int:
        return bisect_right(RATE_EDGES, free_rate)

    def new_request(self) -> None:
        """Start a request: the learned gains stay, the skip streaks restart."""
        for state in self._buckets.values():
            state.skipped = 0

    def should_ask(self, free_rate: float) -> bool:
        state = self._buckets.setdefault(self.bucket(free_rate), _Bucket())
        if state.samples < MIN_SAMPLES or state.mean_gain > 0:
            ask = True
        else:
            state.skipped += 1
            ask = state.skipped >= state.probe_after
        if ask:
            self.asked += 1
        else:
            self.skipped += 1
        return ask

    def learn(self, free_rate: float, fused_rate: float) -> None:
        """Record a step that asked: the free tree's rate and the fused tree's (drafting cost included)."""
        state = self._buckets.setdefault(self.bucket(free_rate), _Bucket())
        gain = math.log(max(fused_rate, 1e-9) / max(free_rate, 1e-9))
        state.mean_gain = gain if state.samples == 0 else (1 - GAIN_MEMORY) * state.mean_gain + GAIN_MEMORY * gain
        state.samples += 1
        if state.skipped:  # this was a probe after a skip streak
            state.probe_after = FIRST_PROBE if state.mean_gain > 0 else min(2 * state.probe_after, MAX_PROBE)
        state.skipped = 0
