"""Load benchmark (issue 12): aggregate tokens/s and p50/p95 latency at 1, 4, 12 and 32 concurrent requests.

Engines, one after the other in one run, on the same prompts (built-in RAG prompts, en/fr/es held-out, greedy):
our server (`python -m hsd_rag.cli serve`), vLLM plain, vLLM ngram, vLLM suffix and vLLM with our proposer.
All engines are up at once and take turns level by level (order reversed every other round), so a busy machine
slows them alike. Every output is checked against HF `generate`'s greedy answer (cached in
--out/references.json). Each level and round gets its own prompts, so neither vLLM's prefix cache nor an
earlier-answers index replays earlier answers.

    python scripts/load_bench.py --out bench-out/load                      # everything
    python scripts/load_bench.py --engines vllm-suffix,vllm-hsd --levels 1,12 --sequential   # less RAM

Run from the project venv; vLLM engines need `make vllm-setup`.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from hsd_rag.bench.load import LevelResult, Reference, hf_references, markdown, run_level
from hsd_rag.bench.peers import free_port

VLLM_ENGINES = {  # name -> (speculative method, num_speculative_tokens), as in hsd-rag bench --peers
    "vllm": ("none", 1),
    "vllm-ngram": ("ngram", 8),
    "vllm-suffix": ("suffix", 16),
    "vllm-hsd": ("hsd", 16),
}
OUR_SERVER = "hsd-serve"
ENGINES = (OUR_SERVER, *VLLM_ENGINES)
LANGUAGES = ("en", "fr", "es")
WARMUP_REQUESTS = 2
KV_CACHE_BYTES = 5 * 2**28  # 1.25 GiB: 32 requests of ~800 tokens of the 135M default model in fp32 (46 KB each)
MAX_MODEL_LEN = 4096


def prompt_pool(count: int) -> tuple[list[list[dict]], list[list[str]]]:
    """`count` held-out RAG prompts, languages interleaved (chat messages, their documents)."""
    from hsd_rag.bench.datasets import HELDOUT_FRACTION
    from hsd_rag.data import format_messages, load_builtin, split

    per_language = [split(load_builtin(lang), HELDOUT_FRACTION)[1] for lang in LANGUAGES]
    examples = [ex for group in zip(*per_language, strict=False) for ex in group][:count]
    if len(examples) < count:
        raise ValueError(f"only {len(examples)} held-out prompts, {count} needed: lower --waves or --levels")
    return [format_messages(e) for e in examples], [list(e.documents) for e in examples]


def references(prompts, max_tokens: int, out: Path | None, threads: int | None) -> list[Reference]:
    """HF greedy answers, cached on disk by prompt and length (they take minutes on a CPU)."""
    keys = [hashlib.sha256(json.dumps([m, max_tokens], sort_keys=True).encode()).hexdigest() for m in prompts]
    cache_path = out / "references.json" if out else None
    cache = json.loads(cache_path.read_text()) if cache_path and cache_path.exists() else {}
    missing = [i for i, key in enumerate(keys) if key not in cache]
    if missing:
        import torch

        from hsd_rag import HybridSpecDecoder

        if threads:
            torch.set_num_threads(threads)
        decoder = HybridSpecDecoder.from_pretrained(head=None)
        print(f"HF generate references for {len(missing)} prompts ...", file=sys.stderr)
        for i, ref in zip(missing, hf_references(decoder, [prompts[i] for i in missing], max_tokens), strict=True):
            cache[keys[i]] = {"token_ids": ref.token_ids, "text": ref.text}
        if cache_path:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            cache_path.write_text(json.dumps(cache))
    return [Reference(**cache[key]) for key in keys]


class OurServer:
    """`python -m hsd_rag.cli serve` on a loopback port (the HF engine of issue 12)."""

    def __init__(self, port: int, threads: int | None, log_path: Path):
        self.base_url = f"http://127.0.0.1:{port}"
        self.command = [sys.executable, "-m", "hsd_rag.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
        if threads and "--threads" in _serve_help():
            self.command += ["--threads", str(threads)]
        self.log_path = log_path
        self.process = None

    def __enter__(self):
        from hsd_rag.engines.vllm.launch import READY_TIMEOUT_S

        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + READY_TIMEOUT_S
        import httpx

        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"our server exited while starting; see {self.log_path}")
            try:
                if httpx.get(f"{self.base_url}/v1/models", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.__exit__()
        raise RuntimeError(f"our server did not come up; see {self.log_path}")

    def __exit__(self, *exc):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def model_name(self) -> str:
        import httpx

        return httpx.get(f"{self.base_url}/v1/models", timeout=30).json()["data"][0]["id"]


def _serve_help() -> str:
    done = subprocess.run([sys.executable, "-m", "hsd_rag.cli", "serve", "--help"], capture_output=True, text=True)
    return done.stdout if done.returncode == 0 else ""


def _vllm_server(name: str, threads: int | None, log_path: Path):
    from hsd_rag.engines.vllm.launch import VllmServer

    speculative, k = VLLM_ENGINES[name]
    return VllmServer(None, "127.0.0.1", free_port(), speculative, k, threads=threads, dtype="float32",
                      enforce_eager=True, kv_cache_bytes=KV_CACHE_BYTES, max_model_len=MAX_MODEL_LEN,
                      log_path=log_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated, of {', '.join(ENGINES)}")
    parser.add_argument("--levels", default="1,4,12,32", help="concurrent requests, comma-separated")
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds per level, engine order reversed every other round (each round: its own "
                             "max(4, concurrency) prompts, the same for every engine)")
    parser.add_argument("--sequential", action="store_true",
                        help="one engine at a time (less RAM; fairness then depends on a steady machine)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of every engine (0: engine default)")
    parser.add_argument("--out", default=None, help="write results.json, report.md, logs and the HF cache here")
    args = parser.parse_args(argv)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        parser.error(f"unknown engine(s) {', '.join(unknown)}; use {', '.join(ENGINES)}")
    if OUR_SERVER in engines and not _serve_help():
        print(f"{OUR_SERVER}: skipped: this checkout has no `hsd-rag serve` subcommand yet (issue 12 item 1)",
              file=sys.stderr)
        engines.remove(OUR_SERVER)
    levels = [int(c) for c in args.levels.split(",")]
    # (level, round) -> prompt indices; every engine gets the same ones, no two levels or rounds share any.
    plan, offset = [], WARMUP_REQUESTS
    for concurrency in levels:
        for round_ in range(args.rounds):
            size = max(4, concurrency)
            plan.append((concurrency, round_, range(offset, offset + size)))
            offset += size
    out = Path(args.out) if args.out else None
    log_dir = out / "logs" if out else Path(os.environ.get("TMPDIR", "/tmp")) / "hsd_rag-load-bench"
    log_dir.mkdir(parents=True, exist_ok=True)
    prompts, documents = prompt_pool(offset)
    refs = [None] * WARMUP_REQUESTS + references(prompts[WARMUP_REQUESTS:], args.max_tokens, out,
                                                 args.threads or None)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    load_at_start = os.getloadavg()[0]
    threads = args.threads or None
    servers = {e: (OurServer(free_port(), threads, log_dir / f"{e}.log") if e == OUR_SERVER
                   else _vllm_server(e, threads, log_dir / f"{e}.log")) for e in engines}
    results: dict[tuple[str, int], LevelResult] = {}
    groups = [engines] if not args.sequential else [[e] for e in engines]
    for group in groups:
        with ExitStack() as stack:
            print(f"starting {', '.join(group)} ...", file=sys.stderr)
            vllm_servers = [servers[e] for e in group if e != OUR_SERVER]
            for server in vllm_servers:  # start them all, then wait: cold starts overlap
                stack.callback(server.stop)
                server.start()
            for server in vllm_servers:
                server.wait_ready()
            if OUR_SERVER in group:
                stack.enter_context(servers[OUR_SERVER])
            for engine in group:  # first requests pay one-off costs (with documents where they are sent)
                _level(servers[engine], engine, prompts, documents, refs, range(WARMUP_REQUESTS), 1, 8)
            for concurrency, round_, indices in plan:
                order = group if round_ % 2 == 0 else group[::-1]
                for engine in order:
                    part = _level(servers[engine], engine, prompts, documents, refs, indices, concurrency,
                                  args.max_tokens)
                    _merge(results, part)
                    print(f"{engine} x{concurrency} round {round_}: {part.tokens_per_s:.1f} tokens/s, "
                          f"p50 {part.latency(0.5):.2f} s, mismatches {part.mismatches}/{part.compared}, "
                          f"errors {len(part.errors)} (load {os.getloadavg()[0]:.1f})", file=sys.stderr)
                    for error in part.errors[:3]:
                        print(f"  {error}", file=sys.stderr)
    ordered = sorted(results.values(), key=lambda r: (engines.index(r.engine), r.concurrency))
    table = markdown(ordered)
    ratios = _ratio_lines(ordered, "vllm-hsd", "vllm-suffix")
    how = "one engine at a time" if args.sequential else "all engines up, rotating per level and round"
    header = (f"Load benchmark, {started}: {offset - WARMUP_REQUESTS} built-in RAG prompts (en/fr/es held-out, "
              f"distinct per level and round, the same for every engine), greedy, max_tokens {args.max_tokens}, "
              f"{args.threads or 'default'} thread(s) per engine, {args.rounds} round(s) per level, {how}; machine "
              f"load average at start {load_at_start:.1f} on {os.cpu_count()} cores. Command: "
              f"`python scripts/load_bench.py {' '.join(argv if argv is not None else sys.argv[1:])}`")
    print(header + "\n\n" + table + ratios)
    if out:
        (out / "report.md").write_text(header + "\n\n" + table + "\n" + ratios)
        (out / "results.json").write_text(json.dumps([r.__dict__ for r in ordered], indent=1))
    return 1 if any(r.mismatches or r.errors for r in ordered) else 0


def _level(server, engine, prompts, documents, refs, indices, concurrency, max_tokens) -> LevelResult:
    model = server.model_name() if engine == OUR_SERVER else server.model_dir
    docs = [documents[i] for i in indices] if engine in (OUR_SERVER, "vllm-hsd") else None
    return asyncio.run(run_level(server.base_url, engine, model, [prompts[i] for i in indices], docs,
                                 [refs[i] for i in indices], concurrency, max_tokens))


def _merge(results: dict, part: LevelResult) -> None:
    """Add one round to its (engine, concurrency) total: tokens and seconds summed, latencies pooled."""
    total = results.setdefault((part.engine, part.concurrency), LevelResult(part.engine, part.concurrency, 0, 0, 0.0))
    total.requests += part.requests
    total.completion_tokens += part.completion_tokens
    total.wall_s += part.wall_s
    total.latencies_s += part.latencies_s
    total.mismatches += part.mismatches
    total.compared += part.compared
    total.errors += part.errors


def _ratio_lines(results, ours: str, peer: str) -> str:
    by_key = {(r.engine, r.concurrency): r for r in results}
    lines = [
        f"- {ours} / {peer} throughput at {c} concurrent: "
        f"{by_key[(ours, c)].tokens_per_s / by_key[(peer, c)].tokens_per_s:.2f}×"
        for (engine, c) in by_key
        if engine == ours and (peer, c) in by_key and by_key[(peer, c)].tokens_per_s > 0
    ]
    return "\n".join(lines) + ("\n" if lines else "")


if __name__ == "__main__":
    sys.exit(main())
