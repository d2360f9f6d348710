"""Full-size load and fault test of an OpenAI-compatible server: `hsd-rag serve` by default, or any base URL.

    python scripts/load_test.py                          # spawns `hsd-rag serve` on the default model
    python scripts/load_test.py --base-url http://127.0.0.1:8000 --documents-field documents   # any server

Prints aggregate tokens/s and p50/p95 latency at 1, 4, 12 and 32 concurrent clients on 12 RAG prompts
(6 English, 6 French, greedy), with every output checked against HF generate (run here, one prompt at a time),
then exercises the faults: a burst over the queue (429 + Retry-After), hang-ups mid-answer, and (when this
script spawned the server) SIGKILL mid-stream and a restart. Server RSS is read from its /metrics. Exits 1 on
any problem (a lost, duplicated, wrong or leaking request, or a failed fault check).

At each level c, every client sends max(--requests-per-client, ceil(prompts / c)) requests one after the other,
so each level sends every prompt at least once.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hsd_rag.serve.harness import (  # noqa: E402  (after the path tweak, so the repo's copy is imported)
    LoadCase,
    ServerProcess,
    Target,
    probe_disconnect,
    probe_kill_restart,
    probe_queue_full,
    run_load,
    scrape_metric,
    wait_healthy,
)

LEVELS = (1, 4, 12, 32)
DATASETS = "builtin-en,builtin-fr"
PER_DATASET = 6
SUCCESSES = ("hsd_rag_requests_total", {"status": "200"})
RSS = "process_resident_memory_bytes"
MIB = 2**20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default=None, help="test this running server instead of spawning hsd-rag serve")
    p.add_argument("--model", default=None, help="model of the spawned server and of the HF references")
    p.add_argument("--served-model-name", default=None, help="`model` sent in requests (external servers)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--documents-field", default="documents", help="request field for documents; 'none' = omit")
    p.add_argument("--method", default=None, help="spawned server's method (default: the decoder's)")
    p.add_argument("--budget", default=None, help="spawned server's draft budget (default: auto)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the server and of the references")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompts-per-language", type=int, default=PER_DATASET, help="prompts of each of en, fr")
    p.add_argument("--levels", default=",".join(map(str, LEVELS)), help="concurrency levels")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--max-queue", type=int, default=32, help="spawned server's queue (>= the top level - 1)")
    p.add_argument("--no-stats-check", action="store_true", help="skip the draft-statistics (leak) comparison")
    p.add_argument("--skip-faults", action="store_true")
    return p.parse_args(argv)


# ---- references -----------------------------------------------------------------------------------------------


def build_cases(args) -> list[LoadCase]:
    """The RAG prompts with their HF greedy answers and (for our server) the draft counts of a solo run."""
    import torch

    from hsd_rag import HybridSpecDecoder
    from hsd_rag.bench.datasets import load_cases

    torch.set_num_threads(args.threads)
    decoder = HybridSpecDecoder.from_pretrained(args.model)
    settings = {"max_new_tokens": args.max_tokens, "temperature": 0.0}
    if args.method:
        settings["method"] = args.method
    if args.budget:
        settings["budget"] = args.budget if args.budget == "auto" else int(args.budget)
    cases = []
    started = time.monotonic()
    for bench_case in load_cases(DATASETS, limit=args.prompts_per_language, tokenizer=decoder.tokenizer):
        prompt_ids = decoder.encode_prompt(bench_case.prompt)
        ids = torch.tensor([prompt_ids], device=decoder.model.device)
        with torch.inference_mode():
            out = decoder.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                         max_new_tokens=args.max_tokens,
                                         pad_token_id=decoder.tokenizer.pad_token_id)
        expected = out[0, len(prompt_ids):].tolist()
        draft_stats = None
        if not args.no_stats_check:
            solo = decoder.generate(bench_case.prompt, bench_case.documents, answer_history=False, **settings)
            if solo.token_ids != expected:
                raise SystemExit(f"{bench_case.id}: our solo run differs from HF generate (lossless bug?)")
            draft_stats = {"drafted_by_source": dict(solo.stats.drafted_by_source),
                           "accepted_by_source": dict(solo.stats.accepted_by_source)}
        cases.append(LoadCase(bench_case.id, bench_case.prompt, bench_case.documents, args.max_tokens,
                              expected_text=decoder.tokenizer.decode(expected, skip_special_tokens=True),
                              expected_token_ids=expected, expected_draft_stats=draft_stats))
    print(f"references: {len(cases)} prompts, HF generate{'' if args.no_stats_check else ' + solo runs'} "
          f"in {time.monotonic() - started:.0f} s", flush=True)
    return cases


# ---- the spawned server ---------------------------------------------------------------------------------------


def spawned_server(args, log: Path) -> ServerProcess:
    """`hsd-rag serve` on the load test's port, greedy, with the chosen model / method / budget."""
    command = [sys.executable, "-m", "hsd_rag.cli", "serve", "--port", str(args.port),
               "--threads", str(args.threads), "--temperature", "0", "--max-queue", str(args.max_queue)]
    if not args.no_stats_check:  # the leak check compares drafts with solo runs: no cross-request source
        command.append("--no-answer-history")
    for flag, value in (("--model", args.model), ("--method", args.method), ("--budget", args.budget)):
        if value:
            command += [flag, value]
    return ServerProcess(command, log, REPO)


# ---- the run --------------------------------------------------------------------------------------------------


async def load_levels(target: Target, cases: list[LoadCase], levels: list[int], per_client: int, own_server: bool):
    rows, problems = [], []
    for level in levels:
        requests = max(per_client, math.ceil(len(cases) / level))
        report = await run_load(target, cases, clients=level, requests_per_client=requests,
                                success_metric=SUCCESSES if own_server else None)
        rows.append(report.summary())
        problems += [f"[{level} concurrent] {p}" for p in report.problems()]
        print(f"  {level:>2} concurrent: {report.summary()}", flush=True)
    return rows, problems


async def faults(target: Target, cases: list[LoadCase], args, server: ServerProcess | None) -> list[str]:
    problems = []
    short = LoadCase(cases[0].key, cases[0].prompt, cases[0].documents, max_tokens=8)
    burst = args.max_queue + 1 + 8
    probe = await probe_queue_full(target, short, burst)
    print(f"  queue full: burst {burst}, first answers 429: {probe.refused}, Retry-After {sorted(set(probe.retry_after))}, "
          f"all succeeded after retrying: {all(o.ok for o in probe.outcomes)}", flush=True)
    problems += [f"[queue full] {p}" for p in probe.problems()]
    if server is not None and probe.refused == 0:
        problems.append("[queue full] no 429 although the burst exceeded --max-queue")

    long_case = LoadCase(cases[0].key, cases[0].prompt, cases[0].documents, max_tokens=256)
    before = await scrape_metric(target, "hsd_rag_cancelled_total", {"reason": "disconnect"})
    for stream in (True, False):
        after = await probe_disconnect(target, long_case, stream=stream, hang_up_after_s=2.0, follow_up=cases[-1])
        if not after.ok or after.mismatch():
            problems.append(f"[disconnect, stream={stream}] the follow-up failed: {after.error or after.mismatch()}")
    cancelled = await scrape_metric(target, "hsd_rag_cancelled_total", {"reason": "disconnect"})
    print(f"  hang-ups: 2 (stream, whole); server counted cancelled: "
          f"{None if cancelled is None else cancelled - (before or 0)}", flush=True)
    if server is not None and (cancelled or 0) - (before or 0) != 2:
        problems.append(f"[disconnect] the server cancelled {cancelled} generations, expected 2")

    if server is not None:
        chosen = cases[-1]
        kill_case = LoadCase(chosen.key, chosen.prompt, chosen.documents, args.max_tokens,
                             expected_token_ids=chosen.expected_token_ids)
        kr = await probe_kill_restart(target, kill_case, kill=server.kill, restart=server.start, clients=4,
                                      startup_timeout_s=300)
        print(f"  kill mid-stream: {len(kr.during)} clients, errors: {sorted({(o.error or 'none')[:60] for o in kr.during})}; "
              f"last one noticed after {kr.ended_within_s:.2f} s; after restart {sum(o.ok for o in kr.after)}/"
              f"{len(kr.after)} ok", flush=True)
        problems += [f"[kill/restart] {p}" for p in kr.problems()]
    return problems


async def main_async(args) -> int:
    cases = build_cases(args)
    levels = [int(x) for x in args.levels.split(",")]
    own = args.base_url is None
    server = spawned_server(args, Path(os.environ.get("TMPDIR", "/tmp")) / f"hsd-rag-load-{args.port}.log") if own \
        else None
    base_url = args.base_url or f"http://127.0.0.1:{args.port}"
    target = Target(base_url, model=args.served_model_name, api_key=args.api_key,
                    documents_field=None if args.documents_field == "none" else args.documents_field,
                    timeout_s=1800)
    try:
        if server:
            server.start()
        await wait_healthy(target, 600)
        rss_start = await scrape_metric(target, RSS)
        print(f"load: {len(cases)} prompts, {args.max_tokens} new tokens, greedy; server {base_url}", flush=True)
        warm = await run_load(target, cases[:2], clients=1, requests_per_client=2)  # first-request allocations
        rss_warm = await scrape_metric(target, RSS)
        rows, problems = await load_levels(target, cases, levels, args.requests_per_client, own)
        problems += warm.problems()
        rss_end = await scrape_metric(target, RSS)
        if not args.skip_faults:
            print("faults:", flush=True)
            problems += await faults(target, cases, args, server)
    finally:
        if server:
            server.stop()
    print("\n| concurrent | requests | tokens | wall s | tokens/s | p50 s | p95 s | 429 retries | problems |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['completed']}/{r['requests']} | {r['completion_tokens']} | {r['wall_s']} | "
              f"{r['tokens_per_s']} | {r['p50_s']} | {r['p95_s']} | {r['retries_429']} | {r['problems']} |")
    if rss_start:
        print(f"\nserver RSS: start {rss_start / MIB:.0f} MiB, after warm-up {rss_warm / MIB:.0f} MiB, "
              f"after the load {rss_end / MIB:.0f} MiB (growth over the load {(rss_end - rss_warm) / MIB:+.0f} MiB)")
    print(f"problems: {len(problems)}")
    for p in problems[:50]:
        print(f"  {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main_async(parse_args())))
