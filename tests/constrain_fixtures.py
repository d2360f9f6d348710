"""Tiny random models over a small JSON-shaped vocabulary, and the plain constrained decode they are held to.

The vocabulary has single characters plus a few merged punctuation tokens (`{"`, `":`, ` "`, `",`, `", "`), so
a grammar has several tokenizations of the same text and forced runs (e.g. `{"name": "`) span several tokens:
the grafting and pruning paths of `GrammarRule` are exercised, not just single-character masks.
"""

from __future__ import annotations

import torch

from hsd_rag import HybridSpecDecoder
from hsd_rag.constrain.engine import engine_for
from hsd_rag.constrain.formats import to_response_format
from tests.tiny_models import tiny_model

SPECIALS = ["<s>", "</s>"]  # ids 0 and 1: bos and eos, as in tiny_models
SINGLE_CHARS = list(' {}[]":,.-') + list("0123456789") + list("abcdefghijklmnopqrstuvwxyz")
MERGES = [("{", '"'), ('"', ":"), (" ", '"'), ('"', ","), ('",', ' "')]
JSON_VOCAB = SPECIALS + SINGLE_CHARS + ["".join(pair) for pair in MERGES]
MODEL_VOCAB = 64  # wider than the tokenizer (53): padded logits rows must never be allowed
EOS = 1

PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "bc", "def"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "ok"],
}
FORMATS = {
    "schema": PERSON_SCHEMA,
    "json_object": "json_object",
    "regex": {"type": "regex", "pattern": r"(ab|ba)+-[0-9]{2,5}\.(x|yz)"},
}


def json_tokenizer():
    """A real Hugging Face fast tokenizer (BPE over JSON_VOCAB), so the grammar engine reads it like any model's."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(JSON_VOCAB)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=MERGES, unk_token="<s>"))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="</s>")


def json_decoder(arch: str = "llama", seed: int = 0, **model_kwargs) -> HybridSpecDecoder:
    model = tiny_model(arch, vocab=MODEL_VOCAB, seed=seed, **model_kwargs)
    return HybridSpecDecoder(model, json_tokenizer())


def compiled_grammar(decoder: HybridSpecDecoder, response_format):
    """The xgrammar grammar of a response format, as the decoder compiles it."""
    return engine_for(decoder).compile(to_response_format(response_format))


def reference_greedy(decoder: HybridSpecDecoder, prompt: list[int], response_format, max_new_tokens: int):
    """The plain constrained decode: HF `generate(do_sample=False)` with xgrammar's own HF logits processor."""
    from xgrammar.contrib.hf import LogitsProcessor

    processor = LogitsProcessor(compiled_grammar(decoder, response_format))
    out = decoder.model.generate(
        torch.tensor([prompt]),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        logits_processor=[processor],
        eos_token_id=sorted(decoder.eos_token_ids),
        pad_token_id=EOS,
    )
    return out[0, len(prompt) :].tolist()
