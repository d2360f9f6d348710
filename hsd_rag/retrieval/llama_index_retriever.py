"""A FolderIndex for LlamaIndex: a retriever, a query engine for any LlamaIndex LLM, and a `VectorStoreIndex`
view. Only `source` (and `page` for a PDF) is shown to the LLM with each chunk: the offsets are for citations,
not for the prompt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from hsd_rag.data.prompt import RAG_PROMPT_TEMPLATE
from hsd_rag.retrieval.embeddings import LlamaIndexEmbeddings, embedding_dimension, embedding_name
from hsd_rag.retrieval.index import FolderIndex, RetrievedChunk
from hsd_rag.retrieval.optional import missing_message, require
from hsd_rag.retrieval.vectorstore import DEFAULT_K, FaissStore

try:
    from langchain_core.embeddings import Embeddings
    from llama_index.core import StorageContext, VectorStoreIndex
    from llama_index.core.base.base_retriever import BaseRetriever
    from llama_index.core.base.embeddings.base import BaseEmbedding
    from llama_index.core.llms import LLM
    from llama_index.core.prompts import PromptTemplate
    from llama_index.core.query_engine import RetrieverQueryEngine
    from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode
except ImportError as error:
    raise ImportError(missing_message("llama-index-core", "FolderNodeRetriever")) from error
from pydantic import PrivateAttr

HIDDEN_METADATA = ["chunk_index", "start_index", "total_pages"]
# The benchmark prompt in LlamaIndex's field names, so engine prompts match the measured ones.
RAG_QA_TEMPLATE = RAG_PROMPT_TEMPLATE.format(passages="{context_str}", query="{query_str}")


class LangChainEmbedding(BaseEmbedding):
    """LangChain `Embeddings` behind LlamaIndex's `BaseEmbedding`, returning unit-length vectors (so that the
    inner product of the view's FAISS index is the cosine similarity, as in the LangChain store)."""

    _inner: Embeddings = PrivateAttr()

    def __init__(self, inner: Embeddings, **kwargs: Any):
        super().__init__(model_name=embedding_name(inner), **kwargs)
        self._inner = inner

    @classmethod
    def class_name(cls) -> str:
        return "LangChainEmbedding"

    @staticmethod
    def _unit(vector: list[float]) -> list[float]:
        norm = float(np.linalg.norm(vector))
        return [x / norm for x in vector] if norm > 0 else list(vector)

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._unit(self._inner.embed_query(query))

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self._unit(await self._inner.aembed_query(query))

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._unit(self._inner.embed_documents([text])[0])

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return [self._unit(v) for v in self._inner.embed_documents(texts)]

    async def _aget_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return [self._unit(v) for v in await self._inner.aembed_documents(texts)]


def llama_index_embedding(embedding: Embeddings) -> BaseEmbedding:
    """The LlamaIndex model behind our wrapper when there is one, else the LangChain model wrapped."""
    if isinstance(embedding, LlamaIndexEmbeddings) and getattr(embedding.model, "normalize", False):
        return embedding.model
    return LangChainEmbedding(embedding)


def chunk_node(
    text: str, metadata: dict, chunk_id: str | None, embedding: list[float] | None = None
) -> TextNode:
    """A chunk as a TextNode: id `source#chunk_index` (readable in citations), offsets hidden from the LLM."""
    node_id = (
        f"{metadata['source']}#{metadata['chunk_index']}"
        if "source" in metadata and "chunk_index" in metadata
        else chunk_id
    )
    return TextNode(
        id_=node_id,
        text=text,
        metadata=dict(metadata),
        embedding=embedding,
        excluded_llm_metadata_keys=list(HIDDEN_METADATA),
        excluded_embed_metadata_keys=list(HIDDEN_METADATA),
    )


def vector_store_index(store: FaissStore) -> VectorStoreIndex:
    """The store's chunks and vectors as a `VectorStoreIndex` over LlamaIndex's `FaissVectorStore`."""
    try:
        from llama_index.vector_stores.faiss import FaissVectorStore
    except ImportError as error:
        raise ImportError(
            missing_message("llama-index-vector-stores-faiss", "FolderIndex.as_llama_index")
        ) from error
    faiss = require("faiss", "faiss-cpu", "FolderIndex.as_llama_index")
    documents, vectors = store.snapshot()
    dimension = store.dimension or embedding_dimension(store.embedding)
    nodes = [
        chunk_node(d.page_content, d.metadata, d.id, v.tolist())
        for d, v in zip(documents, vectors, strict=True)
    ]
    storage = StorageContext.from_defaults(
        vector_store=FaissVectorStore(faiss_index=faiss.IndexFlatIP(dimension))
    )
    return VectorStoreIndex(
        nodes, storage_context=storage, embed_model=llama_index_embedding(store.embedding)
    )


class FolderNodeRetriever(BaseRetriever):
    """Top-`k` chunks of a document folder as `NodeWithScore(TextNode)`, score = cosine similarity."""

    def __init__(self, index: FolderIndex, k: int = DEFAULT_K, **kwargs: Any):
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        self.index = index
        self.k = k
        super().__init__(**kwargs)

    @classmethod
    def from_folder(cls, folder: str | Path, k: int = DEFAULT_K, **index_kwargs: Any) -> FolderNodeRetriever:
        """Open (or build) the folder's index, see `FolderIndex.open` for `index_kwargs`."""
        return cls(FolderIndex.open(folder, **index_kwargs), k=k)

    @staticmethod
    def _nodes(chunks: list[RetrievedChunk]) -> list[NodeWithScore]:
        return [NodeWithScore(node=chunk_node(c.text, c.metadata, c.id), score=c.score) for c in chunks]

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return self._nodes(self.index.search(query_bundle.query_str, self.k))

    async def _aretrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        """The query is embedded off the event loop (the embedding model's own async path)."""
        return self._nodes(await self.index.asearch(query_bundle.query_str, self.k))


def build_query_engine(
    retriever: FolderNodeRetriever | FolderIndex, llm: LLM, k: int = DEFAULT_K, **engine_kwargs: Any
) -> RetrieverQueryEngine:
    """A `RetrieverQueryEngine` answering with `llm` (e.g. HybridSpecLLM) from the folder's chunks.

    The question-answering prompt defaults to the benchmark's RAG prompt; pass `text_qa_template` to change it.
    """
    if isinstance(retriever, FolderIndex):
        retriever = FolderNodeRetriever(retriever, k=k)
    engine_kwargs.setdefault("text_qa_template", PromptTemplate(RAG_QA_TEMPLATE))
    return RetrieverQueryEngine.from_args(retriever, llm=llm, **engine_kwargs)
