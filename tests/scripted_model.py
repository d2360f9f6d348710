"""A real HF Llama whose greedy output is a chosen token script, and an EAGLE-3 head that drafts the same script.

Why: stop strings, EOS and characters split over byte-level tokens only matter where they land inside a
multi-token accepted step; with random weights nobody decides where that is. Here attention and MLP outputs are
zero, so every hidden state is the current token's embedding, and `lm_head` maps that embedding to the script's
next token: a bigram model built from ordinary `LlamaForCausalLM` weights (real cache, real masks, real
`generate`). The head is built the same way: `fc` passes the target feature (the embedding of token t) through,
its MLP maps it to the embedding of token t+1, and its `lm_head` equals the target's, so its drafts are right.
"""

from __future__ import annotations

import torch

SCORE = 10.0  # the script's next token gets this logit (times sqrt(hidden) after the final norm); others get 0
SMOLLM2_VOCAB = 49152


def successor_map(prompt_ids: list[int], script: list[int]) -> dict[int, int]:
    """token -> the token that follows it: the prompt's last token starts the script; the last one repeats."""
    chain = [prompt_ids[-1], *script]
    if len(set(chain)) != len(chain):
        raise ValueError("a scripted model needs every script token (and the prompt's last token) to be distinct")
    successor = dict(zip(chain, chain[1:], strict=False))
    successor[chain[-1]] = chain[-1]
    return successor


@torch.no_grad()
def scripted_model(successor: dict[int, int], vocab: int = SMOLLM2_VOCAB, hidden: int = 64, layers: int = 4,
                   eos_token_id: int = 2):
    """A `LlamaForCausalLM` whose argmax after token t is `successor[t]` at any position, whatever came before."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    slots = {token: i for i, token in enumerate(successor)}
    if len(slots) > hidden:
        raise ValueError(f"{len(slots)} distinct tokens need hidden >= {len(slots)}")
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1,
        eos_token_id=eos_token_id, pad_token_id=eos_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    embed = model.get_input_embeddings().weight
    embed.zero_()
    model.lm_head.weight.zero_()
    for token, slot in slots.items():
        embed[token, slot] = 1.0
        model.lm_head.weight[successor[token], slot] = SCORE
    model.generation_config.eos_token_id = eos_token_id
    model.eval()
    return model


@torch.no_grad()
def successor_head(model, successor: dict[int, int]):
    """An EAGLE-3 head for `scripted_model(successor)` whose drafts follow the script (see module docstring)."""
    from hsd_rag.heads import Eagle3Head

    head = Eagle3Head.from_target(model)
    hidden = model.config.hidden_size
    slots = {token: i for i, token in enumerate(successor)}
    eye = torch.eye(hidden)
    head.fc.weight.copy_(torch.cat([eye, torch.zeros(hidden, 2 * hidden)], dim=1))  # feature of token t, as is
    head.midlayer.self_attn.o_proj.weight.zero_()  # no attention: the residual stream carries the feature
    mlp = head.midlayer.mlp
    for weight in (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight):
        weight.zero_()
    gate = 20.0 / hidden**0.5  # silu(20) = 20 up to 4e-8: the gate is fully open on its own slot only
    for token, slot in slots.items():  # intermediate unit `slot` fires on token's embedding only
        mlp.gate_proj.weight[slot, slot] = gate
        mlp.up_proj.weight[slot, slot] = 1.0
        unit = torch.nn.functional.silu(torch.tensor(gate * hidden**0.5)) * hidden**0.5
        # add e(next) - e(token): the output hidden is the embedding of the next token
        mlp.down_proj.weight[:, slot] = (eye[slots[successor[token]]] - eye[slot]) / unit
    head.lm_head.weight.copy_(model.lm_head.weight)
    return head
