"""Target features and teacher logits of one conversation: one target forward over prompt + answer.

For a sequence x_0 .. x_{T-1} whose answer starts at index `a`:
- `features` [T, 3H]: the inputs of decoder layers (2, L//2, L-3) at every position (`FeatureCapture`), the
  EAGLE-3 head's input;
- `teacher_positions` [R]: the positions p whose logits are kept: the answer positions a-1 .. T-2 (predicting
  x_a .. x_{T-1}) and, optionally, a few *prompt chains*: K consecutive prompt positions c+1 .. c+K, enough
  to score one full unroll started at head position c inside the prompt (see `TrainConfig.prompt_chains`);
- `teacher` [R, V_draft]: the target's logits at those positions, restricted to the draft vocabulary;
- `target_top1` [R]: the target's full-vocabulary argmax there (what greedy verification accepts), to score
  accuracy and to drop rows whose argmax lies outside the draft vocabulary.

Only those positions get logits (`logits_to_keep` with indices), so the cost is one prefill. Cached
samples are stored with `torch.save`, one file per conversation, features and logits in half precision, under a
name that hashes the token ids and the draft vocabulary (a different vocabulary never reads stale logits).
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from hsd_rag.heads.features import FeatureCapture

KEY_HEX_CHARS = 24


@dataclass
class Sample:
    """Everything the trainer needs about one conversation (CPU tensors)."""

    input_ids: torch.Tensor  # int64 [T] prompt + answer
    answer_start: int  # index of the first answer token
    features: torch.Tensor  # [T, 3H] half precision
    teacher_positions: (
        torch.Tensor
    )  # int64 [R] sorted positions p whose logits are kept (they predict x_{p+1})
    teacher: torch.Tensor  # [R, V_draft] half precision logits
    target_top1: torch.Tensor  # int64 [R] the target's argmax (target ids)

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])


def fit_length(prompt_ids: list[int], answer_ids: list[int], max_len: int) -> tuple[list[int], int]:
    """(prompt + answer cut to `max_len` tokens, answer start): the prompt loses its beginning first, then the
    answer its end; at least one prompt token stays (the head's first pair needs a feature before the answer)."""
    answer = answer_ids[: max(1, max_len - 1)]
    prompt = prompt_ids[-(max_len - len(answer)) :]
    return prompt + answer, len(prompt)


def teacher_positions(length: int, answer_start: int, chains: int, steps: int, seed: str) -> list[int]:
    """Answer positions a-1 .. T-2 plus `chains` random prompt chains of `steps` positions (seeded by `seed`)."""
    positions = set(range(answer_start - 1, length - 1))
    last_start = answer_start - 2 - steps  # a chain's rows c+1 .. c+steps stay before the answer rows
    if chains and last_start >= 0:
        rng = random.Random(seed)
        for start in rng.sample(range(last_start + 1), min(chains, last_start + 1)):
            positions.update(range(start + 1, start + 1 + steps))
    return sorted(positions)


def _autocast(device: torch.device):
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()  # not inference_mode: the tensors are later inputs of the head's autograd graph
def compute_sample(
    model,
    input_ids: list[int],
    answer_start: int,
    draft_to_target: torch.Tensor,
    dtype: torch.dtype = torch.float16,
    positions: list[int] | None = None,
) -> Sample:
    """One target forward -> `Sample`; `positions` default to the answer positions only."""
    if not 0 < answer_start < len(input_ids):
        raise ValueError(f"answer_start must be in [1, {len(input_ids) - 1}], got {answer_start}")
    if positions is None:
        positions = list(range(answer_start - 1, len(input_ids) - 1))
    device = model.get_input_embeddings().weight.device
    ids = torch.tensor([input_ids], device=device)
    keep = torch.tensor(positions, device=device)
    capture = FeatureCapture.for_eagle3(model)
    with capture, _autocast(device):
        out = model(input_ids=ids, logits_to_keep=keep, use_cache=False)
    features = capture.pop()[0]  # [T, 3H]
    logits = out.logits[0].float()  # [R, V]
    return Sample(
        input_ids=ids[0].cpu(),
        answer_start=answer_start,
        features=features.to(dtype).cpu(),
        teacher_positions=keep.cpu(),
        teacher=logits[:, draft_to_target.to(logits.device)].to(dtype).cpu(),
        target_top1=logits.argmax(-1).cpu(),
    )


def sample_key(
    input_ids: list[int],
    answer_start: int,
    draft_to_target: torch.Tensor,
    dtype: torch.dtype,
    extra: str = "",
) -> str:
    digest = hashlib.sha256()
    digest.update(torch.tensor(input_ids, dtype=torch.int64).numpy().tobytes())
    digest.update(str((answer_start, str(dtype), extra)).encode())
    digest.update(draft_to_target.to(torch.int64).cpu().numpy().tobytes())
    return digest.hexdigest()[:KEY_HEX_CHARS]


class FeatureStore:
    """Samples computed on demand, optionally cached on disk under `directory` (None = never cached).

    `prompt_chains` / `steps`: prompt chains per sample and their length (the unroll depth); chain starts are
    drawn from a hash of the sample, so they are the same in every run.
    """

    def __init__(
        self,
        model,
        draft_to_target: torch.Tensor,
        directory: str | Path | None,
        dtype: torch.dtype,
        prompt_chains: int = 0,
        steps: int = 1,
    ):
        self.model = model
        self.draft_to_target = draft_to_target.cpu()
        self.directory = None if directory is None else Path(directory)
        self.dtype = dtype
        self.prompt_chains = prompt_chains
        self.steps = steps

    def _key(self, input_ids: list[int], answer_start: int) -> str:
        extra = f"chains={self.prompt_chains},steps={self.steps}" if self.prompt_chains else ""
        return sample_key(input_ids, answer_start, self.draft_to_target, self.dtype, extra)

    def path(self, input_ids: list[int], answer_start: int) -> Path | None:
        if self.directory is None:
            return None
        return self.directory / f"{self._key(input_ids, answer_start)}.pt"

    def cached(self, input_ids: list[int], answer_start: int) -> bool:
        path = self.path(input_ids, answer_start)
        return path is not None and path.exists()

    def get(self, input_ids: list[int], answer_start: int) -> Sample:
        path = self.path(input_ids, answer_start)
        if path is not None and path.exists():
            try:
                return Sample(**torch.load(path, map_location="cpu", weights_only=True))
            except (RuntimeError, EOFError, TypeError):
                pass  # a truncated file from an interrupted run is recomputed
        positions = teacher_positions(
            len(input_ids), answer_start, self.prompt_chains, self.steps, self._key(input_ids, answer_start)
        )
        sample = compute_sample(
            self.model, input_ids, answer_start, self.draft_to_target, self.dtype, positions
        )
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
            torch.save(sample.__dict__, tmp)
            os.replace(tmp, path)  # atomic: concurrent processes never read half a file
        return sample
