"""Real OpenAI clients against `hsd-rag serve` on 127.0.0.1: the openai SDK, LangChain ChatOpenAI, LlamaIndex
OpenAILike. A tiny random Llama over the real SmolLM2 tokenizer (so the real chat template) keeps it fast;
every answer is compared with HF generate (greedy) on the same chat prompt, and the documents each client sends
in `extra_body` must reach exactly that request's decoder call.
"""

from __future__ import annotations

import threading

import pytest

from hsd_rag.serve import BackgroundServer, ServerSettings, create_app
from tests.serve_support import (
    GatedDecoder,
    hf_greedy,
    one_torch_thread,  # noqa: F401  (autouse: one torch thread here)
    wait_until,
)
from tests.tiny_models import smollm2_chat_decoder

openai = pytest.importorskip("openai")  # the `serve-clients` extra (in `dev`)

MODEL = "smollm2-tiny"
SHORT = 12
QUESTION = "Who designed the Eiffel Tower?"
DOCS = ["The Eiffel Tower was designed by the company of Gustave Eiffel.", "It opened in 1889."]
TIMEOUT_S = 60


@pytest.fixture(scope="module")
def decoder():
    return smollm2_chat_decoder()


@pytest.fixture(scope="module")
def spy(decoder):
    gate = GatedDecoder(decoder)
    gate.open()
    return gate


@pytest.fixture(scope="module")
def server(spy):
    settings = ServerSettings(model_name=MODEL, default_temperature=0.0, default_budget=8)
    with BackgroundServer(create_app(spy, settings)) as running:
        yield running


@pytest.fixture(scope="module")
def base_url(server):
    return server.base_url + "/v1"


def expected_answer(decoder, messages) -> str:
    ids = hf_greedy(decoder.model, decoder.encode_prompt(messages), SHORT)
    return decoder.tokenizer.decode(ids, skip_special_tokens=True)


def last_call_documents(spy) -> list[str] | None:
    return spy.calls[-1]["documents"]


# ---- the openai SDK -------------------------------------------------------------------------------------------


def test_openai_sdk_chat_whole_and_streamed(decoder, spy, base_url):
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=TIMEOUT_S)
    messages = [{"role": "user", "content": QUESTION}]
    expected = expected_answer(decoder, messages)
    response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=SHORT, temperature=0,
                                              extra_body={"documents": DOCS})
    assert response.choices[0].message.content == expected
    assert last_call_documents(spy) == DOCS
    assert response.usage.completion_tokens == SHORT or response.choices[0].finish_reason == "stop"
    stats = response.model_extra["hsd_rag"]
    assert stats["steps"] >= 1 and "accepted_by_source" in stats

    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=SHORT, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == response.usage.completion_tokens
    assert last_call_documents(spy) == []


def test_openai_sdk_completion_and_models(decoder, base_url):
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=TIMEOUT_S)
    assert [m.id for m in client.models.list()] == [MODEL]
    prompt = "The Eiffel Tower"
    ids = hf_greedy(decoder.model, decoder.encode_prompt(prompt), SHORT)
    completion = client.completions.create(model=MODEL, prompt=prompt, max_tokens=SHORT, temperature=0)
    assert completion.choices[0].text == decoder.tokenizer.decode(ids, skip_special_tokens=True)


def test_openai_sdk_raises_its_own_error_classes(decoder):
    gate = GatedDecoder(decoder)
    settings = ServerSettings(model_name=MODEL, max_queue=0, api_key="k")
    try:
        with BackgroundServer(create_app(gate, settings)) as srv:
            client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="k", max_retries=0, timeout=TIMEOUT_S)
            messages = [{"role": "user", "content": QUESTION}]
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=srv.base_url + "/v1", api_key="wrong", max_retries=0).models.list()
            with pytest.raises(openai.NotFoundError):
                client.chat.completions.create(model="gpt-4o", messages=messages)
            with pytest.raises(openai.BadRequestError, match="n=3"):
                client.chat.completions.create(model=MODEL, messages=messages, n=3)
            busy = threading.Thread(target=client.chat.completions.create,
                                    kwargs={"model": MODEL, "messages": messages, "max_tokens": 2})
            busy.start()
            wait_until(gate.started.is_set, what="a generation to occupy the engine")
            with pytest.raises(openai.RateLimitError, match="busy"):
                client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
            gate.open()
            busy.join(TIMEOUT_S)
    finally:
        gate.open()


# ---- LangChain ChatOpenAI -------------------------------------------------------------------------------------


def test_langchain_chat_openai_chain_sends_the_retrieved_documents(decoder, spy, base_url):
    langchain_openai = pytest.importorskip("langchain_openai")
    from langchain_core.documents import Document
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate
    from langchain_core.runnables import RunnableLambda, RunnablePassthrough

    from hsd_rag.data.prompt import PASSAGE_SEPARATOR
    from hsd_rag.langchain import attach_documents, documents_in_extra_body

    llm = langchain_openai.ChatOpenAI(base_url=base_url, api_key="unused", model=MODEL, max_tokens=SHORT,
                                      temperature=0, max_retries=0, timeout=TIMEOUT_S)
    retriever = RunnableLambda(lambda question: [Document(page_content=d) for d in DOCS])
    prompt = ChatPromptTemplate.from_messages([("user", "Context:\n{context}\n\nQuestion: {question}")])
    chain = ({"context": retriever, "question": RunnablePassthrough()} | attach_documents(prompt)
             | documents_in_extra_body(llm) | StrOutputParser())
    content = f"Context:\n{PASSAGE_SEPARATOR.join(DOCS)}\n\nQuestion: {QUESTION}"
    expected = expected_answer(decoder, [{"role": "user", "content": content}])

    assert chain.invoke(QUESTION) == expected
    assert last_call_documents(spy) == DOCS
    assert "".join(chain.stream(QUESTION)) == expected
    assert last_call_documents(spy) == DOCS

    message = llm.invoke(QUESTION)  # plain use, no documents
    assert message.usage_metadata["output_tokens"] >= 1
    assert message.response_metadata["token_usage"]["hsd_rag"]["steps"] >= 1  # our stats reach LangChain
    assert last_call_documents(spy) == []


async def test_langchain_chat_openai_async(decoder, spy, base_url):
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.ChatOpenAI(base_url=base_url, api_key="unused", model=MODEL, max_tokens=SHORT,
                                      temperature=0, max_retries=0, timeout=TIMEOUT_S,
                                      extra_body={"documents": DOCS})
    expected = expected_answer(decoder, [{"role": "user", "content": QUESTION}])
    answers = [(await llm.ainvoke(QUESTION)).content for _ in range(2)]
    assert answers == [expected, expected]
    assert last_call_documents(spy) == DOCS


# ---- LlamaIndex OpenAILike ------------------------------------------------------------------------------------


def test_llama_index_openai_like(decoder, spy, base_url):
    openai_like = pytest.importorskip("llama_index.llms.openai_like")
    from llama_index.core.llms import ChatMessage

    llm = openai_like.OpenAILike(model=MODEL, api_base=base_url, api_key="unused", is_chat_model=True,
                                 context_window=512, max_tokens=SHORT, temperature=0.0, max_retries=0,
                                 timeout=TIMEOUT_S)
    expected = expected_answer(decoder, [{"role": "user", "content": QUESTION}])
    response = llm.chat([ChatMessage(role="user", content=QUESTION)], extra_body={"documents": DOCS})
    assert response.message.content == expected
    assert last_call_documents(spy) == DOCS
    assert llm.complete(QUESTION).text == expected  # complete() on a chat model goes through the chat endpoint
    streamed = list(llm.stream_chat([ChatMessage(role="user", content=QUESTION)], extra_body={"documents": DOCS}))
    assert streamed[-1].message.content == expected
    assert last_call_documents(spy) == DOCS

    text_llm = openai_like.OpenAILike(model=MODEL, api_base=base_url, api_key="unused", is_chat_model=False,
                                      context_window=512, max_tokens=SHORT, temperature=0.0, max_retries=0,
                                      timeout=TIMEOUT_S)
    ids = hf_greedy(decoder.model, decoder.encode_prompt(QUESTION), SHORT)
    assert text_llm.complete(QUESTION).text == decoder.tokenizer.decode(ids, skip_special_tokens=True)
