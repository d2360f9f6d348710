"""Judging a trained head on prompts it never saw: τ of real EAGLE decoding and teacher-forced top-1 per depth.

- `measure_tau`: greedy `generate(method="eagle")` on held-out prompts; τ = generated tokens / target forwards
  over all prompts together (bonus token included), plus how deep each step's accepted path went.
- `measure_priors`: how often the head's drafts are accepted per (depth, head-probability) bucket, ranked by the
  head's own probabilities — the acceptance priors stored beside the head (hsd_rag.heads.acceptance_priors).
- `depth_accuracy`: the training-time-test statistics (top-1 agreement with the target at unroll depth
  1..K given a correct prefix) on answered conversations; the answers `measure_tau` produced are exactly the
  target's greedy answers, so they serve directly.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from hsd_rag.heads.acceptance_priors import AcceptancePriors
from hsd_rag.training.batches import collate
from hsd_rag.training.config import JUDGED_HELDOUT_PROMPTS
from hsd_rag.training.data import Conversation, encode
from hsd_rag.training.features import compute_sample, fit_length
from hsd_rag.training.loss import DepthStats, ttt_loss
from hsd_rag.training.ttt import UnrolledHead


@dataclass
class TauReport:
    """Greedy EAGLE decoding over a prompt set."""

    prompts: int = 0
    new_tokens: int = 0
    steps: int = 0
    accepted_by_depth: Counter = field(default_factory=Counter)  # steps whose accepted path reached depth d
    conversations: list[Conversation] = field(default_factory=list)  # prompts with the generated answers

    @property
    def tau(self) -> float:
        return self.new_tokens / self.steps if self.steps else 0.0

    def reach(self) -> list[float]:
        """Fraction of steps whose accepted path reached at least depth d, for d = 1, 2, ..."""
        deepest = max(self.accepted_by_depth, default=0)
        return [
            sum(n for d, n in self.accepted_by_depth.items() if d >= depth) / max(1, self.steps)
            for depth in range(1, deepest + 1)
        ]


PRIORS_OFFSET = JUDGED_HELDOUT_PROMPTS  # priors are measured on held-out prompts from here on


def heldout_rag_conversations(limit: int | None = None, lang: str = "en", offset: int = 0) -> list[Conversation]:
    """Benchmark (held-out) RAG prompts: never used by the training recipe."""
    from hsd_rag.bench.datasets import HELDOUT_FRACTION
    from hsd_rag.data import format_messages, load_builtin, split

    _, heldout = split(load_builtin(lang), HELDOUT_FRACTION)
    end = None if limit is None else offset + limit
    return [
        Conversation(
            id=e.id, messages=format_messages(e), documents=list(e.documents), source=f"heldout-{lang}"
        )
        for e in heldout[offset:end]
    ]


def measure_priors(decoder, conversations: list[Conversation], budget: int, max_new_tokens: int = 96,
                   source: str = "") -> AcceptancePriors:
    """Greedy EAGLE decoding ranked by the head's raw probabilities; the decided drafts counted per bucket."""
    from hsd_rag.drafters.eagle import EagleDrafter
    from hsd_rag.drafters.eagle_calibration import RawHeadScores

    total = AcceptancePriors.empty(source)
    counters: list[RawHeadScores] = []

    def counting_calibrator():
        counters.append(RawHeadScores(device=decoder.head.device))
        return counters[-1]

    original = decoder.drafter_factories
    decoder.drafter_factories = {  # this decoder's "eagle" method ranks by the raw head for the measurement
        **original, "eagle": lambda dec, cfg: EagleDrafter(dec.model, dec.head, calibrator_factory=counting_calibrator)
    }
    try:
        for conversation in tqdm(conversations, desc="acceptance priors"):
            decoder.generate(conversation.messages, conversation.documents, method="eagle", budget=budget,
                             max_new_tokens=max_new_tokens, temperature=0.0, answer_history=False)
            total.add(counters[-1].observed())
    finally:
        decoder.drafter_factories = original
    return total


def measure_tau(
    decoder, conversations: list[Conversation], budget: int, max_new_tokens: int = 128, method: str = "eagle"
) -> TauReport:
    """Greedy decoding of every prompt with `method`; the answers are stored on copies of the conversations."""
    report = TauReport()
    for conversation in tqdm(conversations, desc=f"tau({method}, budget {budget})"):
        result = decoder.generate(
            conversation.messages,
            conversation.documents,
            method=method,
            budget=budget,
            max_new_tokens=max_new_tokens,
            temperature=0.0,
        )
        report.prompts += 1
        report.new_tokens += result.stats.new_tokens
        report.steps += result.stats.steps
        report.accepted_by_depth.update(result.stats.accepted_by_depth)
        answered = Conversation(
            **{**conversation.__dict__, "answer": result.text, "answer_ids": result.token_ids}
        )
        report.conversations.append(answered)
    return report


@torch.no_grad()
def depth_accuracy(decoder, head, conversations: list[Conversation], steps: int = 7) -> DepthStats:
    """Teacher-forced top-1 agreement with the target per unroll depth on answered conversations."""
    model = head
    unrolled = UnrolledHead(model).eval()
    total = DepthStats()
    for conversation in tqdm(conversations, desc="per-depth top-1"):
        prompt_ids, answer_ids = encode(decoder, conversation)
        ids, start = fit_length(
            prompt_ids, answer_ids, decoder.context_window or len(prompt_ids) + len(answer_ids)
        )
        sample = compute_sample(decoder.model, ids, start, _draft_ids(model), torch.float32)
        batch = collate([sample], steps).to(model.device, model.fc.weight.dtype)
        logits = unrolled(batch.features, batch.input_ids, batch.rows, batch.query_positions)
        total.add(ttt_loss(logits, batch.steps, model.d2t, model.t2d, 1.0)[1])
    return total


def _draft_ids(head) -> torch.Tensor:
    return head.to_target_ids(torch.arange(head.draft_vocab_size, device=head.d2t.device)).cpu()
