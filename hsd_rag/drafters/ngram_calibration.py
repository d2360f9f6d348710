"""Online calibration of n-gram draft scores: P(a draft token is accepted | its parent was accepted).

Why: the hybrid tree keeps the best `budget` nodes across drafters by score, so n-gram scores must be
probabilities comparable with the other drafters', not raw frequencies. The estimate depends on two features
of the continuation, each bucketed: how long the matched context is (longer matches copy more reliably) and the
branch's share of the continuation counts after that context (a dominant branch is likelier than a rare one).
Each bucket keeps a Beta posterior whose prior mean encodes that ordering and whose counts are the accept/reject
outcomes observed during the current request.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence

# Lower bounds (tokens) of the matched-length buckets; the last bucket is open-ended.
LENGTH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
# Lower bounds of the frequency-share buckets; a share of exactly 1 (a single continuation) is its own bucket.
SHARE_BUCKETS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
# Prior mean = MAX_ACCEPT * share**SHARE_POWER * L / (L + HALF_LENGTH): rising with the branch's frequency share
# and saturating in the match length L. Fitted to what SmolLM2-135M accepted of its n-gram drafts on 60 train-side
# RAG prompts (20 each of en/fr/es, budget 24; `python scripts/ngram_acceptance.py`): a sole continuation was
# accepted 49 % of the time after a 1-token match, 80 % after 3, 89 % after 6-8 and 97-98 % after 16+; a branch
# with a fifth of the counts after a 1-token match about 5-10 % of the time.
MAX_ACCEPT = 0.99  # acceptance ceiling of even an unambiguous, very long match
HALF_LENGTH = 0.8  # match length (tokens) at which a sole continuation reaches half of MAX_ACCEPT
SHARE_POWER = 1.2  # shared continuations are accepted a little less often than their share
PRIOR_STRENGTH = 4.0  # pseudo-observations of the prior: a few real outcomes move the estimate


class NgramCalibrator:
    """Beta-prior mean of accept/reject counts per (match-length bucket, share bucket)."""

    def __init__(
        self,
        length_buckets: Sequence[int] = LENGTH_BUCKETS,
        share_buckets: Sequence[float] = SHARE_BUCKETS,
        max_accept: float = MAX_ACCEPT,
        half_length: float = HALF_LENGTH,
        prior_strength: float = PRIOR_STRENGTH,
        memory: float | None = None,
    ):
        """`memory`: at most this many observed outcomes count per bucket, older ones fading in proportion
        (for a calibrator that outlives one request, e.g. AnswerHistory's); None keeps them all."""
        if not 0.0 < max_accept < 1.0:
            raise ValueError(f"max_accept must be in (0, 1), got {max_accept}")
        if memory is not None and memory <= 0:
            raise ValueError(f"memory must be positive or None, got {memory}")
        if half_length <= 0 or prior_strength <= 0:
            raise ValueError("half_length and prior_strength must be positive")
        if list(length_buckets) != sorted(length_buckets) or length_buckets[0] < 1:
            raise ValueError("length_buckets must be ascending lower bounds starting at >= 1")
        if list(share_buckets) != sorted(share_buckets) or share_buckets[0] != 0.0 or share_buckets[-1] != 1.0:
            raise ValueError("share_buckets must be ascending lower bounds from 0.0 to 1.0")
        self.length_buckets = tuple(length_buckets)
        self.share_buckets = tuple(share_buckets)
        n_share = len(self.share_buckets)
        # Flat [len(length_buckets) * len(share_buckets)] arrays, index = length_bucket * n_share + share_bucket.
        self._prior_accept: list[float] = []  # Beta alpha of the prior (pseudo-accepts)
        self._prior_reject: list[float] = []  # Beta beta of the prior (pseudo-rejects)
        for length in self.length_buckets:
            for i, low in enumerate(self.share_buckets):
                high = self.share_buckets[i + 1] if i + 1 < n_share else 1.0
                mean = max_accept * ((low + high) / 2) ** SHARE_POWER * length / (length + half_length)
                self._prior_accept.append(mean * prior_strength)
                self._prior_reject.append((1.0 - mean) * prior_strength)
        self.memory = memory
        self._accepted = [0.0] * len(self._prior_accept)  # observed accepts per bucket (faded past `memory`)
        self._rejected = [0.0] * len(self._prior_accept)  # observed rejects per bucket

    def bucket(self, match_length: int, share: float) -> int:
        """Flat bucket index of a continuation after a `match_length`-token context with frequency `share`."""
        length_index = max(bisect_right(self.length_buckets, match_length) - 1, 0)
        share_index = max(bisect_right(self.share_buckets, min(share, 1.0)) - 1, 0)
        return length_index * len(self.share_buckets) + share_index

    def estimate(self, bucket: int) -> float:
        """Posterior mean acceptance probability of the bucket, strictly inside (0, 1)."""
        accept = self._prior_accept[bucket] + self._accepted[bucket]
        return accept / (accept + self._prior_reject[bucket] + self._rejected[bucket])

    def record(self, bucket: int, accepted: bool) -> None:
        if accepted:
            self._accepted[bucket] += 1
        else:
            self._rejected[bucket] += 1
        total = self._accepted[bucket] + self._rejected[bucket]
        if self.memory is not None and total > self.memory:
            self._accepted[bucket] *= self.memory / total
            self._rejected[bucket] *= self.memory / total

    @property
    def observations(self) -> float:
        """Outcomes that count so far (all buckets; a whole number unless `memory` faded some)."""
        return sum(self._accepted) + sum(self._rejected)
