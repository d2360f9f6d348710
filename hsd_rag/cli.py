"""`hsd-rag`: the command line. Only this module prints; everything it calls returns structured results."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from hsd_rag.bench.datasets import DATASET_NAMES_HELP


def _decoder(args):
    from hsd_rag import HybridSpecDecoder

    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    head = getattr(args, "head", "auto")
    head = None if head in (None, "none") else head
    return HybridSpecDecoder.from_pretrained(args.target, head=head, device=args.device, dtype=args.dtype,
                                             fast_cpu_kernels=not getattr(args, "stock_kernels", False))


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=None, help="hub id, local dir or .gguf (default: embedded SmolLM2-135M)")
    p.add_argument("--head", default="auto", help="EAGLE head dir or hub id; 'auto' = the head shipped for the default target, 'none' = no head")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: per device)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--stock-kernels", action="store_true",
                   help="CPU: keep transformers' stock linear kernels instead of oneDNN-packed weights (hsd_rag.kernels)")


def _cmd_bench(args) -> int:
    from contextlib import ExitStack

    from hsd_rag.bench.datasets import load_cases, load_warmup_case
    from hsd_rag.bench.paired_ratio import default_vs_bars_table
    from hsd_rag.bench.peer_report import engines_table, headline
    from hsd_rag.bench.peers import PeerPool, describe, parse_peers, sigterm_as_exit
    from hsd_rag.bench.report import markdown_table, summarize, total_mismatches, write_report
    from hsd_rag.bench.runner import run_benchmark
    from hsd_rag.engines.vllm.launch import VllmUnavailableError

    peer_names = parse_peers(args.peers)
    dec = _decoder(args)
    cases = load_cases(args.dataset, limit=args.limit, tokenizer=dec.tokenizer,
                       max_context_tokens=args.max_context_tokens)
    warmup_case = load_warmup_case(args.dataset, args.limit, dec.tokenizer, args.max_context_tokens)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    budgets = [b if b == "auto" else int(b) for b in str(args.budgets).split(",")]
    load_at_start = os.getloadavg()[0]
    with ExitStack() as stack:
        peers = None
        if peer_names:
            log_dir = Path(args.out) / "peer-logs" if args.out else None
            print(f"starting vLLM peers {', '.join(peer_names)} (cold starts take minutes) ...", file=sys.stderr)
            stack.enter_context(sigterm_as_exit())  # a terminated bench still stops its servers
            try:
                peers = stack.enter_context(PeerPool(peer_names, args.target, args.threads, log_dir))
            except VllmUnavailableError as err:
                print(f"hsd-rag: error: {err}", file=sys.stderr)
                return 2
        records = run_benchmark(dec, cases, methods, budgets, args.max_new_tokens, args.temperature,
                                seed=args.seed, peers=peers, warmup_case=warmup_case)
        peer_line = describe(peers) if peers is not None else ""
    summaries = summarize(records)
    import platform

    import torch

    header = (
        f"Command: `hsd-rag {' '.join(sys.argv[1:])}`  \n"
        f"Hardware: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"device {dec.model.device}, torch {torch.__version__}  \n"
        f"Target: {dec.model.config.name_or_path or type(dec.model).__name__}, temperature {args.temperature}, "
        f"max_new_tokens {args.max_new_tokens}, {len(cases)} prompts of `{args.dataset}`  \n"
        f"EAGLE head: {_head_label(args, dec)}  \n"
        f"budget=auto cost profile: {_profile_label(dec)}  \n"
        f"Machine load average (1 min) at start: {load_at_start:.1f} on {os.cpu_count()} cores"
        + (f"  \nPeers: {peer_line}" if peer_line else "")
    )
    print(header.replace("  \n", "\n"))
    print(markdown_table(summaries))
    if peer_line:
        print(headline(summaries, dec.default_method))
        print(engines_table(summaries))
    print(default_vs_bars_table(records, dec.default_method))
    bad = total_mismatches(summaries)
    if args.temperature == 0:
        print(f"greedy outputs differing from HF generate: {bad}" + ("  <-- LOSSLESSNESS VIOLATED" if bad else ""))
    if args.out:
        path = write_report(records, Path(args.out), header, dec.default_method)
        print(f"report: {path}")
    return 1 if bad else 0


def _head_label(args, dec) -> str:
    if dec.head is None:
        return "none"
    if args.head == "auto":
        from hsd_rag.loading import shipped_head_dir

        return f"shipped ({shipped_head_dir().name})"
    return str(args.head)


def _profile_label(dec) -> str:
    from hsd_rag.tuning import cost_profile, profile_path

    profile = cost_profile(dec)
    path = profile_path(dec)
    origin = "measured by `hsd-rag tune`" if path.exists() else f"built-in {profile.device} default (run `hsd-rag tune`)"
    costs = ", ".join(f"c({n})={c:.2f}" for n, c in zip(profile.tokens, profile.relative_cost, strict=True))
    eagle = profile.draft_costs.get("eagle")
    if eagle:
        costs += f"; EAGLE drafting {eagle['fixed']:.3f} + {eagle['per_level']:.3f}/level"
    return f"{origin}: {costs}"


def _cmd_tune(args) -> int:
    from hsd_rag.tuning import tune

    dec = _decoder(args)
    profile, path = tune(dec, context=args.context)
    print(f"verification cost on {profile.device} ({profile.model}, {profile.threads or 'default'} threads), "
          f"context {args.context} tokens:")
    print("| tokens in forward | relative time |\n|---|---|")
    for n, c in zip(profile.tokens, profile.relative_cost, strict=True):
        print(f"| {n} | {c:.2f} |")
    for source, cost in profile.draft_costs.items():
        print(f"{source} drafting: {cost['fixed']:.3f} fixed + {cost['per_level']:.3f} per level (1-token forwards)")
    print(f"saved to {path}; budget='auto' now sizes trees with it")
    return 0


def _cmd_qa(args) -> int:
    from hsd_rag.app import answer_question

    return answer_question(args)


def _cmd_serve(args) -> int:
    budget = args.budget
    if budget not in (None, "auto"):
        if not str(budget).isdigit():
            raise ValueError(f"--budget must be a non-negative integer or 'auto', got {budget!r}.")
        budget = int(budget)
    if args.engine == "vllm":
        return _serve_vllm(args, budget)
    from hsd_rag.serve import ServerSettings, run

    settings = ServerSettings(
        model_name=args.served_model_name, api_key=args.api_key, max_queue=args.max_queue,
        request_timeout_s=args.request_timeout, default_max_tokens=args.max_tokens,
        default_temperature=args.temperature, default_method=args.method, drain_timeout_s=args.drain_timeout,
        max_prompt_tokens=args.max_prompt_tokens, max_documents=args.max_documents,
        max_documents_chars=args.max_documents_chars, max_body_bytes=args.max_body_bytes,
        answer_history=not args.no_answer_history,
        **({} if budget is None else {"default_budget": budget}),
    )
    decoder = _decoder(args)
    print(f"hsd-rag serve: OpenAI-compatible API on http://{args.host}:{args.port}/v1 "
          f"(methods: {', '.join(decoder.available_methods())}; default {args.method or decoder.default_method}); "
          f"metrics on /metrics", file=sys.stderr)
    run(decoder, settings, host=args.host, port=args.port)
    return 0


def _serve_vllm(args, budget) -> int:
    try:
        from hsd_rag.engines.vllm.launch import serve
    except ImportError as error:
        raise ImportError(
            f"--engine vllm needs vLLM and hsd_rag.engines.vllm ({error}). vLLM lives in its own venv: run "
            "`bash scripts/setup_vllm.sh` and start `hsd-rag serve --engine vllm` from that venv."
        ) from error
    options = {"speculative": args.method} if args.method else {}  # vLLM's: hsd (default), ngram, suffix, eagle3, none
    if isinstance(budget, int):
        options["num_speculative_tokens"] = budget
    result = serve(model=args.target, host=args.host, port=args.port, api_key=args.api_key, **options)
    return result if isinstance(result, int) else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hsd-rag", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("bench", help="τ, tokens/s and speedup of each method against HF generate, interleaved")
    _add_model_args(p)
    p.add_argument("--dataset", default="builtin-en", help=f"{DATASET_NAMES_HELP}; comma-separated for several")
    p.add_argument("--max-context-tokens", type=int, default=2800, help="cap on a prompt's documents (hub sets)")
    p.add_argument("--methods", default="ngram", help="comma-separated: vanilla,ngram,eagle,hybrid-fixed,hybrid")
    p.add_argument("--budgets", default="16", help="comma-separated draft budgets, e.g. 4,8,16,auto")
    p.add_argument("--limit", type=int, default=8, help="number of prompts")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write records.jsonl, report.md and plots here")
    p.add_argument("--peers", default=None,
                   help="vLLM engines run on the same prompts, interleaved, comma-separated: vllm, vllm-ngram, "
                        "vllm-suffix, vllm-hsd (vLLM with our proposer), vllm-eagle3; needs `make vllm-setup`")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("tune", help="measure verification cost vs tree size on this device (for budget='auto')")
    _add_model_args(p)
    p.add_argument("--context", type=int, default=512, help="cache length the trees are verified on")
    p.set_defaults(func=_cmd_tune)

    from hsd_rag.training.cli import add_eval_parser
    from hsd_rag.training.cli import add_parser as add_train_head_parser

    add_train_head_parser(sub)  # `hsd-rag train-head`
    add_eval_parser(sub)  # `hsd-rag eval-head`

    p = sub.add_parser("qa", help="answer a question over a folder of documents (streams the answer + stats)")
    _add_model_args(p)
    p.add_argument("folder", help="folder of .txt/.md/.html(/.pdf) documents")
    p.add_argument("question", nargs="?", default=None, help="the question (omit for an interactive prompt)")
    p.add_argument("--k", type=int, default=3, help="chunks retrieved into the prompt")
    p.add_argument("--method", default=None, help="decoding method (default: best available)")
    p.add_argument("--budget", default="16")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.set_defaults(func=_cmd_qa)

    from hsd_rag.serve.settings import ServerSettings

    def d(name):  # the server's own default, so the flags never drift from ServerSettings
        return ServerSettings.model_fields[name].default

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, SSE)")
    _add_model_args(p)
    p.add_argument("--model", dest="target", default=None, help="same as --target: hub id, local dir or .gguf")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--engine", choices=("hf", "vllm"), default="hf",
                   help="hf: this package's decoder; vllm: vLLM with our drafter (needs scripts/setup_vllm.sh)")
    p.add_argument("--method", default=None, help="default decoding method of requests that give none")
    p.add_argument("--budget", default=None, help="default draft budget (int or 'auto'); vllm: speculative tokens")
    p.add_argument("--no-answer-history", action="store_true",
                   help="do not draft from earlier answers (requests fully isolated; outputs are the same either way)")
    p.add_argument("--max-queue", type=int, default=d("max_queue"), help="requests that may wait; more get 429 + Retry-After")
    p.add_argument("--api-key", default=os.environ.get("HSD_RAG_API_KEY"),
                   help="require `Authorization: Bearer KEY` on /v1 (default: $HSD_RAG_API_KEY, else none)")
    p.add_argument("--request-timeout", type=float, default=d("request_timeout_s"), help="deadline per request in s, queue included")
    p.add_argument("--max-tokens", type=int, default=d("default_max_tokens"), help="max_tokens of requests that give none")
    p.add_argument("--temperature", type=float, default=d("default_temperature"),
                   help="temperature of requests that give none (OpenAI's default 1; 0 = greedy)")
    p.add_argument("--served-model-name", default=None, help="the `model` name clients use (default: the model's)")
    p.add_argument("--drain-timeout", type=float, default=d("drain_timeout_s"), help="on shutdown, s open requests may take")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="longest prompt (default: context window)")
    p.add_argument("--max-documents", type=int, default=d("max_documents"), help="most `documents` per request")
    p.add_argument("--max-documents-chars", type=int, default=d("max_documents_chars"), help="most characters in a request's documents")
    p.add_argument("--max-body-bytes", type=int, default=d("max_body_bytes"), help="largest request body")
    p.set_defaults(func=_cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError, ImportError, ConnectionError) as err:
        print(f"hsd-rag: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
