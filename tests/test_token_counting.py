"""LlamaIndex's own TokenCountingHandler reads HybridSpecLLM's usage: called directly, and inside a query engine
over a folder with the handler in `Settings.callback_manager` (sync and async), on a tiny random model.

Before `response.raw` became a dict, a direct call raised `TypeError: 'GenerationStats' object is not
iterable` and a query engine reported 0 completion tokens.
"""

from __future__ import annotations

import pytest
from langchain_core.embeddings import DeterministicFakeEmbedding
from llama_index.core import Settings
from llama_index.core.callbacks import CallbackManager, TokenCountingHandler
from llama_index.core.llms import ChatMessage, MessageRole

from hsd_rag.llama_index import HybridSpecLLM
from hsd_rag.retrieval import FolderIndex
from hsd_rag.retrieval.llama_index_retriever import build_query_engine
from tests.llama_index_events import ChatEndEvents
from tests.tiny_models import smollm2_chat_decoder

SMOLLM2_VOCAB = 49152
SHORT = 6  # new tokens per generation
QUESTION = "Who founded the station?"
FAKE_EMBEDDING_SIZE = 16  # retrieval quality does not matter here, only that a chunk reaches the prompt
# LlamaIndex's default "compact" mode reserves 500 tokens of padding, more than the tiny model's 512-token window
# leaves; "simple_summarize" makes the same single LLM call. (The slow test in test_rag_chains.py runs the default
# mode on the real model.)
RESPONSE_MODE = "simple_summarize"


@pytest.fixture(scope="module")
def chat_decoder():
    """A ~3M-parameter random Llama over the real SmolLM2 tokenizer (so the chat template is the real one)."""
    return smollm2_chat_decoder()


@pytest.fixture(scope="module")
def reference(chat_decoder):
    return chat_decoder.generate([{"role": "user", "content": QUESTION}], max_new_tokens=SHORT)


@pytest.fixture
def counter(chat_decoder):
    return TokenCountingHandler(tokenizer=HybridSpecLLM(decoder=chat_decoder).tokenizer)


def test_direct_calls_are_counted_from_the_usage(chat_decoder, reference, counter):
    llm = HybridSpecLLM(
        decoder=chat_decoder, max_new_tokens=SHORT, callback_manager=CallbackManager([counter])
    )
    llm.complete(QUESTION)
    llm.chat([ChatMessage(role=MessageRole.USER, content=QUESTION)])
    list(llm.stream_chat([ChatMessage(role=MessageRole.USER, content=QUESTION)]))
    assert len(counter.llm_token_counts) == 3
    for event in counter.llm_token_counts:
        assert event.completion_token_count == reference.stats.new_tokens == SHORT
        assert event.prompt_token_count == reference.stats.prompt_tokens


@pytest.fixture
def settings_counter(counter):
    """The handler where LlamaIndex apps put it: the global Settings.callback_manager (restored afterwards)."""
    previous = Settings.callback_manager
    Settings.callback_manager = CallbackManager([counter])
    yield counter
    Settings.callback_manager = previous


@pytest.fixture(scope="module")
def folder_index(tmp_path_factory):
    folder = tmp_path_factory.mktemp("station")
    (folder / "station.txt").write_text(
        "The station was founded in 1987 by Ingrid Solbakken-Moe.", encoding="utf-8"
    )
    return FolderIndex.build(
        folder, embedding=DeterministicFakeEmbedding(size=FAKE_EMBEDDING_SIZE), save=False
    )


def test_query_engine_over_a_folder_is_counted(chat_decoder, folder_index, settings_counter):
    llm = HybridSpecLLM(decoder=chat_decoder, max_new_tokens=SHORT)
    engine = build_query_engine(folder_index, llm=llm, k=1, response_mode=RESPONSE_MODE)
    with ChatEndEvents() as chats:
        response = engine.query(QUESTION)
    assert response.source_nodes[0].node.metadata["source"] == "station.txt"
    (chat,) = chats
    generated = chat.raw["hsd_rag_stats"]
    assert generated["new_tokens"] == SHORT and chat.message.content == str(response)
    assert settings_counter.completion_llm_token_count == generated["new_tokens"]
    assert settings_counter.prompt_llm_token_count == generated["prompt_tokens"]


async def test_async_query_engine_is_counted_too(chat_decoder, folder_index, settings_counter):
    """`aquery` goes through the retriever's `_aretrieve` and the LLM's `achat`."""
    llm = HybridSpecLLM(decoder=chat_decoder, max_new_tokens=SHORT)
    engine = build_query_engine(folder_index, llm=llm, k=1, response_mode=RESPONSE_MODE)
    sync = engine.query(QUESTION)
    response = await engine.aquery(QUESTION)
    assert str(response) == str(sync)
    assert [n.node.node_id for n in response.source_nodes] == [n.node.node_id for n in sync.source_nodes]
    assert settings_counter.completion_llm_token_count == 2 * SHORT
