"""Are the draft scores calibrated? Predicted vs observed acceptance per source and prediction bin.

Adaptive fusion and `budget="auto"` trust every node's score as P(accepted | parent accepted). This table checks
that trust on the benchmark's own runs: for every decided draft (its parent was accepted) the decoder recorded the
predicted probability and whether the target accepted it (GenerationStats.reliability); a calibrated source has
observed ≈ predicted in every row.
"""

from __future__ import annotations

from hsd_rag.bench.summary import Summary
from hsd_rag.stats import RELIABILITY_BINS


def reliability_table(summaries: list[Summary], min_count: int = 20) -> str:
    """Markdown: one row per (dataset, method, budget, source label, prediction bin) with >= `min_count` drafts."""
    rows = []
    for s in summaries:
        for label, bins in sorted(s.reliability.items()):
            for index, (predicted, accepted, count) in enumerate(bins):
                if count < min_count:
                    continue
                low, high = index / RELIABILITY_BINS, (index + 1) / RELIABILITY_BINS
                rows.append(
                    f"| {s.dataset} | {s.method} | {s.budget} | {label} | {low:.1f}-{high:.1f} | "
                    f"{predicted / count:.2f} | {accepted / count:.2f} | {int(count)} |"
                )
    if not rows:
        return ""
    head = ("| dataset | method | budget | source | predicted bin | mean predicted | observed | drafts |\n"
            "|---|---|---|---|---|---|---|---|\n")
    return head + "\n".join(rows) + "\n"
