"""Aggregate benchmark records into per-method rows, a Markdown report, JSONL and plots."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from hsd_rag.bench.runner import BASELINE, BenchRecord


@dataclass
class Summary:
    """Totals of one (dataset, method, budget) over all its prompts; ratios are of sums, not means of ratios."""

    dataset: str
    method: str
    budget: int | str  # an int, or "auto"
    prompts: int = 0
    new_tokens: int = 0
    steps: int = 0
    wall_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    other_s: float = 0.0
    prefill_s: float = 0.0
    accepted_by_source: Counter = field(default_factory=Counter)
    accepted_by_depth: Counter = field(default_factory=Counter)
    mismatches: int = 0
    compared: int = 0
    speedup: float | None = None  # tokens/s over the baseline's tokens/s on the same prompts

    @property
    def tau(self) -> float:
        return self.new_tokens / self.steps if self.steps else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s else 0.0

    def source_share(self) -> dict[str, float]:
        """Share of generated tokens drafted by each source (the rest is the target's bonus tokens)."""
        if not self.new_tokens:
            return {}
        share = {k: v / self.new_tokens for k, v in sorted(self.accepted_by_source.items())}
        share["target"] = self.steps / self.new_tokens
        return share


def budget_key(budget: int | str) -> tuple[int, int]:
    """Numeric budgets in order, "auto" last."""
    return (1, 0) if budget == "auto" else (0, int(budget))


def summarize(records: list[BenchRecord]) -> list[Summary]:
    groups: dict[tuple, Summary] = {}
    for r in records:
        key = (r.dataset, r.method, r.budget)
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
        s.accepted_by_depth.update({int(k): v for k, v in r.accepted_by_depth.items()})
        if r.matches_baseline is not None:
            s.compared += 1
            s.mismatches += not r.matches_baseline
    baselines = {s.dataset: s for s in groups.values() if s.method == BASELINE}
    for s in groups.values():
        base = baselines.get(s.dataset)
        if base is not None and base.tokens_per_s > 0:
            s.speedup = s.tokens_per_s / base.tokens_per_s
    return sorted(groups.values(), key=lambda s: (s.dataset, s.method != BASELINE, s.method, budget_key(s.budget)))


def markdown_table(summaries: list[Summary]) -> str:
    head = (
        "| dataset | method | budget | prompts | tokens | τ | tokens/s | speedup vs HF | draft / verify / other (s)"
        " | accepted by source | greedy mismatches |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for s in summaries:
        sources = ", ".join(f"{k} {v}" for k, v in sorted(s.accepted_by_source.items())) or "-"
        mism = f"{s.mismatches}/{s.compared}" if s.compared else "-"
        budget = "-" if s.method == BASELINE else str(s.budget)
        split = "-" if s.method == BASELINE else f"{s.draft_s:.2f} / {s.verify_s:.2f} / {s.other_s:.2f}"
        speed = f"{s.speedup:.2f}×" if s.speedup is not None else "-"
        rows.append(
            f"| {s.dataset} | {s.method} | {budget} | {s.prompts} | {s.new_tokens} | {s.tau:.2f} | "
            f"{s.tokens_per_s:.1f} | {speed} | {split} | {sources} | {mism} |"
        )
    return head + "\n".join(rows) + "\n"


def total_mismatches(summaries: list[Summary]) -> int:
    return sum(s.mismatches for s in summaries)


def write_jsonl(records: list[BenchRecord], path: Path) -> None:
    with path.open("w") as f:
        for r in records:
            f.write(json.dumps(r.to_dict()) + "\n")


def read_jsonl(path: Path) -> list[BenchRecord]:
    out = []
    for line in path.read_text().splitlines():
        d = json.loads(line)
        d.pop("tau", None)
        d["accepted_by_depth"] = {int(k): v for k, v in d.get("accepted_by_depth", {}).items()}
        out.append(BenchRecord(**d))
    return out


def plot(summaries: list[Summary], out_dir: Path) -> list[Path]:
    """τ vs budget per method, speedup per dataset, and source share; returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    ours = [s for s in summaries if s.method != BASELINE]
    by_method: dict[tuple[str, str], list[Summary]] = defaultdict(list)
    for s in ours:
        by_method[(s.dataset, s.method)].append(s)

    fig, ax = plt.subplots(figsize=(6, 4))
    for (dataset, method), rows in sorted(by_method.items()):
        rows = sorted((s for s in rows if s.budget != "auto"), key=lambda s: s.budget)
        ax.plot([s.budget for s in rows], [s.tau for s in rows], marker="o", label=f"{method} ({dataset})")
    ax.set_xlabel("budget (draft tokens per forward)")
    ax.set_ylabel("τ (tokens per target forward)")
    ax.set_title("τ vs budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    paths.append(_save(fig, out_dir / "tau_vs_budget.png"))

    datasets = sorted({s.dataset for s in ours})
    methods = sorted({s.method for s in ours})
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / max(1, len(methods))
    for j, method in enumerate(methods):
        vals = []
        for d in datasets:
            rows = [s for s in ours if s.dataset == d and s.method == method and s.speedup is not None]
            vals.append(max((s.speedup for s in rows), default=0.0))
        ax.bar([i + j * width for i in range(len(datasets))], vals, width, label=method)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks([i + width * (len(methods) - 1) / 2 for i in range(len(datasets))], datasets)
    ax.set_ylabel("speedup vs HF generate (best budget)")
    ax.legend(fontsize=7)
    paths.append(_save(fig, out_dir / "speedup.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    labels, bottoms = [], None
    rows = sorted(ours, key=lambda s: (s.dataset, s.method, budget_key(s.budget)))
    names = sorted({k for s in rows for k in s.source_share()})
    for name in names:
        vals = [s.source_share().get(name, 0.0) for s in rows]
        ax.bar(range(len(rows)), vals, bottom=bottoms, label=name)
        bottoms = vals if bottoms is None else [a + b for a, b in zip(bottoms, vals, strict=True)]
    labels = [f"{s.method}\nb={s.budget}" for s in rows]
    ax.set_xticks(range(len(rows)), labels, fontsize=6)
    ax.set_ylabel("share of generated tokens")
    ax.set_title("who produced the tokens")
    ax.legend(fontsize=7)
    paths.append(_save(fig, out_dir / "source_share.png"))
    return paths


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def write_report(records: list[BenchRecord], out_dir: Path, header: str = "") -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(records, out_dir / "records.jsonl")
    summaries = summarize(records)
    pngs = plot(summaries, out_dir)
    text = ["# hsd_rag benchmark", "", header, "", markdown_table(summaries)]
    bad = total_mismatches(summaries)
    text.append(f"\n**Greedy outputs differing from HF generate: {bad}.**\n")
    text += [f"![{p.stem}]({p.name})" for p in pngs]
    path = out_dir / "report.md"
    path.write_text("\n".join(text) + "\n")
    return path
