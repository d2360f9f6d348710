"""Tiny random target models of the real architectures, built in-process (no network)."""

from __future__ import annotations

import torch

TINY_VOCAB = 96


def tiny_model(arch: str = "llama", vocab: int = TINY_VOCAB, seed: int = 0, layers: int = 4, hidden: int = 64):
    """A random causal LM of the given architecture, small enough to run hundreds of forwards in a test."""
    from transformers import (
        AutoModelForCausalLM,
        LlamaConfig,
        MistralConfig,
        Qwen2Config,
    )

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
    )
    config = {
        "llama": lambda: LlamaConfig(**common),
        "qwen2": lambda: Qwen2Config(**common),
        "mistral": lambda: MistralConfig(**common, sliding_window=None),
    }[arch]()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    # Sharpen the random logits so greedy paths are not dominated by near-ties.
    with torch.no_grad():
        model.lm_head.weight.mul_(4.0)
    model.eval()
    return model


class IdTokenizer:
    """A minimal tokenizer over integer ids: text is space-separated ids (enough for the decoder's API)."""

    eos_token_id = 1
    pad_token_id = 1
    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        class _Enc:
            pass

        enc = _Enc()
        enc.input_ids = [int(t) for t in text.split()]
        return enc

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(str(i) for i in ids if not (skip_special_tokens and i == self.eos_token_id))


SMOLLM2_VOCAB = 49152


def smollm2_chat_decoder(layers: int = 2, hidden: int = 32, remember_answers: bool = False,
                         reuse_prefixes: bool = False):
    """A ~3M-parameter random Llama over the real SmolLM2 tokenizer, so the chat template is the real one.

    The tokenizer comes from the embedded default model's snapshot, created on first use (offline, ~30 s).
    Earlier answers and prompt prefixes are not remembered unless asked: adapter tests compare the stats of two
    calls, and the answer-history draft source or the prefix cache would make the second call's steps or
    prefill depend on the first.
    """
    from transformers import AutoTokenizer

    from hsd_rag import HybridSpecDecoder
    from hsd_rag.drafters.answer_history import AnswerHistory
    from hsd_rag.loading import default_snapshot

    tokenizer = AutoTokenizer.from_pretrained(default_snapshot())
    model = tiny_model("llama", vocab=SMOLLM2_VOCAB, layers=layers, hidden=hidden)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    history = None if remember_answers else AnswerHistory(max_answers=0)
    return HybridSpecDecoder(model, tokenizer, answer_history=history, prefix_cache=reuse_prefixes)


def hf_greedy_text(decoder, messages, max_new_tokens: int) -> str:
    """What HF `generate(do_sample=False)` writes for chat `messages` with the decoder's model and chat template:
    the reference every "lossless" claim is checked against."""
    ids = torch.tensor([decoder.encode_prompt(messages)], device=decoder.model.device)
    out = decoder.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens)
    return decoder.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
