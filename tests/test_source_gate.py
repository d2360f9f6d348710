"""Cost-aware drafting: a costly source is asked only while its drafts pay for their drafting cost."""

from __future__ import annotations

from hsd_rag.budget import CostProfile
from hsd_rag.drafters.base import DraftContext
from hsd_rag.drafters.hybrid import AdaptiveFusion
from hsd_rag.drafters.source_gate import FIRST_PROBE, MAX_PROBE, MIN_SAMPLES, SourceGate
from hsd_rag.tree import SOURCE_EAGLE, SOURCE_NGRAM, TokenTree

ROOT = 7
CPU = CostProfile(tokens=[1, 8, 16, 64], relative_cost=[1.0, 1.5, 1.8, 3.5],
                  draft_costs={"eagle": {"fixed": 0.1, "per_level": 0.1}})


class ChainDrafter:
    """Proposes one chain of known scores; counts how often it was asked."""

    def __init__(self, name: str, source: int, tokens: list[int], scores: list[float], levels: int = 0):
        self.name, self.source, self.tokens, self.scores = name, source, tokens, scores
        self.calls, self.levels_drafted, self.levels = 0, 0, levels
        self.floors: list[float] = []

    def start(self, prompt_ids, documents): ...
    def observe(self, outcome): ...
    def close(self): ...

    def propose(self, context: DraftContext) -> TokenTree:
        self.calls += 1
        self.levels_drafted += self.levels
        self.floors.append(context.min_score)
        tree = TokenTree.root(context.token_ids[-1])
        tree.add_path(self.tokens, self.scores, self.source)
        return tree


def ctx(budget: int, auto: bool = True) -> DraftContext:
    return DraftContext([5, ROOT], 1, budget, 0.0, CPU, auto)


def test_gate_explores_then_skips_with_doubling_probes():
    gate = SourceGate()
    for _ in range(MIN_SAMPLES):
        assert gate.should_ask(2.0)
        gate.learn(2.0, 1.5)  # asking lowered the rate
    asked_at = []
    for step in range(200):
        if gate.should_ask(2.0):
            asked_at.append(step)
            gate.learn(2.0, 1.5)
    gaps = [b - a for a, b in zip([-1, *asked_at], asked_at, strict=False)]
    assert gaps[0] == FIRST_PROBE and gaps[1] == 2 * FIRST_PROBE  # the skip streak doubles
    assert max(gaps) == MAX_PROBE and len(asked_at) < 200 // 8
    assert gate.skipped + gate.asked == 200 + MIN_SAMPLES


def test_gate_keeps_asking_while_it_pays_and_buckets_are_separate():
    gate = SourceGate()
    for _ in range(10):
        assert gate.should_ask(1.0)
        gate.learn(1.0, 1.6)
    for _ in range(MIN_SAMPLES):  # a strong free tree is another bucket: learned on its own
        gate.should_ask(3.0)
        gate.learn(3.0, 2.5)
    assert gate.should_ask(1.0) and not gate.should_ask(3.0)


def test_weak_costly_source_is_skipped_and_a_strong_one_kept():
    ngram = ChainDrafter("ngram", SOURCE_NGRAM, [1, 2, 3, 4, 5, 6], [0.95, 0.9, 0.86, 0.82, 0.78, 0.74])
    weak = ChainDrafter("eagle", SOURCE_EAGLE, [9, 9], [0.02, 0.01], levels=6)
    fusion = AdaptiveFusion()
    for _ in range(40):
        fusion.fuse(ctx(16), [ngram, weak])
    assert ngram.calls == 40 and weak.calls < 12  # a few probes only
    asked, skipped = fusion.gate_counts()["eagle"]
    assert asked == weak.calls and asked + skipped == 40

    none = ChainDrafter("ngram", SOURCE_NGRAM, [], [])
    strong = ChainDrafter("eagle", SOURCE_EAGLE, [1, 2, 3, 4], [0.9, 0.8, 0.7, 0.6], levels=4)
    fusion = AdaptiveFusion()
    for _ in range(40):
        tree = fusion.fuse(ctx(16), [none, strong])
    assert strong.calls == 40 and tree.tokens == [ROOT, 1, 2, 3, 4]


def test_costly_source_gets_the_free_trees_entry_floor_and_a_fixed_budget_asks_everyone():
    ngram = ChainDrafter("ngram", SOURCE_NGRAM, list(range(1, 9)), [0.9 - 0.05 * i for i in range(8)])
    eagle = ChainDrafter("eagle", SOURCE_EAGLE, [20], [0.5], levels=1)
    AdaptiveFusion().fuse(ctx(4), [ngram, eagle])
    assert eagle.floors == [0.9 - 0.05 * 3]  # a draft must beat the 4th best n-gram draft to enter
    weak = ChainDrafter("eagle", SOURCE_EAGLE, [9], [0.01], levels=6)
    ungated, fixed, unknown = AdaptiveFusion(gated=False), AdaptiveFusion(), AdaptiveFusion()
    no_profile = DraftContext([5, ROOT], 1, 16, 0.0, None, True)  # costs unknown: ask everyone
    for _ in range(10):
        ungated.fuse(ctx(16), [ngram, weak])
        fixed.fuse(ctx(16, auto=False), [ngram, weak])  # the caller chose the tree size: fill it from all
        unknown.fuse(no_profile, [ngram, weak])
    assert weak.calls == 30


def test_a_decoders_gates_carry_what_they_learned_into_the_next_request():
    ngram = ChainDrafter("ngram", SOURCE_NGRAM, [1, 2, 3, 4, 5, 6], [0.95, 0.9, 0.86, 0.82, 0.78, 0.74])
    weak = ChainDrafter("eagle", SOURCE_EAGLE, [9, 9], [0.02, 0.01], levels=6)
    shared: dict = {}
    first = AdaptiveFusion(gates=shared)
    for _ in range(20):
        first.fuse(ctx(16), [ngram, weak])
    learned = weak.calls
    second = AdaptiveFusion(gates=shared)  # the next request of the same decoder
    assert second.gate_counts() == {"eagle": (0, 0)}  # per-request counters restart
    for _ in range(FIRST_PROBE - 1):
        second.fuse(ctx(16), [ngram, weak])
    assert weak.calls == learned  # skipped from its first step: no fresh exploration
    fresh, fresh_weak = AdaptiveFusion(), ChainDrafter("eagle", SOURCE_EAGLE, [9, 9], [0.02, 0.01], levels=6)
    for _ in range(FIRST_PROBE - 1):
        fresh.fuse(ctx(16), [ngram, fresh_weak])
    assert fresh_weak.calls == FIRST_PROBE - 1  # without the shared gates it explores again
