"""Drafters with known behaviour, for proving the loop lossless independently of real draft sources."""

from __future__ import annotations

import random
import threading

from hsd_rag.drafters.base import DraftContext, StepOutcome
from hsd_rag.tree import SOURCE_EAGLE, SOURCE_NGRAM, TokenTree


class RandomTreeDrafter:
    """Proposes random trees; with `oracle` (the full expected sequence) it also plants the true path."""

    name = "random"

    def __init__(self, vocab: int, seed: int = 0, oracle: list[int] | None = None, width: int = 3, depth: int = 6):
        self.vocab, self.oracle, self.width, self.depth = vocab, oracle, width, depth
        self.rng = random.Random(seed)

    def start(self, prompt_ids, documents):
        pass

    def propose(self, context: DraftContext) -> TokenTree:
        tree = TokenTree.root(context.token_ids[-1])
        if self.oracle is not None:
            pos = len(context.token_ids)
            truth = self.oracle[pos : pos + self.depth]
            keep = self.rng.randint(0, len(truth))  # sometimes the true path is cut short
            tree.add_path(truth[:keep], [0.9] * keep, SOURCE_NGRAM)
        frontier = [0]
        for _ in range(self.depth):
            nxt = []
            for node in frontier:
                for _ in range(self.rng.randint(0, self.width)):
                    nxt.append(tree.add(node, self.rng.randrange(self.vocab), self.rng.random(), SOURCE_EAGLE))
            frontier = nxt
        return tree

    def observe(self, outcome: StepOutcome) -> None:
        pass

    def close(self) -> None:
        pass


def record_drafts(decoder) -> list[dict]:
    """Make `decoder` log the prompt and documents every drafter starts with (its own copy of the factories)."""
    seen: list[dict] = []
    lock = threading.Lock()

    def wrap(factory):
        def make(dec, cfg):
            drafter = factory(dec, cfg)
            start = drafter.start

            def recording_start(prompt_ids, documents):
                decode = dec.tokenizer.decode
                with lock:
                    seen.append({"prompt": decode(prompt_ids), "documents": [decode(d) for d in documents]})
                return start(prompt_ids, documents)

            drafter.start = recording_start
            return drafter

        return make

    decoder.drafter_factories = {name: wrap(f) for name, f in type(decoder).drafter_factories.items()}
    return seen
