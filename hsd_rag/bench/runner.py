"""Benchmark runner: every method on every prompt, interleaved, against HF `generate` in the same run.

The order of methods rotates from one prompt to the next so slow drifts of the machine (thermal, other load)
spread evenly over methods. Greedy outputs are compared token for token with the baseline; a mismatch is
counted and reported, never hidden.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

BASELINE = "hf"  # HF transformers `generate`, the reference for speed and for greedy outputs


@dataclass
class BenchCase:
    """One prompt to benchmark."""

    id: str
    dataset: str
    messages: list[dict]
    documents: list[str]


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
    steps: int
    wall_s: float  # prefill + decode, as a user waits for it
    draft_s: float = 0.0
    verify_s: float = 0.0
    other_s: float = 0.0
    prefill_s: float = 0.0
    accepted_by_source: dict[str, int] = field(default_factory=dict)
    drafted_by_source: dict[str, int] = field(default_factory=dict)
    accepted_by_depth: dict[int, int] = field(default_factory=dict)
    matches_baseline: bool | None = None  # greedy only: token-identical to HF generate
    token_ids: list[int] = field(default_factory=list)

    @property
    def tau(self) -> float:
        return self.new_tokens / self.steps if self.steps else 0.0

    def to_dict(self) -> dict:
        out = asdict(self)
        out["tau"] = self.tau
        return out


def _hf_generate(decoder, case: BenchCase, max_new_tokens: int, temperature: float, seed: int) -> BenchRecord:
    model = decoder.model
    prompt = decoder.encode_prompt(case.messages)
    ids = torch.tensor([prompt], device=model.device)
    sampling = dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) if temperature > 0 else {}
    if temperature > 0:
        torch.manual_seed(seed)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=temperature > 0,
            pad_token_id=decoder.tokenizer.pad_token_id,
            **sampling,
        )
    wall = time.perf_counter() - start
    new = out[0, len(prompt) :].tolist()
    return BenchRecord(case.id, case.dataset, BASELINE, 0, temperature, len(prompt), len(new), len(new), wall,
                       token_ids=new)


def _ours(decoder, case: BenchCase, method: str, budget: int | str, max_new_tokens: int, temperature: float,
          seed: int) -> BenchRecord:
    start = time.perf_counter()
    res = decoder.generate(case.messages, documents=case.documents, method=method, budget=budget,
                           max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    wall = time.perf_counter() - start
    s = res.stats
    return BenchRecord(
        case.id, case.dataset, method, budget, temperature, s.prompt_tokens, s.new_tokens, s.steps, wall,
        draft_s=s.draft_s, verify_s=s.verify_s, other_s=s.other_s, prefill_s=s.prefill_s,
        accepted_by_source=dict(s.accepted_by_source), drafted_by_source=dict(s.drafted_by_source),
        accepted_by_depth=dict(s.accepted_by_depth), token_ids=res.token_ids,
    )


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
) -> list[BenchRecord]:
    """Run HF generate and each (method, budget) on every case; returns one record per run."""
    variants = [(BASELINE, 0)] + [(m, b) for m in methods if m != BASELINE for b in budgets]
    if warmup and cases:  # first calls pay one-off costs (allocator, kernels): keep them out of the timings
        for method, budget in variants:
            _run(decoder, cases[0], method, budget, min(8, max_new_tokens), temperature, seed)
    records: list[BenchRecord] = []
    bar = tqdm(total=len(cases) * len(variants), disable=not progress, desc="bench", unit="run")
    for i, case in enumerate(cases):
        shift = i % len(variants)
        baseline = None
        per_case = []
        for method, budget in variants[shift:] + variants[:shift]:
            rec = _run(decoder, case, method, budget, max_new_tokens, temperature, seed)
            if method == BASELINE:
                baseline = rec
            per_case.append(rec)
            bar.update(1)
            bar.set_postfix(method=method, tau=f"{rec.tau:.2f}")
        if temperature == 0 and baseline is not None:
            for rec in per_case:
                if rec.method != BASELINE:
                    rec.matches_baseline = rec.token_ids == baseline.token_ids
        records.extend(per_case)
    bar.close()
    return records


def _run(decoder, case, method, budget, max_new_tokens, temperature, seed) -> BenchRecord:
    if method == BASELINE:
        return _hf_generate(decoder, case, max_new_tokens, temperature, seed)
    return _ours(decoder, case, method, budget, max_new_tokens, temperature, seed)
