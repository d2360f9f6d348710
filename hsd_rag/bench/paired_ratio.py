"""Our default method against each bar, paired over the prompts of one run, with a bootstrap interval.

Why: the bars the default is judged by (1.1x vLLM suffix, 1.05x the best single draft source, the fixed split)
are a few percent apart, and a handful of prompts per dataset leaves a wall-clock ratio a few percent of noise:
one prompt slowed by the machine moves a dataset's ratio by 5-10 %. Each ratio here is tokens/s over tokens/s on
the prompts both variants ran (a ratio of sums, as in summary.py), with a percentile bootstrap interval over those
prompts (resampled with replacement; a fixed seed, so a report is reproducible). An interval that straddles a bar
says this run cannot tell, not that the default passed or failed.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from hsd_rag.bench.peer_report import SUFFIX_PEER, default_method
from hsd_rag.bench.runner import BASELINE, BenchRecord

CONFIDENCE = 0.9  # two-sided: the 5th and 95th percentiles of the resampled ratios
RESAMPLES = 2000
SEED = 0
SINGLE_SOURCES = ("ngram", "eagle")  # our methods that draft from one source
FIXED_SPLIT = "hybrid-fixed"


@dataclass(frozen=True)
class PairedRatio:
    ratio: float  # tokens/s of ours over theirs on the shared prompts
    low: float  # bootstrap interval (CONFIDENCE) of that ratio
    high: float
    prompts: int


def _ratio(pairs: Sequence[tuple[BenchRecord, BenchRecord]]) -> float:
    ours = sum(a.new_tokens for a, _ in pairs), sum(a.wall_s for a, _ in pairs)
    theirs = sum(b.new_tokens for _, b in pairs), sum(b.wall_s for _, b in pairs)
    if min(*ours, *theirs) <= 0:
        return math.nan
    return (ours[0] / ours[1]) / (theirs[0] / theirs[1])


def paired_ratio(
    ours: Sequence[BenchRecord],
    theirs: Sequence[BenchRecord],
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> PairedRatio | None:
    """tokens/s of `ours` over `theirs` on the prompts both ran, with its bootstrap interval; None if none shared."""
    theirs_by_case = {r.case_id: r for r in theirs}
    pairs = [(r, theirs_by_case[r.case_id]) for r in ours if r.case_id in theirs_by_case]
    point = _ratio(pairs) if pairs else math.nan
    if math.isnan(point):
        return None
    rng = random.Random(seed)
    # a resample of only empty answers (an immediate end of sequence) has no ratio: it is left out
    resampled = (_ratio([rng.choice(pairs) for _ in pairs]) for _ in range(resamples))
    boot = sorted(r for r in resampled if not math.isnan(r))
    tail, last = (1 - confidence) / 2, len(boot) - 1
    low, high = boot[round(tail * last)], boot[round((1 - tail) * last)]
    return PairedRatio(point, low, high, len(pairs))


def _variants(records: Sequence[BenchRecord]) -> dict[tuple, dict[tuple[str, str], list[BenchRecord]]]:
    """(dataset, temperature) -> (method, budget) -> records, in run order."""
    groups: dict[tuple, dict[tuple[str, str], list[BenchRecord]]] = {}
    for r in records:
        groups.setdefault((r.dataset, r.temperature), {}).setdefault((r.method, str(r.budget)), []).append(r)
    return groups


def _tokens_per_s(records: Sequence[BenchRecord]) -> float:
    wall = sum(r.wall_s for r in records)
    return sum(r.new_tokens for r in records) / wall if wall > 0 else 0.0


def _bars(variants: dict[tuple[str, str], list[BenchRecord]], default: tuple[str, str]):
    """(label, records) of each bar this group ran: vLLM suffix, the fastest single source (other than the
    default itself), the fixed split at the default's budget, HF generate."""
    budget = default[1]
    bars = [(f"vLLM suffix (k={b})", recs) for (m, b), recs in variants.items() if m == SUFFIX_PEER]
    singles = [(key, recs) for key, recs in variants.items() if key[0] in SINGLE_SOURCES and key != default]
    if singles:
        (method, b), recs = max(singles, key=lambda item: _tokens_per_s(item[1]))
        bars.append((f"best single source ({method}, budget {b})", recs))
    if (FIXED_SPLIT, budget) in variants:
        bars.append((f"fixed split ({FIXED_SPLIT}, budget {budget})", variants[(FIXED_SPLIT, budget)]))
    bars += [("HF generate", recs) for (m, _), recs in variants.items() if m == BASELINE]
    return bars


def default_vs_bars_table(records: Sequence[BenchRecord], decoder_default: str | None = None) -> str:
    """One row per (dataset, temperature, bar): our default's tokens/s over the bar's, and its interval."""
    method, budget = default_method(decoder_default)
    rows = []
    for (dataset, temperature), variants in _variants(records).items():
        ours = variants.get((method, budget))
        if ours is None:
            continue
        for label, theirs in _bars(variants, (method, budget)):
            paired = paired_ratio(ours, theirs)
            if paired is not None:
                rows.append(
                    f"| {dataset} | {temperature:g} | {label} | {paired.ratio:.2f}× | "
                    f"{paired.low:.2f}–{paired.high:.2f} | {paired.prompts} |"
                )
    if not rows:
        return ""
    head = (
        f"Our default ({method}, budget {budget}): tokens/s over each bar's on the same prompts, with a "
        f"{CONFIDENCE:.0%} bootstrap interval over those prompts (hsd_rag.bench.paired_ratio).\n\n"
        "| dataset | T | against | default's tokens/s over it | interval | prompts |\n|---|---|---|---|---|---|\n"
    )
    return head + "\n".join(rows) + "\n"
