"""Hardware-aware tree size: verify only as many drafts as pay for themselves on this device.

A target forward over n tree tokens costs c(n) (relative to one token; on a 2-core CPU c(16) ≈ 1.8, on a big
GPU c(60) ≈ 1). With node scores s_i = estimated probability that node i is accepted (monotone along paths),
the expected tokens from a tree holding the k best drafts is 1 + Σ_{i≤k} s_i (the bonus token plus the
expected accepted drafts, by linearity of expectation). Each step keeps the k that maximises

    (1 + Σ_{i≤k} s_i) / c(k + 1),

the expected tokens per unit of verification time. `budget` stays a hard upper bound on k.

Drafting has a cost too: `CostProfile.draft_costs` holds, per draft source that is not free (an EAGLE head), its
cost in the same unit (a one-token target forward), so a fusion policy can tell whether asking that source for
drafts pays this step (hsd_rag.drafters.hybrid). `hsd-rag tune` (hsd_rag.tuning) measures both on the device.
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hsd_rag.tree import TokenTree

# Forward time vs tokens in the forward, relative to 1 token, measured on a 2-core CPU with SmolLM2-135M and
# a ~500-token context (FIELD-NOTES §2). Used until `hsd-rag tune` has measured the actual device.
CPU_DEFAULT_PROFILE = {"tokens": [1, 8, 16, 30, 60], "relative_cost": [1.0, 1.5, 1.8, 2.4, 3.3]}
# On a data-centre GPU an 8B target verifies ~60 tokens for about the price of one (memory-bound decode).
GPU_DEFAULT_PROFILE = {"tokens": [1, 16, 32, 64, 128], "relative_cost": [1.0, 1.02, 1.05, 1.12, 1.5]}
AUTO_MAX_BUDGET = 64  # upper bound on drafts per forward when budget="auto"
# Until `hsd-rag tune` has measured it: one EAGLE head level with a frontier of 8 costs about this share of a
# one-token target forward on a small CPU model (the head is one layer plus a draft-vocab lm_head), and running
# the head over a step's accepted pairs about as much again (measured on SmolLM2-135M, 2-core CPU).
DEFAULT_DRAFT_COSTS = {"eagle": {"fixed": 0.08, "per_level": 0.08}}


def _isotonic(values: list[float]) -> list[float]:
    """Non-decreasing least-squares fit (pool adjacent violators): a bigger forward never costs less.

    Timings are noisy and a tuned profile can dip (c(16) < c(12) was measured here), which would make a bigger
    tree look free; pooling the dip keeps every marginal cost >= 0 without moving the points that agree.
    """
    blocks: list[list[float]] = []  # [sum, count]
    for v in values:
        blocks.append([v, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    return [total / count for total, count in blocks for _ in range(count)]


def _strictly_rising(tokens: list[int], costs: list[float]) -> list[float]:
    """Replace each flat run that pooling left by a line from the point before it to its last point.

    A flat stretch would make extra drafts look free there (and zero the drafters' early-exit floor); a straight
    line through the surrounding measurements is the smallest change that keeps every marginal cost positive.
    """
    costs = list(costs)
    i = 1
    while i < len(costs):
        j = i
        while j + 1 < len(costs) and costs[j + 1] == costs[i]:
            j += 1
        if j > i and costs[i] > costs[i - 1]:
            x0, y0, x1, y1 = tokens[i - 1], costs[i - 1], tokens[j], costs[j]
            for k in range(i, j):
                costs[k] = y0 + (y1 - y0) * (tokens[k] - x0) / (x1 - x0)
        i = j + 1
    return costs


@dataclass
class CostProfile:
    """Relative forward cost at measured token counts; piecewise-linear in between, linear beyond."""

    tokens: list[int]  # [m] tokens in the forward (root included), ascending, starting at 1
    relative_cost: list[float]  # [m] time relative to a 1-token forward (made non-decreasing on load)
    device: str = ""
    model: str = ""
    threads: int = 0  # torch CPU threads it was measured with (0 = unknown)
    # source -> {"fixed": cost of asking at all, "per_level": cost of each drafted level}, in 1-token forwards
    draft_costs: dict[str, dict[str, float]] = field(default_factory=dict)

    def __post_init__(self):
        costs = _strictly_rising(self.tokens, _isotonic(list(self.relative_cost)))
        # pooling a noisy dip (c(2) < c(1)) lowers c(1) too: rescale so a 1-token forward stays the unit
        if costs and self.tokens[0] == 1 and costs[0] > 0:
            costs = [c / costs[0] for c in costs]
        self.relative_cost = costs

    def draft_cost(self, source: str, levels: float) -> float:
        """Cost of asking `source` for a tree of `levels` levels (0 for sources that draft for free)."""
        costs = self.draft_costs.get(source) or DEFAULT_DRAFT_COSTS.get(source)
        if not costs:
            return 0.0
        return costs.get("fixed", 0.0) + costs.get("per_level", 0.0) * levels

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
        return self.best_rate(sorted_scores, budget)[0]

    def best_rate(self, sorted_scores: list[float], budget: int, extra_cost: float = 0.0) -> tuple[int, float]:
        """(k, expected tokens per unit time) of the best k, with `extra_cost` (drafting) added to every k."""
        best_k, best_rate, gain = 0, 1.0 / (self.cost(1) + extra_cost), 1.0
        for k, score in enumerate(sorted_scores[:budget], start=1):
            gain += score
            rate = gain / (self.cost(k + 1) + extra_cost)
            if rate > best_rate:
                best_k, best_rate = k, rate
        return best_k, best_rate

    def fixed_rate(self, sorted_scores: list[float], budget: int, extra_cost: float = 0.0) -> float:
        """Expected tokens per unit time of a tree truncated to exactly `budget` drafts (a fixed budget)."""
        kept = sorted_scores[:budget]
        return (1.0 + sum(kept)) / (self.cost(len(kept) + 1) + extra_cost)

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

    def entry_floor(self, sorted_scores: list[float], budget: int, extra_cost: float = 0.0) -> float:
        """The lowest score a new draft needs to be kept by `best_num_drafts`, given the drafts already scored.

        Why: under budget="auto" the budget is only a cap (64), so "beat the budget-th best" never prunes, and
        `min_useful_score` assumes the draft could be the second node of a tree, where a CPU's marginal cost is
        ~0; a head then drafts levels whose nodes fit_tree throws away (measured: 6 levels per ask, 6-21 ms, on
        English RAG prompts). With R the best rate of the drafts already there (`extra_cost` in it): if a new
        draft of score s is kept, the kept set has k >= m(s) + 1 drafts (m(s) = drafts already scored above s)
        and its lowest score is >= R' (c(k + 1) - c(k)) with R' >= R, else dropping it would pay. So s must be
        >= R * min_{k > m(s)} (c(k + 1) - c(k)); the right side falls as s rises, so one number bounds it.
        """
        scores = list(sorted_scores[:budget])
        rate = self.best_rate(scores, budget, extra_cost)[1]
        # cheapest marginal cost of the k-th draft over k = m + 1 .. budget (a suffix minimum: c need not be convex)
        marginal = [self.cost(k + 1) - self.cost(k) for k in range(1, max(1, budget) + 1)]
        for k in range(len(marginal) - 2, -1, -1):
            marginal[k] = min(marginal[k], marginal[k + 1])
        floor = math.inf
        for m in range(min(len(scores), len(marginal) - 1) + 1):  # m drafts already above the new one
            highest = scores[m - 1] if m else 1.0
            lowest = scores[m] if m < len(scores) else 0.0
            needed = max(lowest, rate * marginal[m])
            if needed <= highest:
                floor = min(floor, needed)
        return 1.0 if floor == math.inf else max(0.0, floor)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> CostProfile:
        fields = json.loads(path.read_text())
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in fields.items() if k in known})

    @classmethod
    def default_for(cls, device_type: str) -> CostProfile:
        base = GPU_DEFAULT_PROFILE if device_type == "cuda" else CPU_DEFAULT_PROFILE
        return cls(**base, device=device_type, model="default")


def fit_tree(tree: TokenTree, profile: CostProfile, budget: int) -> TokenTree:
    """Truncate `tree` to the draft count with the best expected tokens per unit of verification time."""
    scores = sorted(tree.effective_scores()[1:], reverse=True)
    return tree.truncate(profile.best_num_drafts(scores, budget))
