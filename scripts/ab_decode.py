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
from dataclasses import dataclass

import torch


@dataclass
class Totals:
    decode_s: float = 0.0
    steps: int = 0
    tokens: int = 0
    draft_s: float = 0.0
    verify_s: float = 0.0
    other_s: float = 0.0

    def add(self, stats) -> None:
        self.decode_s += stats.total_s - stats.prefill_s
        self.steps += stats.steps
        self.tokens += stats.new_tokens
        self.draft_s += stats.draft_s
        self.verify_s += stats.verify_s
        self.other_s += stats.other_s

    def line(self, method: str) -> str:
        per_step = 1000 / max(self.steps, 1)
        return (
            f"{method:>14}: {self.tokens} tokens in {self.steps} forwards, τ {self.tokens / max(self.steps, 1):.2f}, "
            f"{per_step * self.decode_s:.1f} ms per forward (draft {per_step * self.draft_s:.1f}, verify "
            f"{per_step * self.verify_s:.1f}, other {per_step * self.other_s:.1f}), "
            f"{self.tokens / max(self.decode_s, 1e-9):.1f} decode tokens/s"
        )


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

    decoder = HybridSpecDecoder.from_pretrained()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    budget = args.budget if args.budget == "auto" else int(args.budget)
    cases = load_cases(args.dataset, args.limit, decoder.tokenizer)
    totals = {method: Totals() for method in methods}
    warmup = cases[0]
    for method in methods:
        decoder.generate(warmup.prompt, documents=warmup.documents, method=method, max_new_tokens=8,
                         answer_history=False)
    for run in range(args.passes):
        for i, case in enumerate(cases):
            order = methods if (run + i) % 2 == 0 else methods[::-1]
            for method in order:
                result = decoder.generate(case.prompt, documents=case.documents, method=method, budget=budget,
                                          max_new_tokens=args.max_new_tokens, temperature=0.0,
                                          answer_history=False)
                totals[method].add(result.stats)
    print(f"{args.dataset}, budget {args.budget}, {len(cases)} prompts x {args.passes} passes, "
          f"{args.threads} thread(s):")
    for method, total in totals.items():
        print(total.line(method))


if __name__ == "__main__":
    main()
