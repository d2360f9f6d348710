"""Where training runs: one process (CPU or one GPU), or several GPUs through `accelerate` when it is launched so.

A plain `python` / `hsd-rag train-head` run is a single process and never needs `accelerate launch`; under
`accelerate launch --multi_gpu` the same code gets one process per GPU, wraps the unrolled head in DDP and shards
the batches. Without `accelerate` installed everything still runs in one process.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


class Runtime:
    """Device, process rank / count and the few collective operations the trainer needs."""

    def __init__(self, device: torch.device):
        self.accelerator = None
        self.device = device
        self.rank, self.world = 0, 1
        try:
            from accelerate import PartialState
        except ImportError:
            return
        state = PartialState(cpu=device.type == "cpu")
        if state.num_processes > 1:  # launched by `accelerate launch`: one process per device
            from accelerate import Accelerator

            self.accelerator = Accelerator(mixed_precision="no")  # autocast is applied by the trainer
            self.device = self.accelerator.device
            self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        """bfloat16 autocast on CUDA, nothing elsewhere (CPU trains in the parameter dtype)."""
        if self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def prepare(self, module: nn.Module, optimizer: torch.optim.Optimizer):
        if self.accelerator is None:
            return module, optimizer
        return self.accelerator.prepare(module, optimizer)

    def unwrap(self, module: nn.Module) -> nn.Module:
        return module if self.accelerator is None else self.accelerator.unwrap_model(module)

    def backward(self, loss: torch.Tensor) -> None:
        if self.accelerator is None:
            loss.backward()
        else:
            self.accelerator.backward(loss)

    def clip(self, parameters, max_norm: float) -> torch.Tensor:
        if self.accelerator is None:
            return torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        return self.accelerator.clip_grad_norm_(parameters, max_norm)

    def wait(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over processes (identity in one process)."""
        if self.accelerator is None or not values:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        return self.accelerator.reduce(tensor, reduction="sum").tolist()
