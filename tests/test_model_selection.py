"""Both HybridSpecLLM adapters choose their model like the anchors (`model=` / `from_model_id`), count tokens
with the model's own tokenizer, honour `timeout` as a real deadline and refuse `api_key`.

A tiny random Llama with the real SmolLM2 tokenizer is saved to a temporary folder and loaded by path, so the
loading path is the real one (HybridSpecDecoder.from_pretrained) without a download.
"""

from __future__ import annotations

import itertools

import pytest
from langchain_core.messages import HumanMessage, SystemMessage
from llama_index.core.llms import ChatMessage, MessageRole

import hsd_rag.integrations_common as common
from hsd_rag import HybridSpecDecoder
from hsd_rag.integrations_common import DeadlineStream
from hsd_rag.langchain import HybridSpecLLM
from hsd_rag.llama_index import HybridSpecLLM as LlamaIndexLLM
from tests.tiny_models import smollm2_chat_decoder

SMOLLM2_VOCAB = 49152
SHORT = 8  # new tokens per generation
CUT = 3  # tokens before a counting clock passes the deadline
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def chat_decoder():
    """A ~3M-parameter random Llama over the real SmolLM2 tokenizer (so the chat template is the real one)."""
    return smollm2_chat_decoder()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, chat_decoder):
    folder = tmp_path_factory.mktemp("tiny-chat-model")
    chat_decoder.model.save_pretrained(folder)
    chat_decoder.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def reference(chat_decoder):
    return chat_decoder.generate([{"role": "user", "content": QUESTION}], max_new_tokens=SHORT)


@pytest.fixture
def loads(monkeypatch):
    """Every HybridSpecDecoder.from_pretrained call (the real one runs), with an empty process-wide cache."""
    calls = []
    original = HybridSpecDecoder.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        calls.append((args, kwargs))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(common, "_decoders", {})
    monkeypatch.setattr(HybridSpecDecoder, "from_pretrained", classmethod(counting))
    return calls


# ---- model selection ---------------------------------------------------------------------------------------


def test_model_by_path_loads_lazily_once_and_is_shared(model_dir, reference, loads):
    path = str(model_dir)
    first = HybridSpecLLM(model=path, head=None, max_new_tokens=SHORT)
    second = HybridSpecLLM(model=path, head=None, max_new_tokens=SHORT)
    llama = LlamaIndexLLM(model=path, head=None, max_new_tokens=SHORT)
    assert loads == [] and first.model_name == model_dir.name  # constructing loads nothing
    assert first.invoke(QUESTION).content == reference.text  # the saved weights answer as the original
    assert second.invoke(QUESTION).content == reference.text
    assert llama.complete(QUESTION).text == reference.text
    assert loads == [
        ((path,), {"head": None, "device": None, "dtype": None})
    ]  # one load, shared by all three


def test_from_model_id_loads_now_in_both_adapters(model_dir, reference, loads):
    llm = HybridSpecLLM.from_model_id(
        str(model_dir), head="none", device="cpu", dtype="float32", max_tokens=SHORT
    )
    assert len(loads) == 1 and llm.max_new_tokens == SHORT and llm.device == "cpu"
    assert llm.invoke(QUESTION).content == reference.text
    llama = LlamaIndexLLM.from_model_id(str(model_dir), head="none", device="cpu", dtype="float32")
    assert len(loads) == 1  # same settings: the loaded decoder is shared
    assert llama.complete(QUESTION, max_new_tokens=SHORT).text == reference.text
    assert llama.metadata.context_window == 512


def test_a_missing_model_fails_clearly_at_construction(tmp_path, chat_decoder, loads):
    for adapter in (HybridSpecLLM, LlamaIndexLLM):
        for missing in (str(tmp_path / "no-such-model"), "./no-such-dir", "~/no-such.gguf", "weights.gguf"):
            with pytest.raises(ValueError, match="does not exist. Pass a local model directory"):
                adapter(model=missing)
            with pytest.raises(ValueError, match="does not exist"):
                adapter.from_model_id(missing)
        with pytest.raises(ValueError, match="either decoder"):
            adapter(decoder=chat_decoder, model="org/name")
    assert loads == []


def test_api_key_is_refused_with_a_reason(chat_decoder):
    for adapter in (HybridSpecLLM, LlamaIndexLLM):
        with pytest.raises(ValueError, match="local model, so there is no API key"):
            adapter(decoder=chat_decoder, api_key="sk-123")


# ---- token counting with the model's own tokenizer ---------------------------------------------------------


def test_langchain_token_counts_are_the_models(chat_decoder):
    llm = HybridSpecLLM(decoder=chat_decoder, max_new_tokens=2)
    text = "Gustave Eiffel designed the tower."
    assert llm.get_token_ids(text) == chat_decoder.tokenizer(text, add_special_tokens=False).input_ids
    assert llm.get_num_tokens(text) == len(llm.get_token_ids(text))
    messages = [SystemMessage("Answer briefly."), HumanMessage(QUESTION)]
    counted = llm.get_num_tokens_from_messages(messages)
    assert counted == llm.invoke(messages).usage_metadata["input_tokens"]  # exactly what the prompt cost
    with pytest.raises(ValueError, match="tool definitions"):
        llm.get_num_tokens_from_messages(messages, tools=[{"name": "add"}])


def test_llama_index_tokenizer_hook_is_the_models(chat_decoder):
    import llama_index.core
    from llama_index.core import Settings

    llm = LlamaIndexLLM(decoder=chat_decoder)
    text = "Gustave Eiffel designed the tower."
    assert llm.tokenizer(text) == chat_decoder.tokenizer(text, add_special_tokens=False).input_ids
    previous = Settings._tokenizer, llama_index.core.global_tokenizer
    try:
        Settings.tokenizer = llm.tokenizer  # LlamaIndex's hook takes it as it is
        assert Settings.tokenizer(text) == llm.tokenizer(text)
    finally:
        Settings._tokenizer, llama_index.core.global_tokenizer = previous  # both are process-wide


# ---- timeout: a per-call generation deadline --------------------------------------------------------------


@pytest.fixture
def counting_clock(monkeypatch):
    """A clock that advances one second per reading: with timeout=CUT the deadline passes after CUT tokens."""
    ticks = itertools.count()
    monkeypatch.setattr(DeadlineStream, "clock", staticmethod(lambda: float(next(ticks))))


def test_langchain_timeout_returns_what_was_generated(chat_decoder, reference, counting_clock):
    llm = HybridSpecLLM(decoder=chat_decoder, max_new_tokens=SHORT, timeout=CUT)
    message = llm.invoke(QUESTION)
    expected = chat_decoder.tokenizer.decode(reference.token_ids[:CUT], skip_special_tokens=True)
    assert message.content == expected
    assert message.response_metadata["finish_reason"] == "timeout"
    assert message.response_metadata["stop_reason"] == "timeout"
    assert message.usage_metadata["output_tokens"] == CUT
    assert message.usage_metadata["input_tokens"] == reference.stats.prompt_tokens
    assert not chat_decoder.gate.locked()  # the model was released
    chunks = list(llm.stream(QUESTION))
    assert (
        "".join(c.content for c in chunks) == expected
        and chunks[-1].response_metadata["finish_reason"] == "timeout"
    )
    untimed = llm.invoke(QUESTION, timeout=None)  # a per-call value replaces the field
    assert untimed.content == reference.text and untimed.response_metadata["finish_reason"] == "length"


def test_llama_index_timeout_returns_what_was_generated(chat_decoder, reference, counting_clock):
    llm = LlamaIndexLLM(decoder=chat_decoder, max_new_tokens=SHORT)
    response = llm.complete(QUESTION, timeout=CUT)
    assert response.text == chat_decoder.tokenizer.decode(reference.token_ids[:CUT], skip_special_tokens=True)
    assert response.raw["finish_reason"] == "timeout" and response.raw["usage"]["completion_tokens"] == CUT
    chat = llm.chat([ChatMessage(role=MessageRole.USER, content=QUESTION)], timeout=CUT)
    assert chat.message.content == response.text and chat.additional_kwargs["finish_reason"] == "timeout"
    assert llm.complete(QUESTION).text == reference.text  # no deadline by default


def test_a_deadline_that_passes_at_once_stops_after_the_first_token(chat_decoder, reference):
    """The real clock: a nanosecond deadline has passed by the time the first token exists."""
    message = HybridSpecLLM(decoder=chat_decoder, max_new_tokens=SHORT).invoke(QUESTION, timeout=1e-9)
    assert (
        message.usage_metadata["output_tokens"] == 1
        and message.response_metadata["finish_reason"] == "timeout"
    )
    assert message.content == chat_decoder.tokenizer.decode(reference.token_ids[:1], skip_special_tokens=True)


def test_bad_timeouts_fail_clearly(chat_decoder):
    with pytest.raises(ValueError, match="timeout"):
        HybridSpecLLM(decoder=chat_decoder, timeout=0)
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        HybridSpecLLM(decoder=chat_decoder).invoke(QUESTION, timeout=-1)
    with pytest.raises(ValueError, match="timeout must be a positive number"):
        LlamaIndexLLM(decoder=chat_decoder).complete(QUESTION, timeout="soon")
