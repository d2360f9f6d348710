"""HybridSpecLLM as a LangChain chat model, with real langchain-core objects and a tiny random model.

The adapter must add nothing to decoding: every answer is compared with `HybridSpecDecoder.generate` on the same
chat messages.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler
from langchain_core.documents import Document
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_core.prompts import ChatPromptTemplate

from hsd_rag import HybridSpecDecoder
from hsd_rag.langchain import HybridSpecLLM, attach_documents
from tests.fake_drafters import record_drafts
from tests.tiny_models import hf_greedy_text, smollm2_chat_decoder

SMOLLM2_VOCAB = 49152
SHORT = 12  # new tokens per generation: enough text to cut with a stop string, cheap on two cores
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def chat_decoder():
    """A ~3M-parameter random Llama over the real SmolLM2 tokenizer (so the chat template is the real one)."""
    return smollm2_chat_decoder()


@pytest.fixture
def llm(chat_decoder):
    return HybridSpecLLM(decoder=chat_decoder, max_new_tokens=SHORT)




def expected(decoder, messages, **kwargs):
    return decoder.generate(messages, max_new_tokens=kwargs.pop("max_new_tokens", SHORT), **kwargs)


# ---- invoke / batch / stream, sync and async ---------------------------------------------------------------


def test_invoke_matches_the_decoder_and_reports_stats(llm, chat_decoder):
    message = llm.invoke(QUESTION)
    ref = expected(chat_decoder, [{"role": "user", "content": QUESTION}])
    assert isinstance(message, AIMessage) and message.content == ref.text
    assert ref.text == hf_greedy_text(chat_decoder, [{"role": "user", "content": QUESTION}], SHORT)  # lossless
    assert message.usage_metadata == {
        "input_tokens": ref.stats.prompt_tokens,
        "output_tokens": SHORT,
        "total_tokens": ref.stats.prompt_tokens + SHORT,
    }
    meta = message.response_metadata
    assert meta["finish_reason"] == "length" and meta["stop_reason"] == "length"
    assert meta["steps"] == ref.stats.steps and meta["tau"] == pytest.approx(ref.stats.tau)
    assert meta["accepted_by_source"] == dict(ref.stats.accepted_by_source)
    assert meta["hsd_rag_stats"]["new_tokens"] == SHORT
    assert meta["model_name"] == llm.model_name


def test_messages_become_the_chat_template_roles(llm, chat_decoder):
    messages = [
        SystemMessage("Answer briefly."),
        HumanMessage("Hi"),
        AIMessage("Hello!"),
        HumanMessage(QUESTION),
    ]
    roles = [("system", "Answer briefly."), ("user", "Hi"), ("assistant", "Hello!"), ("user", QUESTION)]
    ref = expected(chat_decoder, [{"role": r, "content": c} for r, c in roles])
    assert llm.invoke(messages).content == ref.text


def test_batch_matches_single_invokes(llm):
    questions = [QUESTION, "Name a prime number."]
    answers = llm.batch(questions, config={"max_concurrency": 2})
    assert [a.content for a in answers] == [llm.invoke(q).content for q in questions]


def test_stream_pieces_add_up_to_invoke(llm):
    chunks = list(llm.stream(QUESTION))
    assert len(chunks) > 2 and all(c.content for c in chunks[:-1])
    assert "".join(c.content for c in chunks) == llm.invoke(QUESTION).content
    last = chunks[-1]  # the stats arrive with the last chunk
    assert last.content == "" and last.chunk_position == "last"
    assert last.usage_metadata["output_tokens"] == SHORT
    assert last.response_metadata["finish_reason"] == "length"
    merged = sum(chunks[1:], chunks[0])
    assert merged.usage_metadata["output_tokens"] == SHORT  # counted once, not per chunk


def test_stopping_a_stream_early_frees_the_decoder(llm, chat_decoder):
    chunks = llm.stream(QUESTION)
    next(chunks)
    chunks.close()
    assert not chat_decoder.gate.locked()
    assert llm.invoke(QUESTION, max_new_tokens=2).usage_metadata["output_tokens"] == 2


async def test_ainvoke_and_astream_match_sync(llm):
    sync = llm.invoke(QUESTION)
    message = await llm.ainvoke(QUESTION)
    assert message.content == sync.content and message.usage_metadata == sync.usage_metadata
    chunks = [chunk async for chunk in llm.astream(QUESTION)]
    assert "".join(c.content for c in chunks) == sync.content
    assert chunks[-1].usage_metadata == sync.usage_metadata
    assert [m.content for m in await llm.abatch([QUESTION, QUESTION])] == [sync.content] * 2


# ---- stop sequences, callbacks, per-call settings ----------------------------------------------------------


def test_stop_sequences_cut_the_answer(llm, chat_decoder):
    full = llm.invoke(QUESTION).content
    words = full.split()
    stop = " " + words[3]
    cut = full[: full.find(stop)]
    message = llm.invoke(QUESTION, stop=[stop])
    assert message.content == cut
    assert message.response_metadata["finish_reason"] == "stop"
    assert message.response_metadata["stop_reason"] == "stop_string"
    assert "".join(c.content for c in llm.stream(QUESTION, stop=[stop])) == cut
    with_default = HybridSpecLLM(decoder=chat_decoder, max_new_tokens=SHORT, stop=[stop])
    assert with_default.invoke(QUESTION).content == cut
    assert (
        with_default.invoke(QUESTION, stop=["no such text"]).content == full
    )  # a call's stop replaces the default


class TokenRecorder(BaseCallbackHandler):
    def __init__(self):
        self.tokens: list[str] = []
        self.ended = 0

    def on_llm_new_token(self, token, *, chunk=None, **kwargs):
        assert chunk is not None and chunk.text == token
        self.tokens.append(token)

    def on_llm_end(self, response, **kwargs):
        self.ended += 1


class AsyncTokenRecorder(AsyncCallbackHandler):
    def __init__(self):
        self.tokens: list[str] = []

    async def on_llm_new_token(self, token, *, chunk=None, **kwargs):
        self.tokens.append(token)


def test_callbacks_receive_every_streamed_piece(llm):
    recorder = TokenRecorder()
    chunks = list(llm.stream(QUESTION, config={"callbacks": [recorder]}))
    assert recorder.tokens == [c.content for c in chunks] and recorder.ended == 1
    recorder = TokenRecorder()  # invoke goes through the same stream, so callbacks still see each token
    message = llm.invoke(QUESTION, config={"callbacks": [recorder]})
    assert "".join(recorder.tokens) == message.content and len([t for t in recorder.tokens if t]) > 2


def test_streaming_flag_sends_invoke_through_the_stream_once(chat_decoder):
    recorder = TokenRecorder()  # with streaming=True LangChain itself drives _stream: each piece still once
    llm = HybridSpecLLM(decoder=chat_decoder, max_new_tokens=SHORT, streaming=True)
    message = llm.invoke(QUESTION, config={"callbacks": [recorder]})
    assert "".join(recorder.tokens) == message.content and message.usage_metadata["output_tokens"] == SHORT


async def test_async_callbacks_receive_every_streamed_piece(llm):
    recorder = AsyncTokenRecorder()
    chunks = [c async for c in llm.astream(QUESTION, config={"callbacks": [recorder]})]
    assert recorder.tokens == [c.content for c in chunks]
    recorder = AsyncTokenRecorder()
    message = await llm.ainvoke(QUESTION, config={"callbacks": [recorder]})
    assert "".join(recorder.tokens) == message.content


def test_per_call_overrides_and_bind(llm, chat_decoder):
    messages = [{"role": "user", "content": QUESTION}]
    assert llm.invoke(QUESTION, max_new_tokens=4).usage_metadata["output_tokens"] == 4
    assert llm.invoke(QUESTION, max_tokens=3).usage_metadata["output_tokens"] == 3
    assert llm.bind(max_new_tokens=5).invoke(QUESTION).usage_metadata["output_tokens"] == 5
    vanilla = llm.invoke(QUESTION, method="vanilla")
    assert vanilla.response_metadata["drafted_by_source"] == {}  # no drafter ran
    assert vanilla.content == hf_greedy_text(chat_decoder, messages, SHORT)  # the model alone writes the same
    sampled = [llm.invoke(QUESTION, temperature=1.0, top_k=50, top_p=0.9, seed=7, budget=4) for _ in range(2)]
    assert sampled[0].content == sampled[1].content
    ref = expected(chat_decoder, messages, temperature=1.0, top_k=50, top_p=0.9, seed=7, budget=4)
    assert sampled[0].content == ref.text


def test_fields_set_the_defaults(chat_decoder):
    llm = HybridSpecLLM(decoder=chat_decoder, max_tokens=6, method="vanilla", temperature=0)
    assert llm.max_new_tokens == 6
    message = llm.invoke(QUESTION)
    assert (
        message.usage_metadata["output_tokens"] == 6 and message.response_metadata["drafted_by_source"] == {}
    )
    params = llm._identifying_params
    assert params["max_new_tokens"] == 6 and params["method"] == "vanilla" and "decoder" not in params
    assert llm._llm_type == "hsd-rag"
    ls = llm._get_ls_params(stop=["x"])
    assert ls["ls_provider"] == "hsd_rag" and ls["ls_max_tokens"] == 6 and ls["ls_stop"] == ["x"]


# ---- clear errors ------------------------------------------------------------------------------------------


def test_unknown_kwargs_fail_clearly(llm, chat_decoder):
    with pytest.raises(ValueError, match="unknown argument.*max_new_tokenz.*valid per-call arguments"):
        llm.invoke(QUESTION, max_new_tokenz=3)
    with pytest.raises(ValueError, match="unknown argument.*model"):
        llm.invoke(QUESTION, model="another-model")
    with pytest.raises(ValueError, match="unknown argument.*temprature"):
        HybridSpecLLM(decoder=chat_decoder, temprature=0.5)
    # max_retries (of hosted chat APIs) changes nothing for a local model and is accepted; api_key is refused
    # and timeout is a real deadline (tests/test_model_selection.py)
    assert HybridSpecLLM(decoder=chat_decoder, timeout=5, max_retries=1).decoder is chat_decoder


def test_bad_values_fail_clearly(llm, chat_decoder):
    with pytest.raises(ValueError, match="max_new_tokens"):
        llm.invoke(QUESTION, max_new_tokens=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        HybridSpecLLM(decoder=chat_decoder, max_new_tokens=-1)
    with pytest.raises(ValueError, match="temperature"):
        llm.invoke(QUESTION, temperature=-1.0)
    with pytest.raises(ValueError, match="method"):
        llm.invoke(QUESTION, method="eagle")  # no EAGLE head loaded


def test_unsupported_messages_fail_clearly(llm):
    with pytest.raises(ValueError, match="no messages"):
        llm.invoke([])
    image = {"type": "image", "url": "https://example.com/cat.png"}
    with pytest.raises(ValueError, match="text only"):
        llm.invoke([HumanMessage(content=[{"type": "text", "text": "What is this?"}, image])])


# ---- documents for drafting --------------------------------------------------------------------------------


def test_documents_kwarg_reaches_the_drafter(chat_decoder):
    decoder = HybridSpecDecoder(chat_decoder.model, chat_decoder.tokenizer)
    seen = record_drafts(decoder)
    llm = HybridSpecLLM(decoder=decoder, max_new_tokens=2)
    llm.invoke(QUESTION, documents=["Paris is the capital of France.", Document(page_content="Lyon is not.")])
    assert seen[-1]["documents"] == ["Paris is the capital of France.", "Lyon is not."]
    assert QUESTION in seen[-1]["prompt"]
    llm.invoke(QUESTION)
    assert seen[-1]["documents"] == []  # nothing carried over from the previous call


def test_attach_documents_formats_the_prompt_and_attaches_the_chunks(chat_decoder):
    decoder = HybridSpecDecoder(chat_decoder.model, chat_decoder.tokenizer)
    seen = record_drafts(decoder)
    prompt = ChatPromptTemplate.from_messages(
        [("system", "Answer from the context."), ("human", "Context:\n{context}\n\nQuestion: {question}")]
    )
    docs = [
        Document(page_content="Paris is the capital of France."),
        Document(page_content="It is on the Seine."),
    ]
    value = attach_documents(prompt).invoke({"context": docs, "question": QUESTION})
    last = value.to_messages()[-1]
    assert (
        "Paris is the capital of France.\n\nIt is on the Seine." in last.content
    )  # text, not Document reprs
    assert last.additional_kwargs["hsd_rag_documents"] == [d.page_content for d in docs]

    chain = attach_documents(prompt) | HybridSpecLLM(decoder=decoder, max_new_tokens=2)
    chain.invoke({"context": docs, "question": QUESTION})
    assert seen[-1]["documents"] == [d.page_content for d in docs]
    assert "It is on the Seine." in seen[-1]["prompt"]
    with pytest.raises(ValueError, match="'context'"):
        attach_documents(prompt).invoke({"question": QUESTION})


async def test_attach_documents_async(chat_decoder):
    prompt = ChatPromptTemplate.from_messages([("human", "{context}\n\n{question}")])
    value = await attach_documents(prompt).ainvoke({"context": "one plain string", "question": QUESTION})
    assert value.to_messages()[-1].additional_kwargs["hsd_rag_documents"] == ["one plain string"]


# ---- the default decoder -----------------------------------------------------------------------------------


def test_default_decoder_is_loaded_lazily_once_per_process(monkeypatch, chat_decoder):
    import hsd_rag.integrations_common as common
    from hsd_rag.llama_index import HybridSpecLLM as LlamaIndexLLM
    from hsd_rag.loading import DEFAULT_MODEL_NAME

    loads = []

    def fake_from_pretrained(*args, **kwargs):  # stands in for loading the real 135M model
        loads.append(args)
        return chat_decoder

    monkeypatch.setattr(common, "_default_decoder", None)
    monkeypatch.setattr(HybridSpecDecoder, "from_pretrained", fake_from_pretrained)
    first, second = HybridSpecLLM(max_new_tokens=2), HybridSpecLLM(max_new_tokens=3)
    assert loads == [] and first.model_name == DEFAULT_MODEL_NAME  # constructing loads nothing
    first.invoke(QUESTION)
    second.invoke(QUESTION)
    LlamaIndexLLM(max_new_tokens=2).complete(QUESTION)
    assert loads == [()]  # one load, shared by every adapter


def test_adapters_without_their_framework_name_the_pip_command():
    """hsd_rag imports without LangChain / LlamaIndex; importing an adapter then says what to install."""
    script = textwrap.dedent(
        """
        import sys
        for name in ("langchain_core", "llama_index"):
            sys.modules[name] = None  # makes `import name` raise ImportError
        import hsd_rag
        from hsd_rag import HybridSpecDecoder
        for module, hint in (("hsd_rag.langchain", "pip install langchain-core"),
                             ("hsd_rag.llama_index", "pip install llama-index-core")):
            try:
                __import__(module)
            except ImportError as error:
                assert hint in str(error), error
            else:
                raise AssertionError("no ImportError")
        try:
            hsd_rag.HybridSpecLLM
        except ImportError as error:
            assert "pip install langchain-core" in str(error), error
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert result.stdout.strip() == "ok", result.stderr


def test_lazy_package_export():
    import hsd_rag

    assert hsd_rag.HybridSpecLLM is HybridSpecLLM
