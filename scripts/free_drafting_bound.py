"""How far the hybrid could get ahead of n-gram alone if the head's drafting cost nothing: the upper estimate.

The head is asked at every step (the gate off), so the fused tree holds everything it would add; its drafting
seconds are then taken off the wall time. No gate can beat that with this head: a gate only decides when to
pay for drafts, and here they are free. What is left over n-gram alone is the most the head's drafts are worth on
this machine, against the target's own verification cost (larger trees) and the prefill both methods pay:

    python scripts/free_drafting_bound.py --dataset builtin-en,builtin-fr,builtin-es --limit 15

Each variant runs on its own decoder (answers of one never drafted by the other), order alternating per prompt.
Figures for issue 10 (2026-12-03, one thread) are quoted in the README's Results.
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="builtin-en", help="comma-separated benchmark datasets")
    parser.add_argument("--limit", type=int, default=15, help="prompts per dataset (the benchmark's held-out ones)")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    from hsd_rag import HybridSpecDecoder
    from hsd_rag.bench.datasets import load_cases
    from hsd_rag.bench.runner import reversed_warmup_case, run_ours
    from hsd_rag.drafters.hybrid import AdaptiveFusion, HybridDrafter
    from hsd_rag.drafters.registry import DRAFTER_FACTORIES

    base = HybridSpecDecoder.from_pretrained()
    if base.head is None:
        raise SystemExit("No EAGLE head is shipped with this install: there is no head to bound.")
    always_ask = HybridSpecDecoder(base.model, base.tokenizer, head=base.head)
    sources = [DRAFTER_FACTORIES["ngram"], DRAFTER_FACTORIES["eagle"]]  # the default hybrid's, in its order
    always_ask.drafter_factories = {
        **DRAFTER_FACTORIES,
        "hybrid": lambda dec, cfg: HybridDrafter([make(dec, cfg) for make in sources], AdaptiveFusion(gated=False)),
    }
    runs = [(always_ask, "hybrid"), (HybridSpecDecoder(base.model, base.tokenizer, head=base.head), "ngram")]
    for dataset in [d.strip() for d in args.dataset.split(",") if d.strip()]:
        cases = load_cases(dataset, args.limit, base.tokenizer)
        for decoder, method in runs:  # warm-up on an unmeasured prompt
            run_ours(decoder, reversed_warmup_case(decoder, cases[0]), method, "auto", 8, 0.0, 0)
        totals = {method: dict(tokens=0, steps=0, draft=0.0, decode=0.0, wall=0.0, prefill=0.0) for _, method in runs}
        for i, case in enumerate(cases):
            for decoder, method in runs if i % 2 == 0 else runs[::-1]:
                record = run_ours(decoder, case, method, "auto", args.max_new_tokens, 0.0, 0)
                total = totals[method]
                total["tokens"] += record.new_tokens
                total["steps"] += record.steps
                total["draft"] += record.draft_s
                total["decode"] += record.decode_s
                total["wall"] += record.wall_s
                total["prefill"] += record.prefill_s
        hybrid, ngram = totals["hybrid"], totals["ngram"]
        free_wall = hybrid["wall"] - hybrid["draft"] + ngram["draft"]  # n-gram's own drafting is kept on both sides
        free_decode = hybrid["decode"] - hybrid["draft"] + ngram["draft"]
        print(
            f"{dataset}, {len(cases)} prompts: τ n-gram {ngram['tokens'] / ngram['steps']:.2f}, hybrid asking the "
            f"head every step {hybrid['tokens'] / hybrid['steps']:.2f}; target forward (ms, drafting excluded) "
            f"n-gram {1000 * (ngram['decode'] - ngram['draft']) / ngram['steps']:.1f}, hybrid "
            f"{1000 * (hybrid['decode'] - hybrid['draft']) / hybrid['steps']:.1f}; head drafting "
            f"{1000 * hybrid['draft'] / hybrid['steps']:.1f} ms/step; prefill {ngram['prefill'] / ngram['wall']:.0%} "
            f"of n-gram's wall time; hybrid over n-gram: as run {ngram['wall'] / hybrid['wall']:.3f}x, with free "
            f"drafting {ngram['wall'] / free_wall:.3f}x end to end, {ngram['decode'] / free_decode:.3f}x decode loop",
            flush=True,
        )


if __name__ == "__main__":
    main()
