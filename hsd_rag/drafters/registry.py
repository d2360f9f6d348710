"""Method name -> drafter for one request. The decode loop only ever sees the returned `Drafter`."""

from __future__ import annotations

from collections.abc import Callable

from hsd_rag.drafters.base import Drafter
from hsd_rag.drafters.hybrid import AdaptiveFusion, FixedFusion, HybridDrafter
from hsd_rag.drafters.ngram import NgramDrafter

NEEDS_HEAD = frozenset({"eagle", "hybrid", "hybrid-fixed"})


def _eagle(decoder):
    from hsd_rag.drafters.eagle import EagleDrafter

    return EagleDrafter(decoder.model, decoder.head)


def _ngram(decoder, cfg):
    """N-gram drafts from the request's documents + prompt + answer, and from earlier answers unless disabled.

    A seeded sampled request skips earlier answers: they change which drafts a step holds and so which random
    draws it makes, and the same seed must give the same text on every call.
    """
    seeded_sampling = cfg.seed is not None and not cfg.greedy
    history = getattr(decoder, "answer_history", None) if cfg.answer_history and not seeded_sampling else None
    return NgramDrafter(history=history)


DRAFTER_FACTORIES: dict[str, Callable] = {
    "ngram": _ngram,
    "eagle": lambda decoder, cfg: _eagle(decoder),
    "hybrid": lambda decoder, cfg: HybridDrafter(
        [_ngram(decoder, cfg), _eagle(decoder)], AdaptiveFusion(gates=getattr(decoder, "source_gates", None))
    ),
    # the prototype's baseline: as published, no earlier answers
    "hybrid-fixed": lambda decoder, cfg: HybridDrafter([NgramDrafter(), _eagle(decoder)], FixedFusion()),
}


def drafter_for(method: str, decoder, cfg) -> Drafter:
    return DRAFTER_FACTORIES[method](decoder, cfg)
