"""Drafters with known behaviour, for proving the loop lossless independently of real draft sources."""

from __future__ import annotations

import random
import threading

from hsd_rag.drafters.base import DraftContext, StepOutcome
from hsd_rag.tree import SOURCE_EAGLE, SOURCE_NGRAM, TokenTree

TRUE_PATH_SCORE = 0.9  # planted true nodes and their decoys; random nodes score uniformly in [0, 1)


class RandomTreeDrafter:
    """Proposes random trees; with `oracle` (the full expected sequence) it also plants the true path.

    The planted path never sits at nodes 1..k in order: the random part takes the low node ids, and every true
    node has a decoy sibling added just before it with the same score (ties keep the lower id, so a budget
    keeps the decoy too). Accepting the true path therefore skips rejected siblings at every level, which is
    what makes the cache rollback move rows.
    """

    name = "random"

    def __init__(self, vocab: int, seed: int = 0, oracle: list[int] | None = None, width: int = 3, depth: int = 6):
        self.vocab, self.oracle, self.width, self.depth = vocab, oracle, width, depth
        self.rng = random.Random(seed)
        self.accepted_paths: list[list[int]] = []  # accepted node ids of every step, root first

    def start(self, prompt_ids, documents):
        pass

    def propose(self, context: DraftContext) -> TokenTree:
        tree = TokenTree.root(context.token_ids[-1])
        frontier = [0]
        for _ in range(self.depth):
            nxt = []
            for node in frontier:
                for _ in range(self.rng.randint(0, self.width)):
                    nxt.append(tree.add(node, self.rng.randrange(self.vocab), self.rng.random(), SOURCE_EAGLE))
            frontier = nxt
        if self.oracle is not None:
            pos = len(context.token_ids)
            truth = self.oracle[pos : pos + self.depth]
            keep = self.rng.randint(0, len(truth))  # sometimes the true path is cut short
            parent = 0
            for token in truth[:keep]:
                decoy = (token + 1 + self.rng.randrange(self.vocab - 1)) % self.vocab
                tree.add(parent, decoy, TRUE_PATH_SCORE, SOURCE_EAGLE)
                parent = tree.add(parent, token, TRUE_PATH_SCORE, SOURCE_NGRAM)
        return tree

    def observe(self, outcome: StepOutcome) -> None:
        self.accepted_paths.append(list(outcome.accepted_nodes))

    def close(self) -> None:
        pass


def skips_siblings(paths: list[list[int]]) -> bool:
    """Whether some accepted path is not nodes 0..k in order, so the cache rollback had to move rows."""
    return any(path != list(range(len(path))) for path in paths)


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
