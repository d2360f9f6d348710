"""Benchmark runner: every method on every prompt, interleaved, against HF `generate` in the same run.

The order of methods rotates from one prompt to the next so slow drifts of the machine (thermal, other load)
spread evenly over methods. Each (method, budget) keeps its own earlier-answers index (the decoder's
`answer_history`), fed only by that variant's own previous prompts, so no run ever drafts from another method's
answer to the same prompt; a method written `NAME/nohist` runs with the index off, to measure what it brings.
Likewise each variant keeps its own prefix cache (hsd_rag.prefix_cache), as each vLLM peer is its own server: no
run reuses the KV rows another method prefilled for the same prompt; `NAME/noprefix` runs without one. Greedy
outputs are compared token for token with the baseline; a mismatch is counted and recorded with the position of
the first differing token, never hidden. Sampled outputs (temperature > 0) are random draws and are not
compared: their losslessness is a property of distributions, which the sampling-fidelity tests check, not of
single outputs.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from hsd_rag.drafters.answer_history import AnswerHistory
from hsd_rag.kernels import stock_kernels
from hsd_rag.prefix_cache import PrefixCache

BASELINE = "hf"  # HF transformers `generate`, the reference for speed and for greedy outputs
NO_HISTORY_SUFFIX = "/nohist"  # method label suffix: the same method without the earlier-answers index
NO_PREFIX_SUFFIX = "/noprefix"  # method label suffix: the same method without the prefix cache
BASELINE_BUDGET = 0  # the baseline drafts nothing; stored so every record has the same fields
BENCH_PREFIX_ENTRIES = 4  # per variant: a dozen variants stay within a few hundred MB
WARMUP_NEW_TOKENS = 8  # enough to exercise every code path once without slowing the run noticeably


@dataclass
class BenchCase:
    """One prompt to benchmark.

    `prompt` is whatever `HybridSpecDecoder.generate` accepts: chat messages (the usual case, which needs a
    tokenizer with a chat template), a plain string, or token ids. `documents` are the texts the n-gram drafter
    indexes besides the prompt (empty for prompts that embed their context, or for non-RAG controls).
    `response_format` constrains every run of the case, the HF baseline included (bench.structured).
    """

    id: str
    dataset: str
    prompt: list[dict] | str | list[int]
    documents: list[str] = field(default_factory=list)
    response_format: Any = None


@dataclass
class BenchRecord:
    """One (prompt, method, budget) run."""

    case_id: str
    dataset: str
    method: str
    budget: int | str  # an int, or "auto"
    temperature: float
    prompt_tokens: int
    new_tokens: int
    steps: int  # target forwards after the prefill (HF generate: one per token)
    wall_s: float  # prefill + decode, as a user waits for it
    decode_s: float = 0.0  # wall time of the decode loop (prefill excluded)
    decode_tokens: int = 0  # tokens the decode loop produced (HF: all but the one its prefill forward yields)
    draft_s: float = 0.0
    verify_s: float = 0.0
    other_s: float = 0.0
    prefill_s: float = 0.0
    accepted_by_source: dict[str, int] = field(default_factory=dict)  # accepted drafts per source label
    drafted_by_source: dict[str, int] = field(default_factory=dict)  # verified drafts per source label
    accepted_by_depth: dict[int, int] = field(default_factory=dict)  # steps whose accepted path had length d
    tokens_by_label: dict[str, int] = field(default_factory=dict)  # generated tokens per label ("target", ...)
    stop_reason: str = ""
    matches_baseline: bool | None = None  # greedy only: token-identical to HF generate on the same prompt
    first_mismatch: int | None = None  # greedy only: index of the first token that differs from the baseline
    speedup: float | None = None  # tokens/s over HF generate's tokens/s on the same prompt, same run
    token_ids: list[int] = field(default_factory=list)
    reliability: dict[str, list[list[float]]] = field(default_factory=dict)  # see GenerationStats.reliability

    @property
    def tau(self) -> float:
        """Tokens per target forward (accepted drafts + the bonus token)."""
        return self.new_tokens / self.steps if self.steps else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Throughput of the decode loop alone (prefill excluded)."""
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["tau"] = self.tau
        out["tokens_per_s"] = self.tokens_per_s
        out["decode_tokens_per_s"] = self.decode_tokens_per_s
        return out


class _FirstTokenClock:
    """A `generate` streamer that notes when the first generated token arrives (the end of the prefill)."""

    def __init__(self):
        self.calls = 0
        self.first_token_at: float | None = None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:  # generate first puts the prompt, then each new token
            self.first_token_at = time.perf_counter()

    def end(self) -> None:
        pass


def _hf_generate(decoder, case: BenchCase, max_new_tokens: int, temperature: float, seed: int) -> BenchRecord:
    from hsd_rag.bench.structured import constrained_hf_processors

    model = decoder.model
    prompt = decoder.encode_prompt(case.prompt)
    ids = torch.tensor([prompt], device=model.device)
    # The same warpers as DecodeConfig's defaults (top_p=1, top_k=0): plain temperature sampling.
    sampling = dict(temperature=temperature, top_p=1.0, top_k=0) if temperature > 0 else {}
    if temperature > 0:
        torch.manual_seed(seed)
    clock = _FirstTokenClock()
    start = time.perf_counter()
    with torch.inference_mode(), stock_kernels(model):  # the baseline is transformers as users run it
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=temperature > 0,
            pad_token_id=decoder.tokenizer.pad_token_id,
            streamer=clock,
            logits_processor=constrained_hf_processors(decoder, case.response_format),
            **sampling,
        )
    end = time.perf_counter()
    new = out[0, len(prompt) :].tolist()
    stop = "eos" if new and new[-1] in decoder.eos_token_ids else "length"
    decode = end - clock.first_token_at if clock.first_token_at is not None else 0.0
    return BenchRecord(
        case.id, case.dataset, BASELINE, BASELINE_BUDGET, temperature, len(prompt), len(new), len(new),
        end - start, decode, max(0, len(new) - 1), tokens_by_label={"target": len(new)}, stop_reason=stop, token_ids=new,
        prefill_s=end - start - decode,
    )


def run_ours(decoder, case: BenchCase, method: str, budget: int | str, max_new_tokens: int, temperature: float,
             seed: int) -> BenchRecord:
    name = method.replace(NO_PREFIX_SUFFIX, "")  # the prefix cache is chosen per variant (run_benchmark)
    history = not name.endswith(NO_HISTORY_SUFFIX)
    name = name.removesuffix(NO_HISTORY_SUFFIX)
    start = time.perf_counter()
    res = decoder.generate(case.prompt, documents=case.documents, method=name, budget=budget,
                           max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, answer_history=history,
                           response_format=case.response_format)
    wall = time.perf_counter() - start
    s = res.stats
    return BenchRecord(
        case.id, case.dataset, method, budget, temperature, s.prompt_tokens, s.new_tokens, s.steps, wall,
        max(0.0, wall - s.prefill_s), s.new_tokens,
        draft_s=s.draft_s, verify_s=s.verify_s, other_s=s.other_s, prefill_s=s.prefill_s,
        accepted_by_source=dict(s.accepted_by_source), drafted_by_source=dict(s.drafted_by_source),
        accepted_by_depth={int(d): n for d, n in s.accepted_by_depth.items()},
        tokens_by_label=dict(Counter(res.token_sources)), stop_reason=s.stop_reason, token_ids=list(res.token_ids),
        reliability={k: [list(cell) for cell in v] for k, v in s.reliability.items()},
    )


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first position where `a` and `b` differ (a length difference counts), or None if equal."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare_to_baseline(records: Sequence[BenchRecord], baseline: BenchRecord) -> None:
    """Fill speedup (always) and the greedy equality fields (temperature 0 only) of one prompt's records."""
    for rec in records:
        if rec.method == BASELINE:
            continue
        if baseline.tokens_per_s > 0:
            rec.speedup = rec.tokens_per_s / baseline.tokens_per_s
        if rec.temperature == 0:
            rec.first_mismatch = first_difference(rec.token_ids, baseline.token_ids)
            rec.matches_baseline = rec.first_mismatch is None


def run_benchmark(
    decoder,
    cases: Sequence[BenchCase],
    methods: Iterable[str],
    budgets: Iterable[int | str] = (16,),
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    seed: int = 0,
    warmup: bool = True,
    progress: bool = True,
    peers=None,
    warmup_case: BenchCase | None = None,
) -> list[BenchRecord]:
    """Run HF generate and each (method, budget) on every case; returns one record per run.

    `peers`: a running hsd_rag.bench.peers.PeerPool whose engines join the rotation (one variant each).
    `warmup_case`: an unmeasured prompt every variant runs once first (default: `reversed_warmup_case`).
    """
    budgets = list(budgets)
    variants = [(BASELINE, BASELINE_BUDGET)] + [(m, b) for m in methods if m != BASELINE for b in budgets]
    histories = {variant: AnswerHistory() for variant in variants}  # each variant learns only from itself
    prefixes = {
        variant: None if NO_PREFIX_SUFFIX in variant[0] else PrefixCache(max_entries=BENCH_PREFIX_ENTRIES)
        for variant in variants
    }
    variants += [(name, None) for name in (peers.names if peers is not None else [])]
    own_history, own_prefixes = decoder.answer_history, decoder.prefix_cache
    try:
        if warmup and cases:
            _warm_up(decoder, variants, warmup_case or reversed_warmup_case(decoder, cases[0]),
                     min(WARMUP_NEW_TOKENS, max_new_tokens), temperature, seed, peers)
        return _interleaved(decoder, cases, variants, histories, prefixes, max_new_tokens, temperature, seed,
                            progress, peers)
    finally:
        decoder.answer_history, decoder.prefix_cache = own_history, own_prefixes


def reversed_warmup_case(decoder, case: BenchCase) -> BenchCase:
    """`case`'s prompt tokens in reverse: the same kernel shapes, but no shared prefix and a different answer.

    The warm-up must never be a measured prompt: vLLM's prefix cache and its suffix decoder's cache of earlier
    answers would then get that prompt's prefill and part of its answer for free.
    """
    return BenchCase("warmup", case.dataset, decoder.encode_prompt(case.prompt)[::-1])


def _warm_up(decoder, variants, case, max_new_tokens, temperature, seed, peers) -> None:
    """First calls pay one-off costs (allocator, kernels, a server's first request): keep them out of the timings."""
    for method, budget in variants:
        decoder.answer_history = AnswerHistory()  # a throwaway: the warm-up answer must not be drafted from
        decoder.prefix_cache = PrefixCache(max_entries=BENCH_PREFIX_ENTRIES)  # nor its prompt's rows reused
        _run(decoder, case, method, budget, max_new_tokens, temperature, seed, peers)


def _interleaved(decoder, cases, variants, histories, prefixes, max_new_tokens, temperature, seed, progress,
                 peers):
    records: list[BenchRecord] = []
    bar = tqdm(total=len(cases) * len(variants), disable=not progress, desc="bench", unit="run")
    for i, case in enumerate(cases):
        shift = i % len(variants)
        per_case = []
        for method, budget in variants[shift:] + variants[:shift]:
            decoder.answer_history = histories.get((method, budget), decoder.answer_history)
            if (method, budget) in prefixes:
                decoder.prefix_cache = prefixes[(method, budget)]
            rec = _run(decoder, case, method, budget, max_new_tokens, temperature, seed, peers)
            per_case.append(rec)
            bar.update(1)
            bar.set_postfix(method=method, tau=f"{rec.tau:.2f}")
        compare_to_baseline(per_case, next(r for r in per_case if r.method == BASELINE))
        records.extend(per_case)
    bar.close()
    return records


def _run(decoder, case, method, budget, max_new_tokens, temperature, seed, peers=None) -> BenchRecord:
    if peers is not None and method in peers.names:
        return peers.run(method, decoder.encode_prompt(case.prompt), case, max_new_tokens, temperature, seed)
    if method == BASELINE:
        return _hf_generate(decoder, case, max_new_tokens, temperature, seed)
    return run_ours(decoder, case, method, budget, max_new_tokens, temperature, seed)
