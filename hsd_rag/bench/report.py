"""Benchmark output: raw JSONL records, a Markdown report with tables, and PNG figures.

Greedy mismatches with HF generate are the one result that must never be missed: the report opens with them,
prompt by prompt, when there are any. Sampled runs (temperature > 0) are not compared token for token, and the
report says so instead of printing a reassuring zero.
"""

from __future__ import annotations

import json
from pathlib import Path

from hsd_rag.bench.paired_ratio import default_vs_bars_table
from hsd_rag.bench.peer_report import engines_table, headline
from hsd_rag.bench.reliability import reliability_table
from hsd_rag.bench.runner import BenchRecord
from hsd_rag.bench.summary import (
    Summary,
    budget_key,
    mismatched_records,
    summarize,
    total_mismatches,
)

__all__ = [
    "budget_key",
    "markdown_table",
    "read_jsonl",
    "summarize",
    "total_mismatches",
    "write_jsonl",
    "write_report",
]

RECORDS_FILE = "records.jsonl"
REPORT_FILE = "report.md"
SAMPLING_NOTE = (
    "Sampling (temperature > 0): each method draws its own random answer, so outputs are not compared token "
    "for token with HF generate; losslessness under sampling is a property of the output distribution, checked "
    "by the sampling-fidelity tests, not by this run. Speedups compare tokens/s only."
)


def _budget(s: Summary) -> str:
    return "-" if s.is_baseline else str(s.budget)


def _percent(x: float) -> str:
    return f"{100 * x:.0f}%"


def markdown_table(summaries: list[Summary]) -> str:
    """The main table: one row per (dataset, method, budget, temperature)."""
    head = (
        "| dataset | T | method | budget | prompts | tokens | forwards | τ | tokens/s | speedup vs HF"
        " | decode-only speedup | time: prefill / draft / verify / other | accepted / drafted by source"
        " | greedy mismatches |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for s in summaries:
        split = s.time_split()
        times = "-" if s.is_baseline or not split else " / ".join(_percent(v) for v in split.values())
        sources = ", ".join(
            f"{name} {s.accepted_by_source.get(name, 0)}/{drafted}" for name, drafted in sorted(s.drafted_by_source.items())
        ) or "-"
        if s.temperature > 0:
            mism = "not compared"
        else:
            mism = f"**{s.mismatches}/{s.compared}**" if s.mismatches else (f"0/{s.compared}" if s.compared else "-")
        speed = f"{s.speedup:.2f}×" if s.speedup is not None else "-"
        decode = f"{s.decode_speedup:.2f}×" if s.decode_speedup is not None else "-"
        rows.append(
            f"| {s.dataset} | {s.temperature:g} | {s.method} | {_budget(s)} | {s.prompts} | {s.new_tokens} | "
            f"{s.steps} | {s.tau:.2f} | {s.tokens_per_s:.1f} | {speed} | {decode} | {times} | {sources} | {mism} |"
        )
    return head + "\n".join(rows) + "\n"


def source_share_table(summaries: list[Summary]) -> str:
    """Share of generated tokens by who proposed them, and each source's acceptance rate."""
    ours = [s for s in summaries if not s.is_baseline]
    labels = sorted({k for s in ours for k in s.source_share()})
    if not labels:
        return ""
    head = "| dataset | T | method | budget | " + " | ".join(labels) + " | acceptance rate per source |\n"
    head += "|---|---|---|---|" + "---|" * len(labels) + "---|\n"
    rows = []
    for s in ours:
        share = s.source_share()
        rates = ", ".join(f"{k} {_percent(v)}" for k, v in s.acceptance_rate().items()) or "-"
        cells = " | ".join(_percent(share.get(label, 0.0)) for label in labels)
        rows.append(f"| {s.dataset} | {s.temperature:g} | {s.method} | {s.budget} | {cells} | {rates} |")
    return head + "\n".join(rows) + "\n"


def depth_table(summaries: list[Summary]) -> str:
    """Share of forwards whose accepted path reached depth ≥ d (engines that report no per-step counts, the
    vLLM peers, are left out)."""
    ours = [(s, s.acceptance_by_depth()) for s in summaries if not s.is_baseline and s.accepted_by_depth]
    deepest = max((max(curve) for _, curve in ours if curve), default=0)
    if not deepest:
        return ""
    depths = range(1, deepest + 1)
    head = "| dataset | T | method | budget | " + " | ".join(f"≥{d}" for d in depths) + " |\n"
    head += "|---|---|---|---|" + "---|" * len(depths) + "\n"
    rows = [
        f"| {s.dataset} | {s.temperature:g} | {s.method} | {s.budget} | "
        + " | ".join(_percent(curve.get(d, 0.0)) for d in depths) + " |"
        for s, curve in ours
    ]
    return head + "\n".join(rows) + "\n"


def mismatch_section(records: list[BenchRecord]) -> str:
    """Every greedy output that differs from HF generate, with where it starts to differ."""
    bad = mismatched_records(records)
    if not bad:
        return ""
    lines = [
        f"## ⚠ LOSSLESSNESS VIOLATED: {len(bad)} greedy output(s) differ from HF generate",
        "",
        "| dataset | prompt | method | budget | first differing token | tokens |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.dataset} | {r.case_id} | {r.method} | {r.budget} | {r.first_mismatch} | {r.new_tokens} |" for r in bad
    ]
    return "\n".join(lines) + "\n"


def write_jsonl(records: list[BenchRecord], path: Path) -> None:
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[BenchRecord]:
    """Records written by `write_jsonl` (derived fields dropped, JSON's string keys turned back into depths)."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        d = json.loads(line)
        d.pop("tau", None)
        d.pop("tokens_per_s", None)
        d.pop("decode_tokens_per_s", None)
        d["accepted_by_depth"] = {int(k): v for k, v in d.get("accepted_by_depth", {}).items()}
        out.append(BenchRecord(**d))
    return out


def _greedy_line(summaries: list[Summary]) -> str:
    greedy = [s for s in summaries if s.temperature == 0]
    if not greedy:
        return ""
    compared = sum(s.compared for s in greedy)
    bad = total_mismatches(greedy)
    flag = "  ⚠ LOSSLESSNESS VIOLATED" if bad else ""
    return f"**Greedy outputs differing from HF generate: {bad} of {compared} compared.**{flag}\n"


def write_report(
    records: list[BenchRecord], out_dir: Path, header: str = "", decoder_default: str | None = None
) -> Path:
    """records.jsonl, report.md and the PNG figures in `out_dir`; returns the report's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(records, out_dir / RECORDS_FILE)
    summaries = summarize(records)
    text = ["# hsd_rag benchmark", "", header, ""]
    mismatches = mismatch_section(records)
    if mismatches:
        text += [mismatches, ""]
    text += [_greedy_line(summaries)]
    if any(s.temperature > 0 for s in summaries):
        text += [SAMPLING_NOTE, ""]
    text += [
        "τ = generated tokens / target forwards (accepted drafts + the bonus token). Speedup = tokens/s over HF "
        "`generate`'s tokens/s on the same prompts, run interleaved in the same process, end to end (prefill "
        "included); decode-only speedup compares the decode loops alone. Time shares are of wall time (prefill + "
        "decode). `METHOD/nohist` = the method without the earlier-answers index, "
        "`METHOD/noprefix` = without the prefix cache.",
        "",
        markdown_table(summaries),
    ]
    engines = engines_table(summaries)
    if engines:
        title = "## Engines side by side (each over its own plain decode)"
        text += [title, "", headline(summaries, decoder_default), engines]
    bars = default_vs_bars_table(records, decoder_default)
    if bars:
        text += ["## Our default against each bar, paired over prompts", "", bars]
    for title, table in (
        ("Who proposed the generated tokens", source_share_table(summaries)),
        ("Acceptance by depth (share of forwards accepting ≥ d drafts)", depth_table(summaries)),
        ("Calibration: predicted vs observed acceptance of decided drafts", reliability_table(summaries)),
    ):
        if table:
            text += [f"## {title}", "", table]
    try:
        from hsd_rag.bench.plots import plot_all

        pngs = plot_all(summaries, out_dir)
    except ImportError as err:  # matplotlib is an optional extra: the tables above still stand
        text += [f"Figures skipped ({err}); install them with `pip install matplotlib`.", ""]
    else:
        text += ["## Figures", ""] + [f"![{p.stem}]({p.name})" for p in pngs]
    path = out_dir / REPORT_FILE
    path.write_text("\n".join(text) + "\n", encoding="utf-8")
    return path
