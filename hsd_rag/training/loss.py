r"""The TTT loss and per-depth accuracy.

For unroll step j with scored rows n (answer tokens, plus prompt-chain rows weighted by w_n = `prompt_weight`;
answer rows have w_n = 1):

    p_n = softmax(teacher logits of row n over the draft vocabulary)       (the target's distribution, restricted
                                                                             to the draft vocab and renormalised)
    m_n = [the target's full-vocabulary argmax of row n is in the draft vocab]
    L_j = sum_n w_n m_n CE(p_n, log_softmax(head logits_n)) / max(1, sum_n w_n m_n)
    L   = sum_j decay^j * L_j

Rows whose target argmax the head cannot even propose carry no loss (as in the reference). The reported
statistics cover answer rows only. Accuracy at depth j is over *all* answer rows: the head's argmax mapped to
target ids equals the target's argmax, i.e. the chance that a greedy draft at that depth is accepted given a
correct prefix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from hsd_rag.training.batches import StepRows


@dataclass
class DepthStats:
    """Sums over scored rows, per unroll depth, so several batches (or processes) add up exactly."""

    loss: list[float] = field(default_factory=list)  # sum of masked CE
    counted: list[int] = field(default_factory=list)  # rows with m_n = 1
    correct: list[int] = field(default_factory=list)  # rows where the head's argmax is the target's
    rows: list[int] = field(default_factory=list)  # all scored rows

    def add(self, other: DepthStats) -> None:
        for name in ("loss", "counted", "correct", "rows"):
            mine, theirs = getattr(self, name), getattr(other, name)
            mine.extend([0] * (len(theirs) - len(mine)))
            for j, value in enumerate(theirs):
                mine[j] += value

    def mean_loss(self) -> list[float]:
        return [loss / max(1, n) for loss, n in zip(self.loss, self.counted, strict=True)]

    def accuracy(self) -> list[float]:
        return [c / max(1, n) for c, n in zip(self.correct, self.rows, strict=True)]

    def weighted_loss(self, decay: float) -> float:
        return sum(decay**j * loss for j, loss in enumerate(self.mean_loss()))


def ttt_loss(
    logits: list[torch.Tensor],  # per step [N_j, V_draft]
    steps: list[StepRows],  # per step: teacher logits, target argmax, answer flags of the same rows
    d2t: torch.Tensor,  # [V_draft] draft -> target offsets
    t2d: torch.Tensor,  # [V] bool
    decay: float,
    prompt_weight: float = 0.0,
) -> tuple[torch.Tensor, DepthStats]:
    """(weighted loss to back-propagate, detached per-depth sums over answer rows)."""
    total = logits[0].new_zeros((), dtype=torch.float32)
    stats = DepthStats()
    for step, (step_logits, rows) in enumerate(zip(logits, steps, strict=True)):
        log_q = F.log_softmax(step_logits.float(), dim=-1)
        p = F.softmax(rows.teacher.float(), dim=-1)
        in_vocab = t2d[rows.target_top1].float()  # m_n
        answer = rows.in_answer.float()
        weight = in_vocab * (answer + prompt_weight * (1 - answer))  # w_n m_n
        ce = -(p * log_q).sum(-1)  # [N]
        total = total + decay**step * (ce * weight).sum() / weight.sum().clamp(min=1)
        with torch.no_grad():
            draft = step_logits.argmax(-1)
            correct = ((draft + d2t[draft]) == rows.target_top1).float() * answer
            stats.loss.append(float((ce * in_vocab * answer).sum()))
            stats.counted.append(int((in_vocab * answer).sum()))
            stats.correct.append(int(correct.sum()))
            stats.rows.append(int(answer.sum()))
    return total, stats
