"""Batches of samples for the unrolled head: right-padded tensors and, per unroll step, the rows that carry loss.

Sample b has answer start a_b and teacher rows r = 0 .. A_b - 1 (row r: the target's logits at position
a_b - 1 + r, predicting x_{a_b + r}). Unroll step j at head position t predicts x_{t+2+j}, so row r is scored
at step j by position t = a_b + r - 2 - j, for every r with t >= 0. Right padding needs no mask: padded
positions come after every real one and causal attention never looks forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hsd_rag.training.features import Sample
from hsd_rag.training.ttt import PAD_ID

FIRST_PREDICTION_OFFSET = 2  # step 0 at position t predicts x_{t+2}


@dataclass
class Batch:
    features: torch.Tensor  # [B, T, 3H]
    input_ids: torch.Tensor  # [B, T]
    rows: list[tuple[torch.Tensor, torch.Tensor]]  # per step: (batch index, position index) of scored rows
    teacher: list[torch.Tensor]  # per step: [N_j, V_draft] teacher logits of those rows
    target_top1: list[torch.Tensor]  # per step: [N_j] the target's argmax (target ids)
    window_start: int  # steps >= 1 only need positions >= this

    def to(self, device: torch.device, feature_dtype: torch.dtype) -> Batch:
        return Batch(
            features=self.features.to(device=device, dtype=feature_dtype, non_blocking=True),
            input_ids=self.input_ids.to(device),
            rows=[(b.to(device), t.to(device)) for b, t in self.rows],
            teacher=[x.to(device, non_blocking=True) for x in self.teacher],
            target_top1=[x.to(device) for x in self.target_top1],
            window_start=self.window_start,
        )


def collate(samples: Sequence[Sample], steps: int) -> Batch:
    """Right-pad `samples` into one batch and index the scored rows of each of `steps` unroll steps."""
    length = max(s.length for s in samples)
    width = samples[0].features.shape[-1]
    features = samples[0].features.new_zeros(len(samples), length, width)
    input_ids = torch.full((len(samples), length), PAD_ID, dtype=torch.long)
    for b, sample in enumerate(samples):
        features[b, : sample.length] = sample.features
        input_ids[b, : sample.length] = sample.input_ids
    rows, teacher, top1 = [], [], []
    for step in range(steps):
        batch_index, position_index, step_teacher, step_top1 = [], [], [], []
        for b, sample in enumerate(samples):
            first = max(0, FIRST_PREDICTION_OFFSET + step - sample.answer_start)  # first row with t >= 0
            count = sample.teacher.shape[0] - first
            if count <= 0:
                continue
            r = torch.arange(first, first + count)
            batch_index.append(torch.full((count,), b, dtype=torch.long))
            position_index.append(sample.answer_start + r - FIRST_PREDICTION_OFFSET - step)
            step_teacher.append(sample.teacher[first:])
            step_top1.append(sample.target_top1[first:])
        if not batch_index:
            break  # answers too short for deeper steps
        rows.append((torch.cat(batch_index), torch.cat(position_index)))
        teacher.append(torch.cat(step_teacher))
        top1.append(torch.cat(step_top1))
    earliest = min(s.answer_start for s in samples) - FIRST_PREDICTION_OFFSET - (steps - 1)
    return Batch(features, input_ids, rows, teacher, top1, window_start=max(0, earliest))
