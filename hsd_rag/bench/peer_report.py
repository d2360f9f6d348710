"""The engines table: our methods and vLLM's, each against its own plain decode, and ours against vLLM suffix.

Speedups are per engine: our methods over HF `generate` (the decode loop they replace), vLLM's methods over vLLM
without speculation, so a faster runtime does not pass for a better drafter. The last column puts every row
next to vLLM's upstream suffix decoding, the peer to beat (issue 10). Decode-only columns leave the prefill
out (HF and vLLM: from the first token on; ours: after the prompt is in the cache).
"""

from __future__ import annotations

from hsd_rag.bench.peers import PEERS, PLAIN_PEER
from hsd_rag.bench.runner import BASELINE
from hsd_rag.bench.summary import Summary

SUFFIX_PEER = "vllm-suffix"


def _engine(s: Summary) -> str:
    return "vLLM-CPU" if s.method in PEERS else "HF transformers" if s.is_baseline else "hsd_rag"


def _plain(s: Summary, by_method: dict[str, Summary]) -> Summary | None:
    return by_method.get(PLAIN_PEER if s.method in PEERS else BASELINE)


def _ratio(x: float | None, y: float | None) -> str:
    return f"{x / y:.2f}×" if x and y else "-"


def default_method(decoder_default: str | None = None) -> tuple[str, str]:
    """(method, budget) a user gets without choosing: the decoder's default method (hybrid when a head is
    loaded, else ngram) when given, else DecodeConfig's; DecodeConfig's budget."""
    from hsd_rag.config import DecodeConfig

    fields = DecodeConfig.model_fields
    return str(decoder_default or fields["method"].default), str(fields["budget"].default)


def engines_table(summaries: list[Summary]) -> str:
    """One row per (dataset, temperature, engine method); empty when the run had no peers."""
    if not any(s.method in PEERS for s in summaries):
        return ""
    head = (
        "| dataset | T | engine | method | budget / k | prompts | τ | tokens/s | speedup over own plain"
        " | decode tokens/s | decode speedup over own plain | vs vLLM suffix | greedy mismatches |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for group in _groups(summaries):
        by_method = {s.method: s for s in group if s.method in PEERS or s.is_baseline}
        suffix = by_method.get(SUFFIX_PEER)
        for s in group:
            plain = _plain(s, by_method)
            own = "-" if plain is None or plain is s else _ratio(s.tokens_per_s, plain.tokens_per_s)
            own_decode = "-" if plain is None or plain is s else _ratio(s.decode_tokens_per_s,
                                                                        plain.decode_tokens_per_s)
            decode = f"{s.decode_tokens_per_s:.1f}" if s.decode_tokens_per_s else "-"
            versus = "-" if suffix is None or suffix is s else _ratio(s.tokens_per_s, suffix.tokens_per_s)
            mism = ("not compared" if s.temperature > 0 else
                    "-" if s.is_baseline else f"**{s.mismatches}/{s.compared}**" if s.mismatches
                    else f"0/{s.compared}")
            budget = "-" if s.is_baseline or s.method == PLAIN_PEER else str(s.budget)
            rows.append(
                f"| {s.dataset} | {s.temperature:g} | {_engine(s)} | {s.method} | {budget} | {s.prompts} | "
                f"{s.tau:.2f} | {s.tokens_per_s:.1f} | {own} | {decode} | {own_decode} | {versus} | {mism} |"
            )
    return head + "\n".join(rows) + "\n"


def headline(summaries: list[Summary], decoder_default: str | None = None) -> str:
    """Per dataset: our default method's tokens/s over vLLM suffix's (the comparison a user makes first), and
    our fastest method's when that is another one."""
    method, budget = default_method(decoder_default)
    lines = []
    for group in _groups(summaries):
        suffix = next((s for s in group if s.method == SUFFIX_PEER), None)
        ours = next((s for s in group if s.method == method and str(s.budget) == budget), None)
        label = f"our default ({method}, budget {budget})"
        if ours is None:
            candidates = [s for s in group if not s.is_baseline and s.method not in PEERS]
            ours = max(candidates, key=lambda s: s.tokens_per_s, default=None)
            label = f"our best method here ({ours.method}, budget {ours.budget}; the default was not run)" if ours else ""
        if suffix is None or ours is None:
            continue
        line = (
            f"- {group[0].dataset}, T={group[0].temperature:g}: {label} {ours.tokens_per_s:.1f} tokens/s vs "
            f"vLLM suffix {suffix.tokens_per_s:.1f} tokens/s: **{_ratio(ours.tokens_per_s, suffix.tokens_per_s)}**"
        )
        candidates = [s for s in group if not s.is_baseline and s.method not in PEERS]
        best = max(candidates, key=lambda s: s.tokens_per_s)
        if best is not ours:
            line += (f"; our fastest ({best.method}, budget {best.budget}) {best.tokens_per_s:.1f} tokens/s: "
                     f"**{_ratio(best.tokens_per_s, suffix.tokens_per_s)}**")
        lines.append(line)
    return "\n".join(lines) + ("\n" if lines else "")


def _groups(summaries: list[Summary]) -> list[list[Summary]]:
    groups: dict[tuple, list[Summary]] = {}
    for s in summaries:
        groups.setdefault((s.dataset, s.temperature), []).append(s)
    return list(groups.values())
