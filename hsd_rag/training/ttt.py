r"""The training-time test (TTT): an EAGLE-3 head unrolled K steps on its own outputs, exactly as it drafts.

Notation: a sequence x_0..x_{T-1}, target features f_t (3H, entering layers 2, L//2, L-3 at position t).
At inference (drafters/eagle.py) head position t holds the pair (f_t, x_{t+1}) and its output predicts x_{t+2};
a draft at depth d+1 below the last accepted pair t is the pair (h of its parent, its parent's token) at
position t+d, and attends to every accepted pair (positions 0..t) plus its own ancestors.

The unroll reproduces that for every t at once (teacher forcing: tokens are the true next tokens):

    step 0:  g^0_t = fc(f_t),                    e^0_t = emb(x_{t+1}),    position t
    step j:  g^j_t = h^{j-1}_t (no fc),          e^j_t = emb(x_{t+1+j}),  position t + j
    h^j_t    = Layer(e^j_t, g^j_t; keys/values K^0_{0..t} ∪ {K^i_t : 1 <= i <= j})
    logits^j_t = lm_head(norm(h^j_t))  predicts x_{t+2+j}

Attention of the step-j query at t (one layer; q, k, v = projections of cat(norm(e), norm(g)) with RoPE at the
positions above, s = 1/sqrt(head_dim)):

    a^0_{t,u} = s·q^j_t·k^0_u   for u <= t   (the accepted prefix, causal)
    a^i_t     = s·q^j_t·k^i_t   for 1 <= i <= j   (the chain of the query's own earlier drafts: its ancestors)
    out^j_t   = softmax([a^0_{t,0..t}, a^1_t .. a^j_t]) · [v^0_{0..t}, v^1_t .. v^j_t]

so step 0 is ordinary causal attention and every later step adds j "diagonal" scores instead of a T x jT mask.
A later step only matters at positions whose chain reaches a scored row, so steps j >= 1 run on a set of
*query positions* only (queries and chain keys); their prefix keys are still all of step 0. This equals `head.forward` with a `HeadKVCache` holding steps 0..j-1 and a block mask (causal block, then one
diagonal block per earlier step); tests/test_training.py checks the two agree. Gradients flow through the
whole unroll (no detach between steps), as in the reference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from hsd_rag.heads.eagle3 import Eagle3Head

PAD_ID = 0  # token id fed where x_{t+1+j} runs past the sequence end (those positions carry no loss)


def shifted_tokens(input_ids: torch.Tensor, step: int) -> torch.Tensor:
    """x_{t+1+step} at every position t ([B, T]), padded with PAD_ID past the end."""
    shift = step + 1
    pad = input_ids.new_full((input_ids.shape[0], min(shift, input_ids.shape[1])), PAD_ID)
    return torch.cat((input_ids[:, shift:], pad), dim=1)


class UnrolledHead(nn.Module):
    """Wraps an `Eagle3Head`; `forward` returns the hidden states of every unroll step.

    A module of its own so that `accelerate` / DDP can wrap the whole unroll (the gradient sync hooks see one
    forward). The head's target embedding stays a plain reference, frozen and outside the gradient.

    `feature_scale` [3H] preconditions the target features: the head trains on f / scale. Target residual
    streams carry a few "massive activation" dimensions (~25,000 in SmolLM2's middle layers, vs ~1 elsewhere);
    an AdamW step of size lr on an `fc` weight multiplying such a value moves the output by lr * 25,000 and
    drowns everything else. Dividing by the per-dimension RMS of the training features makes every input
    dimension O(1); `fold_feature_scale` then writes fc <- fc / scale, so the saved head reads raw features
    and is exactly the trained function.
    """

    def __init__(self, head: Eagle3Head):
        super().__init__()
        self.head = head
        self.register_buffer("feature_scale", torch.ones(head.feature_size, device=head.fc.weight.device))

    @torch.no_grad()
    def fold_feature_scale(self) -> None:
        """Fold the preconditioning into `fc` (fc <- fc / scale) and reset the scale to 1."""
        self.head.fc.weight.div_(self.feature_scale.to(self.head.fc.weight.dtype)[None, :])
        self.feature_scale.fill_(1.0)

    @torch.no_grad()
    def unfold_feature_scale(self) -> None:
        """The inverse for a head that reads raw features (a saved one): fc <- fc * scale, so the unrolled head
        computes the same function on the preconditioned features."""
        self.head.fc.weight.mul_(self.feature_scale.to(self.head.fc.weight.dtype)[None, :])

    def forward(
        self,
        features: torch.Tensor,  # [B, T, 3H] target features
        input_ids: torch.Tensor,  # [B, T]
        rows: list[tuple[torch.Tensor, torch.Tensor]],  # per step: (batch index [N_j], slot [N_j])
        query_positions: torch.Tensor | None = None,  # [B, W] positions steps >= 1 run on; None = all
    ) -> list[torch.Tensor]:
        """Draft-vocabulary logits [N_j, V_draft] of every step j < len(rows) at the requested rows.

        A row's slot is its head position at step 0 and its index into `query_positions` at later steps.
        """
        outputs = self.hidden_states(features, input_ids, len(rows), query_positions)
        return [
            self.head.lm_head(self.head.norm(outputs[step][batch_index, slot]))
            for step, (batch_index, slot) in enumerate(rows)
        ]

    def hidden_states(
        self,
        features: torch.Tensor,
        input_ids: torch.Tensor,
        steps: int,
        query_positions: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """[h^0 [B, T, H], h^1 .. h^{steps-1} [B, W, H]] (W = query positions, all T by default)."""
        head = self.head
        batch, length = input_ids.shape
        positions = torch.arange(length, device=input_ids.device)[None].expand(batch, -1)
        if query_positions is None:
            query_positions = positions
        hidden = head.fuse(features / self.feature_scale.to(features.dtype))
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        outputs = []
        for step in range(steps):
            tokens = shifted_tokens(input_ids, step)
            step_positions = positions
            if step >= 1:  # from here on only the query positions matter
                if step == 1:
                    hidden = _gather(hidden, query_positions)
                tokens, step_positions = tokens.gather(1, query_positions), query_positions + step
            with torch.no_grad():  # the target embedding is frozen
                embeds = head.embed(tokens, like=hidden)
            hidden = self._layer(embeds, hidden, step_positions, keys, values, query_positions)
            outputs.append(hidden)
        return outputs

    def _layer(self, embeds, hidden, positions, keys: list, values: list, query_positions) -> torch.Tensor:
        layer = self.head.midlayer
        residual = hidden
        attn_in = torch.cat((layer.input_layernorm(embeds), layer.hidden_norm(hidden)), dim=-1)
        rope = self.head.rotary_emb(hidden, positions)
        hidden = residual + self._attention(attn_in, rope, keys, values, query_positions)
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    def _attention(self, x, rope, keys: list, values: list, query_positions) -> torch.Tensor:
        attn = self.head.midlayer.self_attn
        batch, length, _ = x.shape
        q = attn.q_proj(x).view(batch, length, attn.num_heads, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(batch, length, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(batch, length, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *rope)
        groups = attn.num_heads // attn.num_kv_heads
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)  # [B, heads, T, hd]
        keys.append(k)
        values.append(v)
        if len(keys) == 1:  # step 0: plain causal attention over the sequence
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = self._tree_attention(q, keys, values, query_positions)
        return attn.o_proj(out.transpose(1, 2).reshape(batch, length, attn.num_heads * attn.head_dim))

    @staticmethod
    def _tree_attention(q, keys: list, values: list, query_positions: torch.Tensor) -> torch.Tensor:
        """Causal scores over step 0 plus one diagonal score per later step, one softmax over all of them.

        q: [B, h, W, hd] at `query_positions` [B, W]; keys[0] / values[0]: [B, h, T, hd] (step 0, every
        position); keys[i] / values[i] for i >= 1: [B, h, W, hd] (the query positions).
        """
        scale = 1.0 / math.sqrt(q.shape[-1])
        length = keys[0].shape[-2]
        columns = torch.arange(length, device=q.device)
        future = (columns[None, None, :] > query_positions[:, :, None])[:, None]  # [B, 1, W, T]
        prefix = torch.matmul(q, keys[0].transpose(-1, -2)) * scale  # [B, h, W, T]
        prefix = prefix.masked_fill(future, torch.finfo(prefix.dtype).min)
        chain = torch.stack([(q * k).sum(-1) for k in keys[1:]], dim=-1) * scale  # [B, h, W, j]
        weights = torch.softmax(torch.cat((prefix, chain), dim=-1).float(), dim=-1).to(q.dtype)
        out = torch.matmul(weights[..., :length], values[0])  # [B, h, W, hd]
        chain_values = torch.stack(values[1:], dim=-2)  # [B, h, W, j, hd]
        return out + (weights[..., length:, None] * chain_values).sum(-2)


def _gather(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """hidden [B, T, H] at positions [B, W] -> [B, W, H]."""
    return hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
