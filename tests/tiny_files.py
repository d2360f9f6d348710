"""Tiny models written to disk the ways users hand them to us: a model directory and a `.gguf` file.

Both carry a ~3M-parameter random Llama and the real SmolLM2 tokenizer (with its chat template), so loading,
the CLI and the chat path run on real file formats in a few seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tests.tiny_models import SMOLLM2_VOCAB, tiny_model


def tiny_smollm2_model(layers: int = 2, hidden: int = 32):
    model = tiny_model("llama", vocab=SMOLLM2_VOCAB, layers=layers, hidden=hidden)
    model.generation_config.eos_token_id = 2  # <|im_end|>, as in SmolLM2-Instruct
    return model


def save_model_dir(path: Path, model=None) -> Path:
    """`save_pretrained` of a tiny model next to the SmolLM2 tokenizer: what a local checkpoint looks like."""
    from transformers import AutoTokenizer

    from hsd_rag.loading import default_snapshot

    model = model if model is not None else tiny_smollm2_model()
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(default_snapshot()).save_pretrained(path)
    return path


def _to_gguf_rotary(weights: np.ndarray, heads: int) -> np.ndarray:
    """HF q/k rows -> llama.cpp's rotary layout (what its converter writes; loaders undo it)."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(
        weights.shape
    )


def write_llama_gguf(path: Path, model) -> Path:
    """Write a float32 Llama `.gguf` (weights, hyper-parameters, byte-level BPE tokenizer, chat template)."""
    import gguf

    from hsd_rag.loading import default_snapshot

    snapshot = default_snapshot()
    tokenizer = json.loads((snapshot / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = tokenizer["model"]["vocab"]
    tokens = [""] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    special = {added["id"] for added in tokenizer["added_tokens"] if added.get("special")}
    merges = [" ".join(m) if isinstance(m, list) else m for m in tokenizer["model"]["merges"]]
    cfg = model.config
    rope = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", getattr(cfg, "rope_theta", 10000.0))

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(rope)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_vocab_size(len(tokens))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])  # 3 = control
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    from transformers import AutoTokenizer

    writer.add_chat_template(AutoTokenizer.from_pretrained(snapshot).chat_template)

    state = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    writer.add_tensor("output.weight", state["lm_head.weight"])
    names = {
        "attn_norm": "input_layernorm", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
        "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    for i in range(cfg.num_hidden_layers):
        layer = f"model.layers.{i}."
        for gguf_name, hf_name in names.items():
            writer.add_tensor(f"blk.{i}.{gguf_name}.weight", state[f"{layer}{hf_name}.weight"])
        q, k = state[f"{layer}self_attn.q_proj.weight"], state[f"{layer}self_attn.k_proj.weight"]
        writer.add_tensor(f"blk.{i}.attn_q.weight", _to_gguf_rotary(q, cfg.num_attention_heads))
        writer.add_tensor(f"blk.{i}.attn_k.weight", _to_gguf_rotary(k, cfg.num_key_value_heads))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
