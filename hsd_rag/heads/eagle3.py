"""The EAGLE-3 draft head, parameter-for-parameter compatible with the official checkpoints.

Semantics (checked against the public reference, SafeAILab/EAGLE `eagle/model/cnets.py`):
- features are either the target's fused low/mid/high hidden states (3H, projected by `fc`, no bias) or the
  head's own previous output (H, used as is);
- one decoder layer: `residual = h`; attention over cat(input_layernorm(embed(token)), hidden_norm(h)) (2H wide);
  `h = residual + attn`; then the usual `h + mlp(post_attention_layernorm(h))` (SwiGLU);
- the returned hidden is that layer output (before `norm`); logits are `lm_head(norm(h))` over the draft
  vocabulary, mapped to target ids by `target = draft + d2t[draft]`; `t2d` marks target ids in the draft vocab.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from hsd_rag.heads.attention import HeadAttention, HeadKVCache
from hsd_rag.heads.base import DraftHead, HeadOutput, head_config

NUM_FEATURE_LAYERS = 3  # low, middle and high target layers are concatenated


class Eagle3Layer(nn.Module):
    """The single EAGLE-3 decoder layer (`midlayer`): attention sees the token embedding and the hidden side by side."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        hidden = config.hidden_size
        self.self_attn = HeadAttention(config, input_size=2 * hidden)
        self.mlp = LlamaMLP(config)
        self.hidden_norm = LlamaRMSNorm(hidden, eps=config.rms_norm_eps)
        self.input_layernorm = LlamaRMSNorm(hidden, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(hidden, eps=config.rms_norm_eps)

    def forward(self, embeds, hidden, rope, mask, cache: HeadKVCache | None) -> torch.Tensor:
        residual = hidden  # the residual stream is the hidden branch, not the embedding
        attn_in = torch.cat((self.input_layernorm(embeds), self.hidden_norm(hidden)), dim=-1)  # [B, T, 2H]
        hidden = residual + self.self_attn(attn_in, rope, mask, cache, layer=0)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class Eagle3Head(DraftHead):
    """EAGLE-3 head: `fc`, `midlayer`, `norm`, `lm_head` and the `d2t` / `t2d` vocabulary maps."""

    kind = "eagle3"

    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        if config.num_hidden_layers != 1:
            raise ValueError(f"An EAGLE-3 head has exactly one layer; the config says {config.num_hidden_layers}.")
        hidden = config.hidden_size
        draft_vocab = self.draft_vocab_size
        self.fc = nn.Linear(NUM_FEATURE_LAYERS * hidden, hidden, bias=False)
        self.midlayer = Eagle3Layer(config)
        self.norm = LlamaRMSNorm(hidden, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(hidden, draft_vocab, bias=False)
        # Default maps: the draft vocabulary is the first `draft_vocab` target ids.
        self.register_buffer("d2t", torch.zeros(draft_vocab, dtype=torch.long))
        self.register_buffer("t2d", torch.arange(config.vocab_size) < draft_vocab)

    @classmethod
    def from_target(cls, target: nn.Module, draft_vocab_size: int | None = None) -> Eagle3Head:
        """A freshly initialised head shaped for `target` (same attention geometry, RoPE and norm eps)."""
        config = head_config(target.config, draft_vocab_size=draft_vocab_size)
        head = cls(config).to(device=target.get_input_embeddings().weight.device, dtype=target.dtype)
        return head.bind_target(target)

    @property
    def draft_vocab_size(self) -> int:
        return getattr(self.config, "draft_vocab_size", None) or self.config.vocab_size

    @property
    def feature_size(self) -> int:
        return NUM_FEATURE_LAYERS * self.hidden_size

    def set_vocab_map(self, draft_to_target: torch.Tensor) -> None:
        """Install the draft vocabulary: `draft_to_target[d]` is the target id of draft id d (strictly increasing)."""
        ids = draft_to_target.to(self.d2t.device, torch.long)
        if ids.shape != self.d2t.shape:
            raise ValueError(f"expected {self.d2t.shape[0]} draft ids, got {tuple(ids.shape)}")
        self.d2t.copy_(ids - torch.arange(ids.shape[0], device=ids.device))
        self.t2d.zero_()
        self.t2d[ids.to(self.t2d.device)] = True

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids]

    def fuse(self, features: torch.Tensor) -> torch.Tensor:
        """[B, T, 3H] target features -> [B, T, H] through `fc`; the head's own [B, T, H] outputs pass through."""
        width = features.shape[-1]
        features = features.to(self.fc.weight.dtype)
        if width == self.feature_size:
            return self.fc(features)
        if width == self.hidden_size:
            return features
        raise ValueError(
            f"EAGLE-3 features must be {self.feature_size} (3 target layers) or {self.hidden_size} (the head's "
            f"own output) wide, got {width}."
        )

    def forward(
        self,
        features: torch.Tensor,  # [B, T, 3H] or [B, T, H]
        input_ids: torch.Tensor,  # [B, T] the token that follows each feature's position
        position_ids: torch.Tensor | None = None,  # [B or 1, T]; default continues the cache
        attention_mask: torch.Tensor | None = None,  # additive [B or 1, 1, T, past + T]; default causal
        cache: HeadKVCache | None = None,  # appended to in place
        logits_to_keep: int = 0,  # logits for the last n positions only; 0 = all
    ) -> HeadOutput:
        hidden = self.fuse(features)
        embeds = self.embed(input_ids, like=hidden)
        rope, mask = self.prepare(hidden, position_ids, attention_mask, cache)
        hidden = self.midlayer(embeds, hidden, rope, mask, cache)
        logits = self.lm_head(self.norm(self.keep_last(hidden, logits_to_keep)))
        return HeadOutput(hidden, logits)
