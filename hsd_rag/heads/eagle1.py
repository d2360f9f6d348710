"""The EAGLE-1/2 draft head (both generations share the architecture and checkpoint layout).

Semantics (checked against the public reference, SafeAILab/EAGLE `eagle/model/cnets1.py` and `ea_model.py`):
- the feature is the target's final hidden state *after* its final norm (the tensor fed to the target lm_head),
  or the head's own previous output when drafting further;
- `h = fc(cat(embed(token), feature))` with `fc` Linear(2H -> H) carrying a bias (no activation);
- plain Llama decoder layers `layers.{i}`, except that layer 0 has no `input_layernorm` (its input is `fc`'s);
- no final norm: the layer output is both the fed-back hidden and the input of the *target's* lm_head.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

from hsd_rag.heads.attention import HeadAttention, HeadKVCache
from hsd_rag.heads.base import DraftHead, HeadOutput, head_config


class Eagle1Layer(nn.Module):
    """A Llama decoder layer; the first one skips its input norm, as in the reference."""

    def __init__(self, config: LlamaConfig, index: int):
        super().__init__()
        self.index = index
        self.self_attn = HeadAttention(config, input_size=config.hidden_size)
        self.mlp = LlamaMLP(config)
        if index != 0:
            self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden, rope, mask, cache: HeadKVCache | None) -> torch.Tensor:
        attn_in = hidden if self.index == 0 else self.input_layernorm(hidden)
        hidden = hidden + self.self_attn(attn_in, rope, mask, cache, layer=self.index)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class Eagle1Head(DraftHead):
    """EAGLE-1/2 head: `fc` + `layers.*`; logits come from the target's own lm_head (borrowed, never saved)."""

    kind = "eagle1"

    def __init__(self, config: LlamaConfig, fc_bias: bool = True):
        super().__init__(config)
        hidden = config.hidden_size
        self.fc = nn.Linear(2 * hidden, hidden, bias=fc_bias)
        self.layers = nn.ModuleList(Eagle1Layer(config, i) for i in range(config.num_hidden_layers))
        self.__dict__["_target_lm_head"] = None

    @classmethod
    def from_target(cls, target: nn.Module, num_layers: int = 1, fc_bias: bool = True) -> Eagle1Head:
        """A freshly initialised head shaped for `target`."""
        head = cls(head_config(target.config, num_layers=num_layers), fc_bias=fc_bias)
        head = head.to(device=target.get_input_embeddings().weight.device, dtype=target.dtype)
        return head.bind_target(target)

    @property
    def draft_vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def feature_size(self) -> int:
        return self.hidden_size

    def bind_target(self, model: nn.Module) -> Eagle1Head:
        super().bind_target(model)
        lm_head = model.get_output_embeddings()
        if lm_head is None or lm_head.weight.shape[-1] != self.hidden_size:
            raise ValueError("EAGLE-1/2 heads need the target's lm_head over the same hidden size.")
        self.__dict__["_target_lm_head"] = lm_head
        return self

    @property
    def target_lm_head(self) -> nn.Module:
        lm_head = self.__dict__["_target_lm_head"]
        if lm_head is None:
            raise RuntimeError("This head has no target lm_head yet: call head.bind_target(target_model) first.")
        return lm_head

    def forward(
        self,
        features: torch.Tensor,  # [B, T, H] target final hidden (post-norm) or the head's own output
        input_ids: torch.Tensor,  # [B, T] the token that follows each feature's position
        position_ids: torch.Tensor | None = None,  # [B or 1, T]; default continues the cache
        attention_mask: torch.Tensor | None = None,  # additive [B or 1, 1, T, past + T]; default causal
        cache: HeadKVCache | None = None,  # appended to in place
        logits_to_keep: int = 0,  # logits for the last n positions only; 0 = all
    ) -> HeadOutput:
        if features.shape[-1] != self.hidden_size:
            raise ValueError(f"EAGLE-1/2 features must be {self.hidden_size} wide, got {features.shape[-1]}.")
        features = features.to(self.fc.weight.dtype)
        hidden = self.fc(torch.cat((self.embed(input_ids, like=features), features), dim=-1))  # [B, T, H]
        rope, mask = self.prepare(hidden, position_ids, attention_mask, cache)
        for layer in self.layers:
            hidden = layer(hidden, rope, mask, cache)
        lm_head = self.target_lm_head
        kept = self.keep_last(hidden, logits_to_keep)
        logits = lm_head(kept.to(device=lm_head.weight.device, dtype=lm_head.weight.dtype))
        return HeadOutput(hidden, logits.to(hidden.device))
