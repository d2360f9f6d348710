"""A draft head's `nn.Linear` layers multiplied with int8 weights on CPU (fbgemm dynamic quantization).

Why: every EAGLE level reads all of the head's weights (~9 M for SmolLM2's: 35 MB in fp32) for a handful of
rows, so on a CPU without native bf16 matmuls (AVX2) a level is memory-bound at ~10 ms, a tenth of a target
forward, and the hybrid's gate can rarely afford to ask the head. Int8 weights with per-row scales (activations
quantized per call) make the head's multiplies 2-5x cheaper there (2-core AVX2 EPYC, one thread: the 8 x 576 ->
8192 lm_head 5.1 -> 1.1 ms; six head levels 47-57 -> 22 ms). A head's precision only changes which drafts it
proposes, never the output: the target verifies every draft. The target's own layers never use this (their
logits decide the output).

Same contract as PackedLinear: the swap is in place (`__class__`), the fp32 weight stays the parameter (so
`state_dict`, `save_head` and training see the head unchanged), the int8 copy is derived state rebuilt when the
weight is replaced or edited, dropped on copy/pickle, and bypassed off CPU, for other dtypes, under autograd or
inside `stock_linears()`.
"""

from __future__ import annotations

import warnings
from functools import cache

import torch
from torch import nn
from torch.nn import functional as F

from hsd_rag.kernels.packed_linear import swapped_kernel_applies
from hsd_rag.tensor_stamp import edit_stamp

# fbgemm's AVX2 kernels multiply uint8 activations by int8 weights in 16-bit pairs: 7-bit activations keep the
# sums from saturating (what torch's own dynamic quantized Linear asks for on x86).
REDUCE_RANGE = True
INT8_MAX = 127


def _prepack(weight: torch.Tensor, bias: torch.Tensor | None):
    """fbgemm packed params of `weight` in int8 with one symmetric scale per output row."""
    with torch.no_grad(), warnings.catch_warnings():
        # torch marks quantized tensors deprecated (a future release drops them); they work in the pinned one
        warnings.simplefilter("ignore")
        weight = weight.detach().float()
        scales = (weight.abs().amax(dim=1) / INT8_MAX).clamp_min(torch.finfo(torch.float32).tiny).double()
        zero_points = torch.zeros(weight.shape[0], dtype=torch.long)
        quantized = torch.quantize_per_channel(weight, scales, zero_points, 0, torch.qint8)
        return torch.ops.quantized.linear_prepack(quantized, None if bias is None else bias.detach().float())


@cache
def int8_linear_available() -> bool:
    """Whether this torch build runs fbgemm's dynamic int8 linear here (x86 with AVX2; not every build has it)."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return False
    try:
        weight = torch.eye(8)
        out = torch.ops.quantized.linear_dynamic(torch.ones(1, 8), _prepack(weight, None), REDUCE_RANGE)
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return bool(torch.allclose(out, torch.ones(1, 8), atol=0.05))


class Int8Linear(nn.Linear):
    """A `nn.Linear` that multiplies with an int8 copy of its weight on CPU (see module docstring)."""

    _int8 = None  # fbgemm packed params
    _int8_key: tuple | None = None

    def _weight_key(self) -> tuple:
        bias = self._parameters.get("bias")
        return edit_stamp(self._parameters["weight"]), None if bias is None else edit_stamp(bias)

    def _quantize(self):
        self._int8 = _prepack(self.weight, self.bias)
        self._int8_key = self._weight_key()
        return self._int8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if not swapped_kernel_applies(x, weight) or x.dtype != torch.float32 or weight.dtype != torch.float32:
            return F.linear(x, weight, self.bias)
        packed = self._int8
        if packed is None or self._int8_key != self._weight_key():
            packed = self._quantize()
        return torch.ops.quantized.linear_dynamic(x, packed, REDUCE_RANGE)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_int8"], state["_int8_key"] = None, None  # a copy quantizes its own weight when first used
        return state


def int8_linears(module: nn.Module) -> int:
    """Give every exact fp32 CPU `nn.Linear` of a draft head int8 weights; returns how many (0: none applied).

    Only for draft heads: modules it reaches through `module.modules()` only (a head's borrowed target embedding
    and lm_head are plain references, never submodules, so the target is never touched).
    """
    if not int8_linear_available():
        return 0
    linears = [
        m for m in module.modules()
        if type(m) is nn.Linear and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32
    ]
    for linear in linears:
        linear.__class__ = Int8Linear
        linear._quantize()
    return len(linears)


def int8_linear_count(module: nn.Module) -> int:
    return sum(1 for m in module.modules() if type(m) is Int8Linear)


def float_linears(module: nn.Module) -> int:
    """Undo `int8_linears`: every int8 layer becomes a plain `nn.Linear` again; returns how many."""
    layers = [m for m in module.modules() if type(m) is Int8Linear]
    for layer in layers:
        layer.__dict__.pop("_int8", None)
        layer.__dict__.pop("_int8_key", None)
        layer.__class__ = nn.Linear
    return len(layers)
