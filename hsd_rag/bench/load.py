"""Load benchmark: concurrent OpenAI chat requests against one server, aggregate tokens/s and latency.

One level = `requests` distinct prompts sent with at most `concurrency` in flight (asyncio + httpx, loopback).
Aggregate tokens/s = all completion tokens / the level's wall time (first request sent -> last answer); latency
= one request's wall time. Greedy outputs are checked against HF `generate`'s on the same chat prompt: by
token ids when the server returns them (vLLM's `return_token_ids`), else by text.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

REQUEST_TIMEOUT_S = 1800.0


@dataclass
class Reference:
    """HF `generate`'s greedy answer to one prompt."""

    token_ids: list[int]
    text: str  # decoded without special tokens, as servers return message content


@dataclass
class LevelResult:
    """One engine at one concurrency."""

    engine: str
    concurrency: int
    requests: int
    completion_tokens: int
    wall_s: float
    latencies_s: list[float] = field(default_factory=list)
    mismatches: int = 0
    compared: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def latency(self, q: float) -> float:
        """Latency quantile (q in [0, 1]) over the level's requests, by linear interpolation."""
        if not self.latencies_s:
            return 0.0
        if len(self.latencies_s) == 1:
            return self.latencies_s[0]
        return statistics.quantiles(self.latencies_s, n=100, method="inclusive")[max(0, min(98, round(q * 100) - 1))]


async def _one(client, url: str, body: dict, reference: Reference | None, result: LevelResult, gate) -> None:
    async with gate:
        start = time.perf_counter()
        try:
            response = await client.post(url, json=body)
            latency = time.perf_counter() - start
            if response.status_code != 200:
                result.errors.append(f"HTTP {response.status_code}: {response.text[:200]}")
                return
            data = response.json()
        except Exception as err:  # noqa: BLE001 - every failure is reported in the table, none hidden
            result.errors.append(f"{type(err).__name__}: {err}")
            return
    choice = data["choices"][0]
    tokens = data.get("usage", {}).get("completion_tokens")
    ids = choice.get("token_ids")
    text = (choice.get("message") or {}).get("content") or ""
    result.latencies_s.append(latency)
    result.completion_tokens += tokens if tokens is not None else len(ids or [])
    if reference is not None:
        result.compared += 1
        same = list(ids) == reference.token_ids if ids is not None else text.strip() == reference.text.strip()
        result.mismatches += not same


async def run_level(base_url: str, engine: str, model: str, prompts: Sequence[list[dict]],
                    documents: Sequence[Sequence[str]] | None, references: Sequence[Reference | None],
                    concurrency: int, max_tokens: int, api_key: str | None = None) -> LevelResult:
    """Send every prompt (greedy, `max_tokens`), at most `concurrency` at a time; see module docstring."""
    import httpx

    result = LevelResult(engine, concurrency, len(prompts), 0, 0.0)
    gate = asyncio.Semaphore(concurrency)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, headers=headers, limits=limits) as client:
        url = f"{base_url}/v1/chat/completions"
        start = time.perf_counter()
        await asyncio.gather(*(
            _one(client, url, _body(model, messages, docs, max_tokens), reference, result, gate)
            for messages, docs, reference in zip(prompts, documents or [None] * len(prompts), references,
                                                 strict=True)
        ))
        result.wall_s = time.perf_counter() - start
    return result


def _body(model: str, messages: list[dict], documents: Sequence[str] | None, max_tokens: int) -> dict:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0,
            "return_token_ids": True}
    if documents:
        body["documents"] = list(documents)
    return body


def hf_references(decoder, prompts: Sequence[list[dict]], max_tokens: int) -> list[Reference]:
    """HF `generate`'s greedy answers (the bench's own baseline call) to the chat prompts."""
    from hsd_rag.bench.runner import BenchCase, _hf_generate

    references = []
    for i, messages in enumerate(prompts):
        record = _hf_generate(decoder, BenchCase(str(i), "load", messages), max_tokens, 0.0, 0)
        ids = record.token_ids
        references.append(Reference(ids, decoder.tokenizer.decode(ids, skip_special_tokens=True)))
    return references


def markdown(results: Sequence[LevelResult]) -> str:
    """One row per (engine, concurrency)."""
    head = ("| engine | concurrent | requests | tokens | wall s | tokens/s | p50 latency s | p95 latency s"
            " | greedy mismatches | errors |\n|---|---|---|---|---|---|---|---|---|---|\n")
    rows = [
        f"| {r.engine} | {r.concurrency} | {r.requests} | {r.completion_tokens} | {r.wall_s:.1f} | "
        f"{r.tokens_per_s:.1f} | {r.latency(0.5):.2f} | {r.latency(0.95):.2f} | "
        f"{f'**{r.mismatches}**' if r.mismatches else 0}/{r.compared} | {len(r.errors)} |"
        for r in results
    ]
    return head + "\n".join(rows) + "\n"
