"""Hardware-aware tree size: verify only as many drafts as pay for themselves on this device.

A target forward over n tree tokens costs c(n) (relative to one token; on a 2-core CPU c(16) ≈ 1.8, on a big
GPU c(60) ≈ 1). With node scores s_i = estimated probability that node i is accepted (monotone along paths),
the expected tokens from a tree holding the k best drafts is 1 + Σ_{i≤k} s_i (the bonus token plus the
expected accepted drafts, by linearity of expectation). Each step keeps the k that maximises

    (1 + Σ_{i≤k} s_i) / c(k + 1),

the expected tokens per unit of verification time. `budget` stays a hard upper bound on k.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from hsd_rag.tree import TokenTree

# Forward time vs tokens in the forward, relative to 1 token, measured on a 2-core CPU with SmolLM2-135M and
# a ~500-token context (FIELD-NOTES §2). Used until `hsd-rag tune` has measured the actual device.
CPU_DEFAULT_PROFILE = {"tokens": [1, 8, 16, 30, 60], "relative_cost": [1.0, 1.5, 1.8, 2.4, 3.3]}
# On a data-centre GPU an 8B target verifies ~60 tokens for about the price of one (memory-bound decode).
GPU_DEFAULT_PROFILE = {"tokens": [1, 16, 32, 64, 128], "relative_cost": [1.0, 1.02, 1.05, 1.12, 1.5]}
AUTO_MAX_BUDGET = 64  # upper bound on drafts per forward when budget="auto"


@dataclass
class CostProfile:
    """Relative forward cost at measured token counts; piecewise-linear in between, linear beyond."""

    tokens: list[int]  # [m] tokens in the forward (root included), ascending, starting at 1
    relative_cost: list[float]  # [m] time relative to a 1-token forward
    device: str = ""
    model: str = ""

    def cost(self, n: int) -> float:
        xs, ys = self.tokens, self.relative_cost
        if n <= xs[0]:
            return ys[0]
        i = bisect.bisect_left(xs, n)
        if i == len(xs):  # extrapolate with the last segment's slope
            i = len(xs) - 1
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return y0 + (y1 - y0) * (n - x0) / (x1 - x0)

    def best_num_drafts(self, sorted_scores: list[float], budget: int) -> int:
        """argmax_k (1 + Σ_{i<k} s_i) / cost(k + 1) for k in 0..min(budget, len(scores))."""
        best_k, best_rate, gain = 0, 1.0 / self.cost(1), 1.0
        for k, score in enumerate(sorted_scores[:budget], start=1):
            gain += score
            rate = gain / self.cost(k + 1)
            if rate > best_rate:
                best_k, best_rate = k, rate
        return best_k

    def min_useful_score(self, budget: int) -> float:
        """A lower bound on the score a draft needs to be kept by `best_num_drafts` for any k <= budget.

        Adding draft k + 1 to k drafts of expected gain G >= 1 pays iff (G + s) / c(k + 2) > G / c(k + 1), i.e.
        s > G (c(k + 2) - c(k + 1)) / c(k + 1) >= (c(k + 2) - c(k + 1)) / c(k + 1). Drafters may stop expanding
        below it: on a GPU the costs are flat and the bound is ~0; on a CPU it prunes deep, unlikely levels.
        """
        steps = [
            (self.cost(k + 2) - self.cost(k + 1)) / self.cost(k + 1) for k in range(max(1, budget))
        ]
        return max(0.0, min(steps))

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> CostProfile:
        return cls(**json.loads(path.read_text()))

    @classmethod
    def default_for(cls, device_type: str) -> CostProfile:
        base = GPU_DEFAULT_PROFILE if device_type == "cuda" else CPU_DEFAULT_PROFILE
        return cls(**base, device=device_type, model="default")


def fit_tree(tree: TokenTree, profile: CostProfile, budget: int) -> TokenTree:
    """Truncate `tree` to the draft count with the best expected tokens per unit of verification time."""
    scores = sorted(tree.effective_scores()[1:], reverse=True)
    return tree.truncate(profile.best_num_drafts(scores, budget))
