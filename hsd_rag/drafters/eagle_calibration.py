"""Calibrated EAGLE draft scores: P(a head draft is accepted | its parent was accepted), learned per request.

Why: adaptive fusion ranks every candidate node of every source on one scale, the probability that the target's
decode passes through it. The head's own probabilities are over-confident (on the default model, EAGLE nodes
with a high path probability were accepted 15 % of the time), and a head trained on one language is nearly
useless on another; ranked raw, its nodes crowd out better n-gram nodes and the tree pays for them.

Each draft falls in a bucket: its depth (1 .. MAX_DEPTH, deeper pooled) x the head's conditional probability q of
the draft given its parent (bucket edges PROB_EDGES). A bucket keeps a Beta posterior: the prior mean comes from
`AcceptancePriors` that `hsd-rag eval-head` measures and stores beside the head (acceptance_priors.json), or is q
itself when the head ships none; its counts are this request's accept/reject outcomes. A node's score is the
product of the estimates along its path, exactly as the n-gram scores are built, so both sources' scores mean
the same thing. Lookups run on the head's device (bucketize + gather): drafting stays free of host syncs.

A request is short (tens of steps) and spreads its outcomes over many buckets, while the head's worth mostly
shifts as a whole from one request to the next (the language, how much the answer paraphrases). So every
bucket's prior mean is also scaled by one per-request factor, observed accepts over the accepts the priors
predicted for the same decided drafts (shrunk towards 1 by SCALE_STRENGTH pseudo-accepts): a few steps of a
French request move every EAGLE estimate of an English-trained head down together.
"""

from __future__ import annotations

import torch

from hsd_rag.heads.acceptance_priors import MAX_DEPTH, PROB_EDGES, AcceptancePriors, bucket_midpoints

PRIOR_STRENGTH = 8.0  # pseudo-observations of the prior: a handful of this request's outcomes move it
SPARSE_BUCKET = 4.0  # a measured prior bucket with fewer verified drafts leans this much on q itself
SCALE_STRENGTH = 2.0  # pseudo-accepts that keep the per-request scale near 1 until outcomes arrive
MAX_ESTIMATE = 0.99


class EagleCalibrator:
    """Beta posterior of draft acceptance per (depth, head-probability) bucket; estimates as a device table."""

    def __init__(self, priors: AcceptancePriors | None = None, device=None,
                 prior_strength: float = PRIOR_STRENGTH):
        self.device = device
        self.num_prob_buckets = len(PROB_EDGES) + 1
        self._edges = torch.tensor(PROB_EDGES, device=device)
        midpoints = bucket_midpoints()
        self.prior_strength = prior_strength
        self._prior_mean: list[float] = []  # [buckets] prior acceptance of each flat bucket
        for depth_index in range(MAX_DEPTH):
            for bucket, q in enumerate(midpoints):
                mean = q
                if priors is not None:
                    verified = priors.verified[depth_index][bucket]
                    accepted = priors.accepted[depth_index][bucket]
                    mean = (accepted + SPARSE_BUCKET * q) / (verified + SPARSE_BUCKET)
                self._prior_mean.append(min(max(mean, 1e-3), 1 - 1e-3))
        size = len(self._prior_mean)
        self.accepted = [0] * size  # this request's outcomes per flat bucket
        self.rejected = [0] * size
        self._expected = 0.0  # accepts the priors predicted for this request's decided drafts
        self._table: torch.Tensor | None = None  # [buckets] log estimates on `device`, rebuilt after records

    @property
    def scale(self) -> float:
        """This request's observed accepts over the priors' prediction for the same drafts (shrunk to 1)."""
        return (sum(self.accepted) + SCALE_STRENGTH) / (self._expected + SCALE_STRENGTH)

    def score(self, depth: int, log_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log P(accepted | parent accepted), flat bucket id) of drafts at `depth` with head log-probs."""
        depth_index = min(depth, MAX_DEPTH) - 1
        buckets = torch.bucketize(log_probs.float().exp(), self._edges) + depth_index * self.num_prob_buckets
        return self._log_table()[buckets], buckets

    def _log_table(self) -> torch.Tensor:
        if self._table is None:
            scale, strength = self.scale, self.prior_strength
            estimates = [
                (strength * min(mean * scale, MAX_ESTIMATE) + self.accepted[i])
                / (strength + self.accepted[i] + self.rejected[i])
                for i, mean in enumerate(self._prior_mean)
            ]
            self._table = torch.tensor(estimates, device=self.device).log()
        return self._table

    def record(self, bucket: int, accepted: bool) -> None:
        if accepted:
            self.accepted[bucket] += 1
        else:
            self.rejected[bucket] += 1
        self._expected += self._prior_mean[bucket]
        self._table = None

    def observed(self) -> AcceptancePriors:
        """This request's outcomes in the priors' layout (what `hsd-rag eval-head` sums into priors)."""
        priors = AcceptancePriors.empty()
        for flat, (acc, rej) in enumerate(zip(self.accepted, self.rejected, strict=True)):
            depth_index, bucket = divmod(flat, self.num_prob_buckets)
            priors.accepted[depth_index][bucket] += acc
            priors.verified[depth_index][bucket] += acc + rej
        return priors


class RawHeadScores(EagleCalibrator):
    """The head's own probabilities as scores (no calibration), still counting outcomes per bucket.

    What EAGLE-2 ranks by; used to measure priors (`hsd-rag eval-head --write-priors`) without the ranking
    depending on earlier priors, and by tests that check the tree search against sequential head decoding.
    """

    def score(self, depth: int, log_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return log_probs.float(), super().score(depth, log_probs)[1]
