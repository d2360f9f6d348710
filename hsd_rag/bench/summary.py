"""Aggregate benchmark records into one row per (dataset, method, budget, temperature).

Ratios are ratios of sums, not means of per-prompt ratios: τ = Σ tokens / Σ forwards and tokens/s = Σ tokens /
Σ seconds, so long answers weigh as much as they cost, and speedup is this tokens/s over the HF baseline's
tokens/s on the same prompts of the same run.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from hsd_rag.bench.runner import BASELINE, BenchRecord

TARGET_LABEL = "target"  # generated tokens that no draft proposed: the bonus token of each forward


@dataclass
class Summary:
    """Totals of one (dataset, method, budget, temperature) over all its prompts."""

    dataset: str
    method: str
    budget: int | str  # an int, or "auto"
    temperature: float = 0.0
    prompts: int = 0
    new_tokens: int = 0
    steps: int = 0
    wall_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    other_s: float = 0.0
    prefill_s: float = 0.0
    accepted_by_source: Counter = field(default_factory=Counter)
    drafted_by_source: Counter = field(default_factory=Counter)
    accepted_by_depth: Counter = field(default_factory=Counter)
    tokens_by_label: Counter = field(default_factory=Counter)
    mismatches: int = 0
    compared: int = 0
    speedup: float | None = None  # tokens/s over the baseline's tokens/s on the same prompts
    decode_s: float = 0.0  # summed over the prompts whose record measured decode time
    decode_tokens: int = 0

    @property
    def is_baseline(self) -> bool:
        return self.method == BASELINE

    @property
    def tau(self) -> float:
        return self.new_tokens / self.steps if self.steps else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens/s once the prompt is in the cache (None when no record measured it)."""
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else None

    def time_split(self) -> dict[str, float]:
        """Share of wall time spent in prefill, drafting, verifying and bookkeeping (the rest is untracked)."""
        if self.wall_s <= 0:
            return {}
        parts = {"prefill": self.prefill_s, "draft": self.draft_s, "verify": self.verify_s, "other": self.other_s}
        return {name: seconds / self.wall_s for name, seconds in parts.items()}

    def source_share(self) -> dict[str, float]:
        """Share of generated tokens by who proposed them: a draft source label, or "target" (bonus tokens).

        A token proposed by several sources at once is labelled by all of them ("ngram+eagle"), so the shares
        sum to one.
        """
        if not self.new_tokens:
            return {}
        return {label: n / self.new_tokens for label, n in sorted(self.tokens_by_label.items())}

    def acceptance_rate(self) -> dict[str, float]:
        """Per draft source: accepted drafts over verified drafts."""
        return {
            name: self.accepted_by_source.get(name, 0) / drafted
            for name, drafted in sorted(self.drafted_by_source.items())
            if drafted
        }

    def acceptance_by_depth(self) -> dict[int, float]:
        """d -> share of steps whose accepted path reached depth ≥ d (d = 1 .. deepest accepted path)."""
        total = sum(self.accepted_by_depth.values())
        if not total:
            return {}
        deepest = max(self.accepted_by_depth)
        out, reached = {}, total
        for depth in range(deepest + 1):
            if depth >= 1:
                out[depth] = reached / total
            reached -= self.accepted_by_depth.get(depth, 0)
        return out


def budget_key(budget: int | str) -> tuple[int, int]:
    """Numeric budgets in order, "auto" last."""
    return (1, 0) if budget == "auto" else (0, int(budget))


def summarize(records: Iterable[BenchRecord]) -> list[Summary]:
    """One Summary per (dataset, method, budget, temperature), baselines first within each dataset."""
    groups: dict[tuple, Summary] = {}
    for r in records:
        key = (r.dataset, r.method, r.budget, r.temperature)
        s = groups.setdefault(key, Summary(*key))
        s.prompts += 1
        s.new_tokens += r.new_tokens
        s.steps += r.steps
        s.wall_s += r.wall_s
        s.draft_s += r.draft_s
        s.verify_s += r.verify_s
        s.other_s += r.other_s
        s.prefill_s += r.prefill_s
        s.accepted_by_source.update(r.accepted_by_source)
        s.drafted_by_source.update(r.drafted_by_source)
        s.accepted_by_depth.update({int(k): v for k, v in r.accepted_by_depth.items()})
        s.tokens_by_label.update(r.tokens_by_label)
        if r.decode_s is not None and r.decode_tokens is not None:
            s.decode_s += r.decode_s
            s.decode_tokens += r.decode_tokens
        if r.matches_baseline is not None:
            s.compared += 1
            s.mismatches += not r.matches_baseline
    baselines = {(s.dataset, s.temperature): s for s in groups.values() if s.is_baseline}
    for s in groups.values():
        base = baselines.get((s.dataset, s.temperature))
        if base is not None and base.tokens_per_s > 0:
            s.speedup = s.tokens_per_s / base.tokens_per_s
    return sorted(
        groups.values(),
        key=lambda s: (s.dataset, s.temperature, not s.is_baseline, s.method, budget_key(s.budget)),
    )


def total_mismatches(summaries: Iterable[Summary]) -> int:
    return sum(s.mismatches for s in summaries)


def mismatched_records(records: Iterable[BenchRecord]) -> list[BenchRecord]:
    """Greedy runs whose output differs from HF generate on the same prompt."""
    return [r for r in records if r.matches_baseline is False]
