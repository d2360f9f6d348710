"""A/B of our methods' decode loops on the same prompts: τ, ms per target forward and where it goes.

`hsd-rag bench` compares end to end, prefill included, one pass per method, so two methods whose decode loops
differ by a few % land within this box's run-to-run drift. This script runs only our decoder, alternating the
methods' order prompt by prompt, for several passes, with the earlier-answers index off (a method must not
draft from the answer another method just gave to the same prompt), and reports the decode loop alone:

    python scripts/ab_decode.py --dataset builtin-en --methods hybrid,ngram --passes 2

Figures for issue 10 (2026-12-02, one thread) are quoted in the README's Results.
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="builtin-en")
    parser.add_argument("--methods", default="hybrid,ngram", help="comma-separated decoder methods")
    parser.add_argument("--budget", default="auto")
    parser.add_argument("--limit", type=int, default=5, help="prompts (the benchmark's held-out ones)")
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    from hsd_rag import HybridSpecDecoder
    from hsd_rag.bench.datasets import load_cases
    from hsd_rag.bench.runner import NO_HISTORY_SUFFIX, run_ours
    from hsd_rag.bench.summary import summarize

    decoder = HybridSpecDecoder.from_pretrained()
    variants = [m.strip() + NO_HISTORY_SUFFIX for m in args.methods.split(",") if m.strip()]
    budget = args.budget if args.budget == "auto" else int(args.budget)
    cases = load_cases(args.dataset, args.limit, decoder.tokenizer)
    for variant in variants:  # warm-up, not measured
        run_ours(decoder, cases[0], variant, budget, 8, 0.0, 0)
    records = []
    for run in range(args.passes):
        for i, case in enumerate(cases):
            for variant in variants if (run + i) % 2 == 0 else variants[::-1]:
                records.append(run_ours(decoder, case, variant, budget, args.max_new_tokens, 0.0, 0))
    print(f"{args.dataset}, budget {args.budget}, {len(cases)} prompts x {args.passes} passes, "
          f"{args.threads} thread(s), answer history off:")
    for s in summarize(records):
        per_step = 1000 / max(s.steps, 1)
        print(
            f"{s.method.removesuffix(NO_HISTORY_SUFFIX):>14}: {s.new_tokens} tokens in {s.steps} forwards, "
            f"τ {s.tau:.2f}, {per_step * s.decode_s:.1f} ms per forward (draft {per_step * s.draft_s:.1f}, verify "
            f"{per_step * s.verify_s:.1f}, other {per_step * s.other_s:.1f}), "
            f"{s.decode_tokens_per_s:.1f} decode tokens/s"
        )


if __name__ == "__main__":
    main()
