"""HybridSpecLLM inside real RAG pipelines: an LCEL chain and a LlamaIndex query engine over a FolderIndex.

The product claim checked here: answers are drafted from the retrieved chunks (accepted n-gram drafts > 0, with
the real default model, marked slow), and concurrent requests never draft from each other's documents (tiny model).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
from langchain_core.documents import Document
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableLambda, RunnablePassthrough

from hsd_rag import HybridSpecDecoder
from hsd_rag.langchain import HybridSpecLLM, attach_documents
from tests.fake_drafters import record_drafts
from tests.llama_index_events import ChatEndEvents
from tests.tiny_models import hf_greedy_text, smollm2_chat_decoder

SMOLLM2_VOCAB = 49152
ANSWER_TOKENS = 40  # long enough to copy a span of the retrieved chunk, short on a CPU
# The chain tests pin method="ngram": the claim is about drafts from the chunks, whatever head the default ships.
DOCS = {
    "station.txt": (
        "The Halvorsen Research Station was founded in 1987 by the marine biologist Ingrid Solbakken-Moe "
        "to study cold-water coral reefs off the Lofoten islands."
    ),
    "bridge.txt": "The Varnholt Bridge, opened in 1931, carries the old coastal railway across the Tessel river.",
    "festival.md": "# Lantern festival\n\nEvery October the town of Ebberup floats 4,000 paper lanterns on its harbour.",
    "library.txt": "The Kestrel Library holds 212 medieval manuscripts, most of them copied in the abbey of Sorvik.",
}
QUESTION = "Who founded the Halvorsen Research Station, when, and why?"
RAG_PROMPT = ChatPromptTemplate.from_messages(
    [
        (
            "human",
            "Use the following pieces of context to answer the question.\n{context}\nQuestion: {question}",
        )
    ]
)


@pytest.fixture(scope="module")
def docs_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rag") / "docs"
    folder.mkdir()
    for name, text in DOCS.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def minilm():
    from hsd_rag.retrieval import default_embedding

    return default_embedding()


@pytest.fixture(scope="module")
def folder_index(docs_folder, minilm):
    from hsd_rag.retrieval import FolderIndex

    return FolderIndex.build(docs_folder, index_dir=docs_folder.parent / "index", embedding=minilm)


@pytest.fixture(scope="module")
def chat_decoder():
    """A ~3M-parameter random Llama over the real SmolLM2 tokenizer (so the chat template is the real one)."""
    return smollm2_chat_decoder()




def fresh(decoder: HybridSpecDecoder) -> HybridSpecDecoder:
    """Another decoder over the same weights, so a test can wrap its drafter factories alone."""
    return HybridSpecDecoder(decoder.model, decoder.tokenizer)


# ---- drafting from retrieved chunks, real default model ------------------------------------------------------


@pytest.mark.slow
def test_lcel_chain_drafts_from_the_retrieved_chunks(folder_index, default_decoder):
    from hsd_rag.retrieval.langchain_retriever import FolderRetriever

    decoder = fresh(default_decoder)
    seen = record_drafts(decoder)
    retriever = FolderRetriever(index=folder_index, k=2)
    llm = HybridSpecLLM(decoder=decoder, max_new_tokens=ANSWER_TOKENS, method="ngram")
    chain = {"context": retriever, "question": RunnablePassthrough()} | attach_documents(RAG_PROMPT) | llm
    message = chain.invoke(QUESTION)
    assert DOCS["station.txt"] in seen[-1]["documents"]  # the retrieved chunk reached the drafter
    assert DOCS["station.txt"] in seen[-1]["prompt"]  # and the prompt, as text
    assert message.response_metadata["accepted_by_source"].get("ngram", 0) > 0, message
    assert message.response_metadata["tau"] > 1.0
    assert "Solbakken" in message.content  # the 135M model copies the name from the chunk
    from hsd_rag.langchain import to_chat_messages

    sent = ({"context": retriever, "question": RunnablePassthrough()} | attach_documents(RAG_PROMPT)).invoke(QUESTION)
    assert message.content == hf_greedy_text(decoder, to_chat_messages(sent.to_messages()), ANSWER_TOKENS)


@pytest.mark.slow
def test_llama_index_query_engine_drafts_from_the_retrieved_chunks(folder_index, default_decoder):
    """...and LlamaIndex's TokenCountingHandler (in Settings.callback_manager) counts its tokens exactly."""
    from llama_index.core import Settings
    from llama_index.core.callbacks import CallbackManager, TokenCountingHandler

    from hsd_rag.llama_index import HybridSpecLLM as LlamaIndexLLM
    from hsd_rag.retrieval.llama_index_retriever import build_query_engine

    llm = LlamaIndexLLM(decoder=default_decoder, max_new_tokens=ANSWER_TOKENS, method="ngram")
    counter = TokenCountingHandler(tokenizer=llm.tokenizer)
    previous = Settings.callback_manager
    Settings.callback_manager = CallbackManager([counter])
    try:
        engine = build_query_engine(folder_index, llm=llm, k=2)
        with ChatEndEvents() as chats:
            response = engine.query(QUESTION)
    finally:
        Settings.callback_manager = previous
    assert response.source_nodes[0].node.metadata["source"] == "station.txt"
    # a query engine returns text only; the LLM's chat end event carries the ChatResponse with the stats
    (chat,) = chats
    assert chat.message.content.strip() == str(response).strip()
    stats = chat.raw["hsd_rag_stats"]
    assert stats["accepted_by_source"].get("ngram", 0) > 0
    assert chat.additional_kwargs["accepted_by_source"]["ngram"] == stats["accepted_by_source"]["ngram"]
    assert "Solbakken" in str(response)
    assert 0 < counter.completion_llm_token_count == stats["new_tokens"]
    assert counter.prompt_llm_token_count == stats["prompt_tokens"]


@pytest.mark.slow
def test_question_that_retrieves_nothing_still_gets_an_answer(tmp_path, minilm, default_decoder):
    from hsd_rag.retrieval import FolderIndex
    from hsd_rag.retrieval.langchain_retriever import FolderRetriever

    empty = FolderRetriever(index=FolderIndex(tmp_path, minilm))
    decoder = fresh(default_decoder)
    seen = record_drafts(decoder)
    llm = HybridSpecLLM(decoder=decoder, max_new_tokens=24)
    chain = {"context": empty, "question": RunnablePassthrough()} | attach_documents(RAG_PROMPT) | llm
    message = chain.invoke("What is the tallest mountain on Earth?")
    assert seen[-1]["documents"] == []
    assert message.content.strip() and message.usage_metadata["output_tokens"] > 0


# ---- isolation of concurrent requests, tiny model ------------------------------------------------------------


def requests(n: int) -> list[tuple[str, list[str]]]:
    """n (question, documents) pairs, each with its own marker word."""
    return [
        (f"What does note {i} say?", [f"Note {i}: marker-{i}-alpha.", f"Note {i}: marker-{i}-beta."])
        for i in range(n)
    ]


def assert_isolated(seen: list[dict], sent: list[tuple[str, list[str]]]) -> None:
    assert len(seen) == len(sent)
    by_question = {question: documents for question, documents in sent}
    for start in seen:
        (question,) = [q for q in by_question if q in start["prompt"]]
        assert start["documents"] == by_question[question]  # its own documents, nobody else's


def test_concurrent_threads_draft_only_from_their_own_documents(chat_decoder):
    decoder = fresh(chat_decoder)
    seen = record_drafts(decoder)
    llm = HybridSpecLLM(decoder=decoder, max_new_tokens=6)
    sent = requests(4)
    with ThreadPoolExecutor(max_workers=2) as pool:
        answers = list(pool.map(lambda r: llm.invoke(r[0], documents=r[1]), sent))
    assert all(a.usage_metadata["output_tokens"] == 6 for a in answers)
    assert_isolated(seen, sent)


def test_batched_chain_with_attached_documents_keeps_requests_apart(chat_decoder):
    decoder = fresh(chat_decoder)
    seen = record_drafts(decoder)
    chain = attach_documents(RAG_PROMPT) | HybridSpecLLM(decoder=decoder, max_new_tokens=6)
    sent = requests(4)
    inputs = [{"question": q, "context": [Document(page_content=d) for d in docs]} for q, docs in sent]
    chain.batch(inputs, config={"max_concurrency": 2})
    assert_isolated(seen, sent)


async def test_concurrent_async_requests_keep_documents_apart(chat_decoder):
    from hsd_rag.llama_index import HybridSpecLLM as LlamaIndexLLM

    decoder = fresh(chat_decoder)
    seen = record_drafts(decoder)
    langchain_llm = HybridSpecLLM(decoder=decoder, max_new_tokens=6)
    llama_llm = LlamaIndexLLM(decoder=decoder, max_new_tokens=6)
    sent = requests(4)
    await asyncio.gather(
        *(langchain_llm.ainvoke(q, documents=docs) for q, docs in sent[:2]),
        *(llama_llm.acomplete(q, documents=docs) for q, docs in sent[2:]),
    )
    assert_isolated(seen, sent)


# ---- bad inputs ---------------------------------------------------------------------------------------------


def test_a_chain_that_produces_no_messages_fails_clearly(chat_decoder):
    chain = RunnableLambda(lambda question: []) | HybridSpecLLM(decoder=chat_decoder)
    with pytest.raises(ValueError, match="no messages"):
        chain.invoke("anything")


def test_attach_documents_without_the_context_key_fails_clearly(chat_decoder):
    chain = attach_documents(RAG_PROMPT, key="passages") | HybridSpecLLM(decoder=chat_decoder)
    with pytest.raises(ValueError, match="'passages'"):
        chain.invoke({"context": "x", "question": "y"})
