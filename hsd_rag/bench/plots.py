"""Benchmark figures (matplotlib, headless): τ vs budget, speedup per dataset, source share, acceptance by depth.

Budgets are drawn on a categorical axis (numeric budgets ascending, then "auto") so that `budget="auto"` runs
sit next to the fixed budgets they compete with instead of being dropped.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from hsd_rag.bench.summary import Summary, budget_key

FIGURE_SIZE = (7, 4.5)
DPI = 120
LEGEND_FONT = 7
TICK_FONT = 7
BAR_GROUP_WIDTH = 0.8  # fraction of the space between two datasets taken by their group of bars
GRID_ALPHA = 0.3


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    return plt


def _label(s: Summary) -> str:
    temp = f", T={s.temperature:g}" if s.temperature else ""
    return f"{s.method} ({s.dataset}{temp})"


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    _pyplot().close(fig)
    return path


def plot_tau_vs_budget(summaries: list[Summary], path: Path) -> Path:
    plt = _pyplot()
    ours = [s for s in summaries if not s.is_baseline]
    budgets = sorted({s.budget for s in ours}, key=budget_key)
    x_of = {b: i for i, b in enumerate(budgets)}
    lines: dict[tuple, list[Summary]] = defaultdict(list)
    for s in ours:
        lines[(s.dataset, s.method, s.temperature)].append(s)
    fig, ax = plt.subplots(figsize=FIGURE_SIZE)
    for _, rows in sorted(lines.items()):
        rows = sorted(rows, key=lambda s: budget_key(s.budget))
        ax.plot([x_of[s.budget] for s in rows], [s.tau for s in rows], marker="o", label=_label(rows[0]))
    ax.set_xticks(range(len(budgets)), [str(b) for b in budgets])
    ax.set_xlabel("budget (draft tokens verified per forward; auto = sized by expected tokens/s)")
    ax.set_ylabel("τ (tokens per target forward)")
    ax.set_title("τ vs budget")
    ax.grid(alpha=GRID_ALPHA)
    if lines:
        ax.legend(fontsize=LEGEND_FONT)
    return _save(fig, path)


def plot_speedup(summaries: list[Summary], path: Path) -> Path:
    """Best budget of each method per dataset, labelled with that budget; the line at 1 is HF generate."""
    plt = _pyplot()
    ours = [s for s in summaries if not s.is_baseline and s.speedup is not None]
    datasets = sorted({s.dataset for s in ours})
    methods = sorted({s.method for s in ours})
    width = BAR_GROUP_WIDTH / max(1, len(methods))
    fig, ax = plt.subplots(figsize=FIGURE_SIZE)
    for j, method in enumerate(methods):
        best = [max((s for s in ours if s.dataset == d and s.method == method), key=lambda s: s.speedup,
                    default=None) for d in datasets]
        xs = [i + j * width for i in range(len(datasets))]
        bars = ax.bar(xs, [b.speedup if b else 0.0 for b in best], width, label=method)
        ax.bar_label(bars, [f"b={b.budget}" if b else "" for b in best], fontsize=TICK_FONT)
    ax.axhline(1.0, color="black", lw=0.8, label="HF generate")
    ax.set_xticks([i + width * (len(methods) - 1) / 2 for i in range(len(datasets))], datasets, fontsize=TICK_FONT)
    ax.set_ylabel("speedup vs HF generate (best budget)")
    ax.set_title("speedup per dataset")
    ax.legend(fontsize=LEGEND_FONT)
    return _save(fig, path)


def plot_source_share(summaries: list[Summary], path: Path) -> Path:
    plt = _pyplot()
    rows = sorted((s for s in summaries if not s.is_baseline),
                  key=lambda s: (s.dataset, s.temperature, s.method, budget_key(s.budget)))
    labels = sorted({k for s in rows for k in s.source_share()})
    fig, ax = plt.subplots(figsize=FIGURE_SIZE)
    bottoms = [0.0] * len(rows)
    for label in labels:
        vals = [s.source_share().get(label, 0.0) for s in rows]
        ax.bar(range(len(rows)), vals, bottom=bottoms, label=label)
        bottoms = [a + b for a, b in zip(bottoms, vals, strict=True)]
    ax.set_xticks(range(len(rows)), [f"{s.method}\nb={s.budget}\n{s.dataset}" for s in rows], fontsize=TICK_FONT)
    ax.set_ylabel("share of generated tokens")
    ax.set_title("who proposed the generated tokens (target = bonus token)")
    if labels:
        ax.legend(fontsize=LEGEND_FONT)
    return _save(fig, path)


def plot_acceptance_by_depth(summaries: list[Summary], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=FIGURE_SIZE)
    drawn = 0
    for s in summaries:
        curve = s.acceptance_by_depth()
        if s.is_baseline or not curve:
            continue
        ax.plot(list(curve), list(curve.values()), marker=".", label=f"{_label(s)} b={s.budget}")
        drawn += 1
    ax.set_xlabel("depth d (accepted draft tokens in one forward)")
    ax.set_ylabel("share of forwards accepting ≥ d drafts")
    ax.set_ylim(0, 1)
    ax.set_title("acceptance by depth")
    ax.grid(alpha=GRID_ALPHA)
    if drawn:
        ax.legend(fontsize=LEGEND_FONT)
    return _save(fig, path)


PLOTS = {
    "tau_vs_budget.png": plot_tau_vs_budget,
    "speedup.png": plot_speedup,
    "source_share.png": plot_source_share,
    "acceptance_by_depth.png": plot_acceptance_by_depth,
}


def plot_all(summaries: list[Summary], out_dir: Path) -> list[Path]:
    """Write every figure into `out_dir`; returns their paths."""
    return [draw(summaries, out_dir / name) for name, draw in PLOTS.items()]
