"""Batches of samples for the unrolled head: right-padded tensors and, per unroll step, the rows that carry loss.

A sample keeps teacher logits at positions p (each predicting x_{p+1}). Unroll step j at head position t
predicts x_{t+2+j}, so the row at p is scored at step j by head position t = p - 1 - j, whenever t >= 0.
Steps j >= 1 only run on the *query positions* some row needs (every p - 1 - j, j >= 1): the answer window
plus each prompt chain. Right padding needs no mask: padded positions come after every real one and causal
attention never looks forward; padded query slots repeat a real position and are never scored.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hsd_rag.training.features import Sample
from hsd_rag.training.ttt import PAD_ID

FIRST_PREDICTION_OFFSET = 2  # step 0 at position t predicts x_{t+2}


@dataclass
class StepRows:
    """The scored rows of one unroll step, concatenated over the batch."""

    batch_index: torch.Tensor  # [N] sample of each row
    slot: torch.Tensor  # [N] head position (step 0) or query slot (steps >= 1) that scores the row
    teacher: torch.Tensor  # [N, V_draft] teacher logits
    target_top1: torch.Tensor  # [N] the target's argmax (target ids)
    in_answer: torch.Tensor  # [N] bool: the predicted token belongs to the answer

    def to(self, device: torch.device) -> StepRows:
        return StepRows(*(x.to(device, non_blocking=True) for x in self.__dict__.values()))


@dataclass
class Batch:
    features: torch.Tensor  # [B, T, 3H]
    input_ids: torch.Tensor  # [B, T]
    query_positions: torch.Tensor  # [B, W] sorted positions that steps >= 1 run on
    steps: list[StepRows]

    def to(self, device: torch.device, feature_dtype: torch.dtype) -> Batch:
        return Batch(
            features=self.features.to(device=device, dtype=feature_dtype, non_blocking=True),
            input_ids=self.input_ids.to(device),
            query_positions=self.query_positions.to(device),
            steps=[rows.to(device) for rows in self.steps],
        )

    @property
    def rows(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(rows.batch_index, rows.slot) for rows in self.steps]


def query_positions(positions: torch.Tensor, steps: int) -> torch.Tensor:
    """Sorted head positions that steps 1 .. steps-1 must run on to score rows at `positions`."""
    needed = [positions - 1 - step for step in range(1, steps)]
    if not needed:
        return positions.new_zeros(0)
    flat = torch.cat(needed)
    return torch.unique(flat[flat >= 0])  # sorted


def collate(samples: Sequence[Sample], steps: int) -> Batch:
    """Right-pad `samples` into one batch and index the scored rows of each of `steps` unroll steps."""
    length = max(s.length for s in samples)
    width = samples[0].features.shape[-1]
    features = samples[0].features.new_zeros(len(samples), length, width)
    input_ids = torch.full((len(samples), length), PAD_ID, dtype=torch.long)
    queries = [query_positions(s.teacher_positions, steps) for s in samples]
    slots = max(1, max(q.numel() for q in queries))
    query = torch.zeros(len(samples), slots, dtype=torch.long)
    for b, sample in enumerate(samples):
        features[b, : sample.length] = sample.features
        input_ids[b, : sample.length] = sample.input_ids
        if queries[b].numel():
            query[b, : queries[b].numel()] = queries[b]
            query[b, queries[b].numel() :] = queries[b][-1]
    out = []
    for step in range(steps):
        parts = []
        for b, sample in enumerate(samples):
            head_position = sample.teacher_positions - 1 - step
            keep = head_position >= 0
            if not bool(keep.any()):
                continue
            slot = head_position[keep]
            if step:
                slot = torch.searchsorted(queries[b], slot)
            in_answer = sample.teacher_positions[keep] + 1 >= sample.answer_start
            parts.append(
                (torch.full_like(slot, b), slot, sample.teacher[keep], sample.target_top1[keep], in_answer)
            )
        if not parts:
            break  # sequences too short for deeper steps
        out.append(StepRows(*(torch.cat(column) for column in zip(*parts, strict=True))))
    return Batch(features, input_ids, query, out)
