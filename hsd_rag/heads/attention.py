"""Attention shared by the EAGLE draft heads: GQA + RoPE over the head's own KV cache, with any additive mask.

The heads draft token trees, so attention must accept an explicit mask (a node sees the cache and its own
ancestors only) and explicit position ids (a node's position is its depth, not its index). EAGLE-3 feeds 2H-wide
inputs (embedding and hidden side by side), EAGLE-1/2 H-wide ones; everything else is identical.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

_GROWTH = 2  # buffers grow geometrically so appending one draft level is amortised O(1) allocations


class HeadKVCache:
    """Keys/values of every head layer in growable buffers [B, kv_heads, capacity, head_dim].

    Appending a draft level and cropping back to the accepted prefix must be cheap: the buffers are only
    reallocated when they run out of room, and `crop` just moves the length.
    """

    def __init__(self, num_layers: int):
        self._keys: list[torch.Tensor | None] = [None] * num_layers
        self._values: list[torch.Tensor | None] = [None] * num_layers
        self._lengths = [0] * num_layers

    def __len__(self) -> int:
        return self._lengths[0]

    def length(self, layer: int = 0) -> int:
        return self._lengths[layer]

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append [B, kv_heads, T, head_dim] to `layer`; returns the layer's whole keys/values (views)."""
        old, new = self._lengths[layer], self._lengths[layer] + keys.shape[-2]
        buf_k, buf_v = self._keys[layer], self._values[layer]
        if buf_k is None or buf_k.shape[-2] < new:
            capacity = max(new, _GROWTH * (0 if buf_k is None else buf_k.shape[-2]))
            shape = (*keys.shape[:-2], capacity, keys.shape[-1])
            grown_k, grown_v = keys.new_empty(shape), values.new_empty(shape)
            if buf_k is not None and old:
                grown_k[..., :old, :] = buf_k[..., :old, :]
                grown_v[..., :old, :] = buf_v[..., :old, :]
            self._keys[layer], self._values[layer] = buf_k, buf_v = grown_k, grown_v
        buf_k[..., old:new, :] = keys
        buf_v[..., old:new, :] = values
        self._lengths[layer] = new
        return buf_k[..., :new, :], buf_v[..., :new, :]

    def crop(self, length: int) -> None:
        """Forget everything after the first `length` positions (e.g. the draft-only entries)."""
        if length < 0:
            raise ValueError(f"crop length must be >= 0, got {length}")
        self._lengths = [min(n, length) for n in self._lengths]


def causal_mask(length: int, past: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive mask [1, 1, length, past + length]: every new position sees the cache and earlier new positions."""
    rows = torch.arange(length, device=device)[:, None] + past
    cols = torch.arange(past + length, device=device)[None, :]
    mask = torch.zeros(length, past + length, dtype=dtype, device=device)
    return mask.masked_fill_(cols > rows, torch.finfo(dtype).min)[None, None]


class HeadAttention(nn.Module):
    """Llama attention (q/k/v/o projections, GQA, RoPE) whose input width may differ from the hidden size."""

    def __init__(self, config, input_size: int):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        bias = getattr(config, "attention_bias", False)
        self.q_proj = nn.Linear(input_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(input_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(input_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(
        self,
        x: torch.Tensor,  # [B, T, input_size]
        rope: tuple[torch.Tensor, torch.Tensor],  # cos, sin [B, T, head_dim]
        mask: torch.Tensor | None,  # additive [B or 1, 1, T, past + T]; None means plain causal, no past
        cache: HeadKVCache | None,
        layer: int,
    ) -> torch.Tensor:  # [B, T, hidden]
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *rope)
        if cache is not None:
            k, v = cache.append(layer, k, v)  # [B, kv_heads, past + T, head_dim]
        groups = self.num_heads // self.num_kv_heads
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        if mask is not None:
            mask = mask.to(q.dtype)
        causal = mask is None and length > 1
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)  # [B, heads, T, hd]
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim))
