"""A FolderIndex as a LlamaIndex retriever, and a query engine over it for any LlamaIndex LLM.

Only `source` is shown to the LLM with each chunk: the offsets are for citations, not for the prompt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hsd_rag.data.prompt import RAG_PROMPT_TEMPLATE
from hsd_rag.retrieval.index import DEFAULT_K, FolderIndex
from hsd_rag.retrieval.optional import missing_message

try:
    from llama_index.core.base.base_retriever import BaseRetriever
    from llama_index.core.llms import LLM
    from llama_index.core.prompts import PromptTemplate
    from llama_index.core.query_engine import RetrieverQueryEngine
    from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode
except ImportError as error:
    raise ImportError(missing_message("llama-index-core", "FolderNodeRetriever")) from error

HIDDEN_METADATA = ["chunk_index", "start_index"]
# The benchmark prompt in LlamaIndex's field names, so engine prompts match the measured ones.
RAG_QA_TEMPLATE = RAG_PROMPT_TEMPLATE.format(passages="{context_str}", query="{query_str}")


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

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        results = []
        for chunk in self.index.search(query_bundle.query_str, self.k):
            node = TextNode(
                id_=f"{chunk.metadata['source']}#{chunk.metadata['chunk_index']}",
                text=chunk.text,
                metadata=dict(chunk.metadata),
                excluded_llm_metadata_keys=list(HIDDEN_METADATA),
                excluded_embed_metadata_keys=list(HIDDEN_METADATA),
            )
            results.append(NodeWithScore(node=node, score=chunk.score))
        return results


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
