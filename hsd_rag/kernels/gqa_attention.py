"""SDPA attention that lets the kernel broadcast key/value heads (grouped-query attention) instead of copying them.

Why: transformers' "sdpa" path repeats every key/value head `num_key_value_groups` times (`repeat_kv`, a full copy
of the layer's cache) whenever a multi-token forward passes an attention mask, and a token-tree forward always
passes one. torch's CPU SDPA accepts `enable_gqa=True` with a mask and gives the same result bit for bit
(tests/test_fast_kernels.py), without the copy.

A causal prompt forward on CPU (a prefill: no mask, or exactly the causal mask) goes to our prefill kernel where it
builds (prefill_attention.py; fp32, more than 16 queries), else to SDPA in blocks of query rows (blocked_prefill.py);
a decode step's or draft tree's 1-16 queries go to our tree kernel where it builds (tree_attention.py; fp32 only,
float or bool masks).

Registered with transformers' AttentionInterface under `GQA_SDPA`, so the model classes stay as they are;
anything these paths do not cover (position biases, softcapping, attention weights, non-CPU tensors, a single
query the tree kernel does not take, any other unmasked forward) goes to transformers' own sdpa function unchanged.
"""

from __future__ import annotations

from torch.nn import functional as F

from hsd_rag.kernels.blocked_prefill import PREFILL_BLOCK, blocked_causal_attention, is_offset_causal_mask
from hsd_rag.kernels.prefill_attention import prefill_attention, prefill_attention_applies
from hsd_rag.kernels.tree_attention import MAX_QUERIES, tree_attention, tree_attention_applies

GQA_SDPA = "hsd_rag_gqa_sdpa"


def gqa_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                       **kwargs):
    """transformers' attention-function signature; query [b, h, q, d], key/value [b, kv_heads, k, d]."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _causal_prompt(module, query, key, attention_mask, dropout, is_causal, kwargs):
        if prefill_attention_applies(query, key, value):
            return prefill_attention(query, key, value, scaling), None
        if query.shape[2] > PREFILL_BLOCK:
            return blocked_causal_attention(query, key, value, scaling), None
    if tree_attention_applies(query, key, value, attention_mask, dropout, kwargs):
        return tree_attention(query, key, value, attention_mask, scaling), None
    if (
        getattr(module, "num_key_value_groups", 1) == 1
        or query.shape[2] == 1  # transformers folds the heads of a single query without copying
        or attention_mask is None
        or query.device.type != "cpu"
        or kwargs.get("position_bias") is not None
        or kwargs.get("softcap") is not None
        or kwargs.get("output_attentions", False)
    ):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                         scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def _causal_prompt(module, query, key, attention_mask, dropout, is_causal, kwargs) -> bool:
    """A causal prompt forward on CPU of more queries than the tree kernel takes: unmasked and causal as
    transformers' sdpa function decides `is_causal`, or masked by exactly the causal mask."""
    queries, keys = query.shape[2], key.shape[2]
    if (
        queries <= MAX_QUERIES
        or dropout
        or query.device.type != "cpu"
        or kwargs.get("position_bias") is not None
        or kwargs.get("softcap") is not None
        or kwargs.get("output_attentions", False)
    ):
        return False
    if attention_mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        return bool(causal) and queries == keys
    return is_offset_causal_mask(attention_mask, queries, keys)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(GQA_SDPA, gqa_sdpa_attention)  # idempotent: a dict update
    ALL_MASK_ATTENTION_FUNCTIONS.register(GQA_SDPA, sdpa_mask)  # the masks transformers builds are sdpa's


def use_gqa_attention(model) -> bool:
    """Switch a CPU model on transformers' "sdpa" attention with grouped KV heads to `GQA_SDPA`; True if it was.

    Other models (eager, flash, no grouped heads, not on CPU) are left as they are.
    """
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa" or model.device.type != "cpu":
        return False
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads, kv_heads = getattr(text, "num_attention_heads", None), getattr(text, "num_key_value_heads", None)
    if not heads or not kv_heads or heads == kv_heads:
        return False
    _register()
    try:
        model.set_attn_implementation(GQA_SDPA)
    except (ValueError, AttributeError, KeyError):  # an architecture that refuses custom attention functions
        return False
    return True


def use_stock_attention(model) -> None:
    """Undo `use_gqa_attention`."""
    if getattr(model.config, "_attn_implementation", None) == GQA_SDPA:
        model.set_attn_implementation("sdpa")
