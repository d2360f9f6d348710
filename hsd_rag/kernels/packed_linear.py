"""`nn.Linear` layers whose weights are kept pre-packed in oneDNN's blocked layout (CPU only).

Why: on CPU a decode step of a small model is almost all `aten::mm` over skinny inputs (1..64 rows), where the
stock kernel re-reads the row-major weight in a layout made for large batches. oneDNN's prepacked weights make
a verification forward 1.5-2.6x cheaper for 1..64 query tokens (SmolLM2-135M, fp32, one thread: 50 -> 33 ms
for one token, 126 -> 62 ms for 16), and the cheaper the multi-token forward, the bigger a draft tree pays.
On a CPU with AVX2 the packed copy is in 16-column panels for our own skinny GEMM (panel_gemm.py), which costs
1..6 rows as much as one; with AVX-512 only multiplies of a few rows take it, and a oneDNN copy serves the rest.
Where that kernel cannot be built on an AVX2-only CPU, a one-row multiply keeps the stock kernel, faster there
than oneDNN's (`one_row_on_stock`).

The swap is in place and reversible: each exact `nn.Linear` gets this subclass as its `__class__`, so module
names, parameters, tied weights, hooks and `state_dict` stay as they were, and `model.generate` runs on the same
kernels as our verification. The packed copy is derived state: rebuilt when the weight is replaced or edited in
place, dropped on copy/pickle, bypassed when autograd needs the weight or the input is not on CPU.
Results differ from the stock kernel only by float rounding (|delta logits| ~ 1e-4 on SmolLM2), the same order
as between the stock kernel's own 1-row and 16-row paths.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from contextvars import ContextVar
from functools import cache

import torch
from torch import nn
from torch.nn import functional as F

from hsd_rag.kernels.panel_gemm import pack_panels, panel_gemm_applies, panel_linear, panel_rows_limit
from hsd_rag.tensor_stamp import edit_stamp

log = logging.getLogger(__name__)

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)  # bf16 only on CPUs with native bf16 (see `packable`)
_STOCK = ContextVar("hsd_rag_stock_linears", default=False)  # set by `stock_linears()` for the current thread


@cache
def onednn_linear_available() -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        weight = torch.ones(4, 4)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        out = torch.ops.mkldnn._linear_pointwise(torch.ones(1, 4), packed, None, "none", [], "")
    except (RuntimeError, AttributeError):  # a build without the op
        return False
    return bool(torch.equal(out, torch.full((1, 4), 4.0)))


@cache
def one_row_on_stock() -> bool:
    """Whether a one-row multiply (a plain decode step, a tree of just the root) takes the stock kernel.

    On a CPU without AVX-512 oneDNN's packed kernel is slower than the stock one for one row once the weights
    stream from memory: on a 2-core AVX2 EPYC (SmolLM2-135M, one thread, 400 cached tokens) a 1-token forward
    took 91 ms packed against 78 ms stock, while packing still paid from two rows on (8 tokens 128 vs 143 ms,
    16 tokens 166 vs 181, a 300-token prefill 1.54 vs 1.73 s). With AVX-512 packing paid for one row too, and
    where the panel GEMM applies it beats both for one row.
    """
    return not torch.backends.cpu.get_cpu_capability().startswith("AVX512") and not panel_gemm_applies(torch.float32)


@cache
def packable(dtype: torch.dtype) -> bool:
    """Whether oneDNN packs weights of `dtype` here: bf16 needs native bf16 support (AVX512-BF16/AMX or
    AVX-NE-CONVERT); on an AVX2-only CPU oneDNN refuses it, so a bf16 model keeps the stock kernels there."""
    if dtype not in PACKABLE_DTYPES:
        return False
    if dtype == torch.bfloat16:
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return True


class PackedWeight:
    """A weight in the layout of the kernel that multiplies it: 16-column panels (panel_gemm.py) where that
    applies, else oneDNN's opaque blocked tensor. Where the panel kernel takes only a few rows (AVX-512,
    `panel_rows_limit`) a oneDNN copy is kept too, for prompts and large trees."""

    __slots__ = ("data", "out_features", "panels", "onednn", "max_panel_rows")

    def __init__(self, weight: torch.Tensor):
        weight = weight.detach()
        self.out_features = weight.shape[0]
        self.panels = panel_gemm_applies(weight.dtype)
        self.data = pack_panels(weight) if self.panels else _onednn_pack(weight)
        self.max_panel_rows = panel_rows_limit() if self.panels else None
        self.onednn = _onednn_pack(weight) if self.max_panel_rows is not None else None

    def multiply(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.panels:
            if self.onednn is None or x.numel() <= self.max_panel_rows * x.shape[-1]:
                return panel_linear(x, self.data, self.out_features, bias)
            return torch.ops.mkldnn._linear_pointwise(x, self.onednn, bias, "none", [], "")
        return torch.ops.mkldnn._linear_pointwise(x, self.data, bias, "none", [], "")


def _onednn_pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight, None)


def packed_copies(dtype: torch.dtype) -> int:
    """Packed copies a weight of `dtype` gets here (2: panels for few rows and oneDNN's for many)."""
    return 2 if panel_gemm_applies(dtype) and panel_rows_limit() is not None else 1


class PackedLinear(nn.Linear):
    """A `nn.Linear` that multiplies with a pre-packed copy of its weight on CPU (see module docstring)."""

    _packed: PackedWeight | None
    _packed_key: tuple | None
    _projection = None  # a FusedProjection shared with sibling layers that read the same input (optional)
    _projection_index = 0

    def _weight_key(self) -> tuple:
        """The weight's stamp (a new tensor has a new address, whatever its dtype or shape); read from
        `_parameters` directly because this runs on every multiply and Module.__getattr__ is slow."""
        return edit_stamp(self._parameters["weight"])

    def _pack(self) -> PackedWeight:
        with torch.no_grad():
            self._packed = PackedWeight(self.weight)
        self._packed_key = self._weight_key()
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if (
            not swapped_kernel_applies(x, weight)
            or x.dtype != weight.dtype
            or not packable(weight.dtype)
            or (x.numel() == x.shape[-1] and one_row_on_stock())
        ):
            return F.linear(x, weight, self.bias)
        if self._projection is not None:
            return self._projection.output(self._projection_index, x)
        packed = self._packed
        if packed is None or self._packed_key != self._weight_key():
            packed = self._pack()
        return packed.multiply(x, self.bias)

    def __getstate__(self):
        state = dict(self.__dict__)
        # derived state (opaque oneDNN tensors cannot even be copied or pickled): a copy packs its own when first used
        state["_packed"], state["_packed_key"], state["_projection"] = None, None, None
        return state


def _linears(model: nn.Module, cls: type) -> list[nn.Module]:
    return [m for m in model.modules() if type(m) is cls]


def packed_linear_count(model: nn.Module) -> int:
    """How many of the model's linear layers run on packed weights (0: stock kernels)."""
    return len(_linears(model, PackedLinear))


def _available_memory() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not Linux
        return None


def pack_linears(model: nn.Module, *, max_memory_share: float | None = 0.5) -> int:
    """Give every exact `nn.Linear` of a CPU model in fp32/bf16 packed weights; returns how many were packed.

    The packed copies cost as much memory as the linear weights (twice that where `packed_copies` is 2); with
    `max_memory_share` set, nothing is packed (and a message says why) when they would take more than that share
    of the memory available now. Models on another device, in other dtypes, or on a torch build without oneDNN are
    left as they are (returns 0).
    """
    linears = [m for m in _linears(model, nn.Linear) if m.weight.device.type == "cpu" and packable(m.weight.dtype)]
    if not linears or not onednn_linear_available():
        return 0
    extra = sum(m.weight.numel() * m.weight.element_size() * packed_copies(m.weight.dtype) for m in linears)
    available = _available_memory()
    if max_memory_share is not None and available is not None and extra > max_memory_share * available:
        log.info(
            "Not packing linear weights: the packed copies need %.1f GiB, more than %.0f%% of the %.1f GiB "
            "available; decoding runs on the stock kernels (slower on CPU).",
            extra / 2**30, 100 * max_memory_share, available / 2**30,
        )
        return 0
    for module in linears:
        module.__class__ = PackedLinear
        module._packed, module._packed_key = None, None
        module._pack()
    return len(linears)


def unpack_linears(model: nn.Module) -> int:
    """Undo `pack_linears`: every packed layer becomes a plain `nn.Linear` again; returns how many."""
    from hsd_rag.kernels.fused_projections import unfuse_projections

    unfuse_projections(model)
    packed = _linears(model, PackedLinear)
    for module in packed:
        module.__class__ = nn.Linear
        del module._packed, module._packed_key
        module.__dict__.pop("_projection", None)
        module.__dict__.pop("_projection_index", None)
    return len(packed)


def swapped_kernel_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """What every swapped-in linear kernel needs: input and weight on CPU, no autograd through the weight, and no
    `stock_linears()` block in this thread; otherwise the layer runs `F.linear` on its own weight."""
    return (
        x.device.type == "cpu"
        and weight.device.type == "cpu"
        and not (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))
        and not _STOCK.get()
    )


def stock_kernels_requested() -> bool:
    """Whether this thread runs inside `stock_linears()` (other swapped-in layers honour it too)."""
    return _STOCK.get()


@contextmanager
def stock_linears():
    """Run a block (in this thread) on the stock kernels, e.g. the HF `generate` baseline of a benchmark; the
    packed copies are kept for afterwards."""
    token = _STOCK.set(True)
    try:
        yield
    finally:
        _STOCK.reset(token)
