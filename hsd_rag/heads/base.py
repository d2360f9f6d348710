"""What every EAGLE draft head shares: the borrowed target embedding, default positions and masks, RoPE.

A head reuses the target's input embedding (frozen, never saved with the head), so it holds a plain reference
that `state_dict`, `parameters()` and `.to()` do not see.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from hsd_rag.heads.attention import HeadKVCache, causal_mask


@dataclass
class HeadOutput:
    hidden: torch.Tensor  # [B, T, H] the layer output before the final norm: fed back as the next feature
    logits: torch.Tensor  # [B, keep, draft_vocab] logits of the last `keep` positions


class DraftHead(nn.Module):
    """Base of the EAGLE heads. Subclasses set `kind`, build their layers and implement `forward`."""

    kind = "base"

    def __init__(self, config):
        super().__init__()
        self.config = config
        # RoPE (including llama3 / yarn / dynamic scaling) comes from transformers, configured by the head config.
        self.rotary_emb = LlamaRotaryEmbedding(config)
        self.__dict__["_target_embedding"] = None  # a reference, deliberately not a registered submodule

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def bind_target(self, model: nn.Module) -> DraftHead:
        """Borrow the target's input embedding (and whatever else a subclass needs from it)."""
        embedding = model.get_input_embeddings()
        if embedding.weight.shape[-1] != self.hidden_size:
            raise ValueError(
                f"The target's embedding is {embedding.weight.shape[-1]}-wide but this head's hidden size is "
                f"{self.hidden_size}: the head was trained for a different target model."
            )
        self.__dict__["_target_embedding"] = embedding
        return self

    @property
    def target_embedding(self) -> nn.Module:
        embedding = self.__dict__["_target_embedding"]
        if embedding is None:
            raise RuntimeError("This head has no target embedding yet: call head.bind_target(target_model) first.")
        return embedding

    def embed(self, input_ids: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Target embeddings of `input_ids` [B, T] -> [B, T, H] on the device and dtype of `like`."""
        embedding = self.target_embedding
        vectors = embedding(input_ids.to(embedding.weight.device))
        return vectors.to(device=like.device, dtype=like.dtype)

    def new_cache(self) -> HeadKVCache:
        return HeadKVCache(self.num_layers)

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Map draft-vocabulary ids to target-vocabulary ids (identity unless the head has a reduced vocab)."""
        return draft_ids

    def prepare(
        self,
        hidden: torch.Tensor,  # [B, T, *] anything on the head's device/dtype
        position_ids: torch.Tensor | None,  # [B or 1, T]
        attention_mask: torch.Tensor | None,  # additive [B or 1, 1, T, past + T]
        cache: HeadKVCache | None,
    ):
        """RoPE cos/sin and the attention mask for one forward; defaults continue the cache causally."""
        batch, length = hidden.shape[:2]
        past = 0 if cache is None else len(cache)
        if position_ids is None:
            position_ids = torch.arange(past, past + length, device=hidden.device)[None].expand(batch, -1)
        if attention_mask is None and past and length > 1:
            attention_mask = causal_mask(length, past, hidden.dtype, hidden.device)
        rope = self.rotary_emb(hidden, position_ids)
        return rope, attention_mask

    @staticmethod
    def keep_last(hidden: torch.Tensor, logits_to_keep: int) -> torch.Tensor:
        """The positions whose logits are wanted: all when `logits_to_keep` is 0 (the HF convention)."""
        return hidden if logits_to_keep == 0 else hidden[:, -logits_to_keep:]

    def _apply(self, fn, recurse=True):
        # `.half()` / `.to(dtype)` would round RoPE's inverse frequencies; rebuild them in float32 instead.
        super()._apply(fn, recurse)
        inv_freq = self.rotary_emb.inv_freq
        if inv_freq.dtype != torch.float32:
            self.rotary_emb = LlamaRotaryEmbedding(self.config).to(inv_freq.device)
        return self


def head_config(target_config, draft_vocab_size: int | None = None, num_layers: int = 1) -> LlamaConfig:
    """A Llama-style head config copying the target's geometry, norm eps and RoPE (for any Llama-like target)."""
    text = target_config.get_text_config() if hasattr(target_config, "get_text_config") else target_config
    heads = text.num_attention_heads
    config = LlamaConfig(
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_attention_heads=heads,
        num_key_value_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        num_hidden_layers=num_layers,
        rms_norm_eps=text.rms_norm_eps,
        hidden_act=getattr(text, "hidden_act", "silu"),
        max_position_embeddings=text.max_position_embeddings,
        **_rope_fields(text),
        vocab_size=text.vocab_size,
        bos_token_id=text.bos_token_id,
        eos_token_id=text.eos_token_id,
        pad_token_id=getattr(text, "pad_token_id", None),
        tie_word_embeddings=False,
    )
    if draft_vocab_size is not None:  # EAGLE-3 only: the reduced draft vocabulary
        config.draft_vocab_size = draft_vocab_size
    return config


def _rope_fields(config) -> dict:
    """The target's RoPE settings as LlamaConfig keyword arguments (v5 `rope_parameters`, else legacy keys)."""
    rope = getattr(config, "rope_parameters", None)
    if rope:
        return {"rope_parameters": dict(rope)}
    legacy = {"rope_theta": getattr(config, "rope_theta", None), "rope_scaling": getattr(config, "rope_scaling", None)}
    return {key: value for key, value in legacy.items() if value is not None}
