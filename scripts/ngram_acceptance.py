"""Measure how often the n-gram drafter's drafts are accepted per calibration bucket (match length x share).

The table it prints is what the n-gram calibrator's prior (hsd_rag/drafters/ngram_calibration.py) was fitted to:
train-side RAG prompts only (never the benchmark's held-out ones), greedy, the default target.

    python scripts/ngram_acceptance.py --per-language 20 --budget 24

`--source history` measures the drafts copied from earlier answers instead (the answer-history calibrator's
prior, hsd_rag/drafters/answer_history.py): each language's prompts run in order with one shared history.
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch

from hsd_rag import HybridSpecDecoder
from hsd_rag.bench.datasets import HELDOUT_FRACTION
from hsd_rag.data import format_messages, load_builtin, split
from hsd_rag.drafters.answer_history import AnswerHistory, history_calibrator
from hsd_rag.drafters.ngram import NgramDrafter
from hsd_rag.drafters.ngram_calibration import LENGTH_BUCKETS, SHARE_BUCKETS, NgramCalibrator

accepted: Counter = Counter()
verified: Counter = Counter()


class CountingCalibrator(NgramCalibrator):
    def record(self, bucket: int, was_accepted: bool) -> None:
        super().record(bucket, was_accepted)
        verified[bucket] += 1
        accepted[bucket] += bool(was_accepted)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-language", type=int, default=20)
    parser.add_argument("--budget", type=int, default=24)
    parser.add_argument("--languages", default="en,fr,es")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--source", choices=("ngram", "history"), default="ngram")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dec = HybridSpecDecoder.from_pretrained(head=None)
    history = args.source == "history"
    if not history:  # this decoder's "ngram" method counts every decided draft of the request's own index
        dec.drafter_factories = {**dec.drafter_factories,
                                 "ngram": lambda d, cfg: NgramDrafter(calibrator_factory=CountingCalibrator)}
    prior = history_calibrator() if history else NgramCalibrator()
    for lang in args.languages.split(","):
        if history:  # a fresh history per language; its shared calibrator counts every decided history draft
            dec.answer_history = AnswerHistory()
            dec.answer_history.calibrator = CountingCalibrator(memory=prior.memory)
        train, _ = split(load_builtin(lang), HELDOUT_FRACTION)
        for example in train[-args.per_language :]:
            dec.generate(format_messages(example), documents=list(example.documents), method="ngram",
                         budget=args.budget, max_new_tokens=96, answer_history=history)
    n_share = len(SHARE_BUCKETS)
    print("observed acceptance / prior mean (verified drafts) per match length (rows) x frequency share (columns)")
    print("| length | " + " | ".join(f"share >= {s}" for s in SHARE_BUCKETS) + " |")
    print("|---" * (n_share + 1) + "|")
    for li, length in enumerate(LENGTH_BUCKETS):
        cells = []
        for si in range(n_share):
            bucket = li * n_share + si
            n = verified[bucket]
            rate = f"{accepted[bucket] / n:.2f}" if n else "-"
            cells.append(f"{rate} / {prior.estimate(bucket):.2f} ({n})")
        print(f"| {length} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
