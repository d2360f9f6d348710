"""HybridSpecLLM as a LlamaIndex LLM, with real llama-index-core objects and a tiny random model.

Every answer is compared with `HybridSpecDecoder.generate` on the same chat messages: the adapter adds nothing.
"""

from __future__ import annotations

import pytest
from llama_index.core.base.llms.types import ImageBlock, TextBlock
from llama_index.core.callbacks import CallbackManager, CBEventType, EventPayload, LlamaDebugHandler
from llama_index.core.llms import ChatMessage, ChatResponse, CompletionResponse, MessageRole
from llama_index.core.prompts import PromptTemplate

from hsd_rag import HybridSpecDecoder
from hsd_rag.llama_index import HybridSpecLLM
from tests.tiny_models import hf_greedy_text, smollm2_chat_decoder

SMOLLM2_VOCAB = 49152
SHORT = 10  # new tokens per generation
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def chat_decoder():
    """A ~3M-parameter random Llama over the real SmolLM2 tokenizer (so the chat template is the real one)."""
    return smollm2_chat_decoder()


@pytest.fixture
def llm(chat_decoder):
    return HybridSpecLLM(decoder=chat_decoder, max_new_tokens=SHORT)


@pytest.fixture(scope="module")
def reference(chat_decoder):
    """What the decoder alone answers to QUESTION as one user message (HF generate's text: lossless)."""
    messages = [{"role": "user", "content": QUESTION}]
    result = chat_decoder.generate(messages, max_new_tokens=SHORT)
    assert result.text == hf_greedy_text(chat_decoder, messages, SHORT)
    return result


CHAT = [ChatMessage(role=MessageRole.USER, content=QUESTION)]
TIMING_STATS = ("prefill_s", "draft_s", "verify_s", "other_s", "total_s", "tokens_per_s", "queue_s")


def timings(raw: dict) -> dict:
    """The wall-clock fields of a response's stats (they differ between two runs of the same generation)."""
    return {key: raw["hsd_rag_stats"][key] for key in TIMING_STATS}


def test_metadata_comes_from_the_decoder(llm, chat_decoder):
    meta = llm.metadata
    assert meta.context_window == chat_decoder.context_window == 512
    assert meta.num_output == SHORT and meta.is_chat_model and meta.is_function_calling_model
    assert meta.model_name == "LlamaForCausalLM"  # a model built from a config has no path to name it by
    assert HybridSpecLLM.class_name() == "HybridSpecLLM"


def test_complete_sends_the_prompt_as_one_user_message(llm, reference):
    response = llm.complete(QUESTION)
    assert isinstance(response, CompletionResponse) and response.text == reference.text
    assert response.raw["usage"] == {
        "prompt_tokens": reference.stats.prompt_tokens,
        "completion_tokens": SHORT,
        "total_tokens": reference.stats.prompt_tokens + SHORT,
    }
    assert response.raw["hsd_rag_stats"] == {**reference.stats.to_dict(), **timings(response.raw)}
    extra = response.additional_kwargs
    assert extra["finish_reason"] == "length" and extra["steps"] == reference.stats.steps
    assert extra["usage"]["output_tokens"] == SHORT and "accepted_by_source" in extra


def test_system_prompt_is_prepended_to_completions(chat_decoder):
    llm = HybridSpecLLM(decoder=chat_decoder, max_new_tokens=SHORT, system_prompt="Answer in French.")
    ref = chat_decoder.generate(
        [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": QUESTION}],
        max_new_tokens=SHORT,
    )
    assert llm.complete(QUESTION).text == ref.text


def test_chat_matches_the_decoder(llm, chat_decoder, reference):
    response = llm.chat(CHAT)
    assert isinstance(response, ChatResponse) and response.message.role == MessageRole.ASSISTANT
    assert response.message.content == reference.text
    assert response.raw["hsd_rag_stats"]["steps"] == reference.stats.steps
    history = [
        ChatMessage(role=MessageRole.SYSTEM, content="Be brief."),
        ChatMessage(role=MessageRole.USER, content="Hi"),
        ChatMessage(role=MessageRole.ASSISTANT, content="Hello!"),
        *CHAT,
    ]
    ref = chat_decoder.generate(
        [{"role": m.role.value, "content": m.content} for m in history], max_new_tokens=SHORT
    )
    assert llm.chat(history).message.content == ref.text


def test_stream_complete_and_stream_chat_yield_cumulative_text_and_deltas(llm, reference):
    for responses, text_of in (
        (list(llm.stream_complete(QUESTION)), lambda r: r.text),
        (list(llm.stream_chat(CHAT)), lambda r: r.message.content),
    ):
        assert len(responses) > 2
        assert "".join(r.delta for r in responses) == reference.text
        assert all(text_of(r).endswith(r.delta) for r in responses)
        assert [text_of(r) for r in responses][-1] == reference.text
        last = responses[-1]  # the stats arrive with the last response
        assert last.delta == "" and last.raw["usage"]["completion_tokens"] == SHORT
        assert last.additional_kwargs["finish_reason"] == "length"


async def test_async_variants_match_sync(llm, reference):
    assert (await llm.acomplete(QUESTION)).text == reference.text
    assert (await llm.achat(CHAT)).message.content == reference.text
    responses = [r async for r in await llm.astream_complete(QUESTION)]
    assert "".join(r.delta for r in responses) == reference.text
    assert responses[-1].raw["usage"]["completion_tokens"] == SHORT
    responses = [r async for r in await llm.astream_chat(CHAT)]
    assert responses[-1].message.content == reference.text
    assert responses[-1].additional_kwargs["steps"] == reference.stats.steps


def test_callbacks_see_the_stats(chat_decoder, reference):
    debug = LlamaDebugHandler()
    llm = HybridSpecLLM(decoder=chat_decoder, max_new_tokens=SHORT, callback_manager=CallbackManager([debug]))
    assert llm.predict(PromptTemplate("{q}"), q=QUESTION) == reference.text  # a chat model: predict uses chat
    (_, end), *_ = debug.get_event_pairs(CBEventType.LLM)
    assert end.payload[EventPayload.RESPONSE].raw["hsd_rag_stats"]["steps"] == reference.stats.steps


def test_per_call_settings_and_stop(llm, reference):
    assert llm.complete(QUESTION, max_new_tokens=3).raw["usage"]["completion_tokens"] == 3
    assert llm.complete(QUESTION, method="vanilla").additional_kwargs["drafted_by_source"] == {}
    stop = " " + reference.text.split()[2]
    cut = reference.text[: reference.text.find(stop)]
    stopping = HybridSpecLLM(decoder=llm.decoder, max_new_tokens=SHORT, stop=[stop])
    response = stopping.complete(QUESTION)
    assert response.text == cut and response.additional_kwargs["stop_reason"] == "stop_string"


def test_documents_kwarg_reaches_the_drafter(chat_decoder):
    from llama_index.core.schema import NodeWithScore, TextNode

    decoder = HybridSpecDecoder(chat_decoder.model, chat_decoder.tokenizer)
    seen = []

    def recording(dec, cfg):
        drafter = type(dec).drafter_factories["ngram"](dec, cfg)
        start = drafter.start
        drafter.start = lambda prompt, docs: (
            seen.append([dec.tokenizer.decode(d) for d in docs]),
            start(prompt, docs),
        )
        return drafter

    decoder.drafter_factories = {"ngram": recording}
    llm = HybridSpecLLM(decoder=decoder, max_new_tokens=2)
    node = NodeWithScore(node=TextNode(text="Paris is the capital of France."), score=0.9)
    llm.complete(QUESTION, documents=[node, "It is on the Seine."])
    assert seen[-1] == ["Paris is the capital of France.", "It is on the Seine."]
    llm.chat(CHAT, documents="Lyon is not.")
    assert seen[-1] == ["Lyon is not."]
    llm.chat(CHAT)
    assert seen[-1] == []


def test_clear_errors(llm, chat_decoder):
    with pytest.raises(ValueError, match="unknown argument.*max_new_tokenz"):
        llm.complete(QUESTION, max_new_tokenz=2)
    with pytest.raises(ValueError, match="unknown argument.*max_new_tokenz"):
        llm.stream_chat(CHAT, max_new_tokenz=2)  # raised at the call, not at the first next()
    with pytest.raises(ValueError, match="max_new_tokens"):
        llm.chat(CHAT, max_new_tokens=0)
    with pytest.raises(ValueError, match="unknown argument.*temprature"):
        HybridSpecLLM(decoder=chat_decoder, temprature=0.1)
    with pytest.raises(ValueError, match="no messages"):
        llm.chat([])
    image = ChatMessage(
        role=MessageRole.USER,
        blocks=[TextBlock(text="What is this?"), ImageBlock(url="https://example.com/a.png")],
    )
    with pytest.raises(ValueError, match="text only"):
        llm.chat([image])
