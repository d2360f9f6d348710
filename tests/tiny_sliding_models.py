"""Tiny random targets with sliding-window attention, built in-process: all layers sliding (Mistral), interleaved
sliding/global (Gemma-2 style, Gemma-3's 5:1 pattern) and Qwen2 with `use_sliding_window` on its upper layers."""

from __future__ import annotations

import torch

SLIDING_ARCHS = ("mistral", "gemma2", "qwen2")


def sliding_model(arch: str, window: int, vocab: int = 96, layers: int = 4, hidden: int = 64, seed: int = 0):
    """A random causal LM whose sliding layers see `window` tokens (the query included)."""
    from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        tie_word_embeddings=False,
        sliding_window=window,
    )
    config = {
        "mistral": lambda: MistralConfig(**common),  # every layer sliding
        "gemma2": lambda: Gemma2Config(**common, head_dim=hidden // 4),  # sliding, global, sliding, global
        "qwen2": lambda: Qwen2Config(**common, use_sliding_window=True, max_window_layers=layers // 2),
        # five local layers per global one, local and global RoPE bases differ
        "gemma3": lambda: Gemma3TextConfig(**{**common, "num_hidden_layers": max(layers, 6)}, head_dim=hidden // 4),
    }[arch]()
    torch.manual_seed(seed)
    attn = "eager" if arch == "gemma2" else "sdpa"  # Gemma-2 has no sdpa path in transformers
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn)
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)  # sharpen random logits so greedy paths are not near-ties
    model.eval()
    return model
