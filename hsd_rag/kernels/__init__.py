"""Faster CPU kernels for the target's own layers, swapped in without changing any model class."""

from hsd_rag.kernels.packed_linear import (
    PackedLinear,
    pack_linears,
    packed_linear_count,
    stock_linears,
    unpack_linears,
)

__all__ = ["PackedLinear", "pack_linears", "packed_linear_count", "stock_linears", "unpack_linears"]
