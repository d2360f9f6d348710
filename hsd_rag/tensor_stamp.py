"""A stamp that changes when a tensor is replaced or edited in place: what caches derived from weights key on."""

from __future__ import annotations

import torch


def edit_stamp(tensor: torch.Tensor) -> tuple[int, int | None]:
    """(storage address, in-place version). Tensors made under torch.inference_mode() keep no version counter,
    so for them only a replacement is noticed."""
    return tensor.data_ptr(), None if tensor.is_inference() else tensor._version
