"""Streamed text joins to exactly `result.text`, for byte-level BPE and byte-fallback (SentencePiece) vocabularies,
with stop strings, at O(1) decoding work per token."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hsd_rag import HybridSpecDecoder
from tests.tiny_models import tiny_model

PIECES = ["▁a", "b", "▁", "a", "▁the", "▁cat", "s", ".", "▁é"]


def byte_fallback_tokenizer():
    """A Llama-2/Mistral-style SentencePiece tokenizer: `<0xXX>` byte tokens for what the pieces don't cover."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    vocab = {token: i for i, token in enumerate(specials + byte_tokens + PIECES)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


BF = byte_fallback_tokenizer()
V = BF.get_vocab()


def ids_of(*tokens) -> list[int]:
    return [V[t] for t in tokens]


class Script:
    """A logits rule forcing the target's argmax onto a fixed token sequence (so the output is known)."""

    name = "script"

    def __init__(self, tokens: list[int]):
        self.tokens = tokens

    def start(self, prompt_ids):
        self.prompt_length = len(prompt_ids)

    def refine(self, tree):
        return tree

    def apply(self, tree, logits, history):
        forced = torch.full_like(logits, -1e4)
        for node in range(len(tree)):
            position = len(history) - self.prompt_length + tree.depths[node]
            forced[node, self.tokens[min(position, len(self.tokens) - 1)]] = 0.0
        return forced

    def advance(self, new_tokens):
        pass


def scripted_decoder(tokenizer, script: list[int]) -> HybridSpecDecoder:
    model = tiny_model("llama", vocab=len(tokenizer.get_vocab()), seed=2, layers=2, hidden=32)
    dec = HybridSpecDecoder(model, tokenizer)
    dec.eos_token_ids = set()
    dec.logits_rule_factories = (lambda d, cfg: Script(script),)
    return dec


EURO = ("▁a", "<0xE2>", "<0x82>", "<0xAC>", "b")  # " a€b": the € arrives as three byte tokens
SCRIPTS = {
    "euro": EURO,
    "mixed": ("▁the", "<0xC3>", "<0xA9>", "▁cat", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>", "s", "▁é", "."),
    "invalid-group": ("<0xC3>", "<0xA9>", "<0x41>", "<0xE2>", "b", "▁a"),  # HF re-decodes the group as U+FFFD
    "ends-mid-character": ("▁a", "b", "<0xE2>", "<0x82>"),
}


@pytest.mark.parametrize("name", SCRIPTS)
@pytest.mark.parametrize("method", ["vanilla", "ngram"])
def test_byte_fallback_stream_joins_to_result_text(name, method):
    script = ids_of(*SCRIPTS[name])
    dec = scripted_decoder(BF, script)
    document = BF.decode(script)  # n-gram drafts: several tokens per step, so pieces span steps
    kwargs = dict(max_new_tokens=len(script), method=method, documents=[document], budget=8)
    result = dec.generate([1, V["▁a"]], **kwargs)
    assert result.token_ids == script
    assert result.text == BF.decode(script, skip_special_tokens=True)
    stream = dec.stream([1, V["▁a"]], **kwargs)
    assert "".join(stream) == result.text
    pieces = list(dec.stream_tokens([1, V["▁a"]], **kwargs))
    assert "".join(p.text for p in pieces) == result.text
    assert all("\ufffd" not in p.text for p in pieces) or "\ufffd" in result.text


def test_stop_string_made_of_byte_tokens():
    script = ids_of(*EURO, "▁the", "▁cat")
    dec = scripted_decoder(BF, script)
    result = dec.generate([1, V["▁a"]], max_new_tokens=len(script), method="vanilla", stop=["€"])
    assert result.text == "a" and result.token_ids == script[:4]  # stopped at the byte that completed the €
    assert "".join(dec.stream([1, V["▁a"]], max_new_tokens=len(script), method="vanilla", stop=["€"])) == "a"


def test_decoding_work_per_token_is_bounded():
    """The old path re-decoded the whole output per token (~n^2/2 token decodes); now it is O(n)."""
    script = ids_of(*(["▁the", "▁cat", "<0xC3>", "<0xA9>", "s"] * 60))
    dec = scripted_decoder(BF, script)
    decoded = []
    original = BF.decode

    class Counting:
        def __getattr__(self, name):
            return getattr(BF, name)

        def decode(self, ids, **kwargs):
            decoded.append(len(ids))
            return original(ids, **kwargs)

    dec.tokenizer = Counting()
    result = dec.generate([1, V["▁a"]], max_new_tokens=len(script), method="vanilla", stop=["zzz"])
    assert result.text == BF.decode(script)
    assert sum(decoded) <= 12 * len(script)  # the whole-output decode at the end is len(script) of it


# ---- the incremental decoder against a full re-decode per token ------------------------------------------


def reference(tokenizer, ids, stops):
    """What decoding everything again after each token gives: (text cut before the first stop, tokens used)."""
    for k in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:k], skip_special_tokens=True)
        cuts = [i for s in stops if (i := text.find(s)) >= 0]
        if cuts:
            return text[: min(cuts)], k
    return tokenizer.decode(ids, skip_special_tokens=True), len(ids)


def streamed(tokenizer, ids, stops):
    from hsd_rag.streaming_text import StreamingText, byte_fallback_ids

    text = StreamingText(tokenizer, stops, byte_fallback_ids(tokenizer))
    pieces = []
    for token in ids:
        pieces.append(text.push(token))
        if text.stopped:
            break
    pieces.append(text.finish())
    assert "".join(pieces) == text.text
    return text.text, len(text.ids)


BF_POOL = [V[t] for t in PIECES] + [V["</s>"]] + [V[f"<0x{b:02X}>"] for b in (0x41, 0x62, 0xC3, 0xA9, 0xE2, 0x82, 0xAC, 0xF0, 0x9F, 0x98, 0x80, 0xBF)]
STOPS = st.lists(st.sampled_from(["a", "€", "b.", "é", " cat", "\ufffd", "s s"]), max_size=2)


@settings(max_examples=150, deadline=None)
@given(ids=st.lists(st.sampled_from(BF_POOL), min_size=1, max_size=30), stops=STOPS)
def test_byte_fallback_incremental_equals_full_decode(ids, stops):
    assert streamed(BF, ids, stops) == reference(BF, ids, stops)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from hsd_rag.loading import default_snapshot

    return AutoTokenizer.from_pretrained(default_snapshot())


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), stops=STOPS)
def test_byte_level_bpe_incremental_equals_full_decode(smollm2_tokenizer, data, stops):
    # ids from the whole vocabulary include partial UTF-8 byte tokens; a few common words make stops likely
    common = smollm2_tokenizer(" a cat sat é € b. s s").input_ids
    pool = st.one_of(st.integers(0, len(smollm2_tokenizer) - 1), st.sampled_from(common))
    ids = data.draw(st.lists(pool, min_size=1, max_size=30))
    assert streamed(smollm2_tokenizer, ids, stops) == reference(smollm2_tokenizer, ids, stops)
