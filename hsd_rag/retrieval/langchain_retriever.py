"""`FolderRetriever`: a FolderIndex as a LangChain retriever, for `retriever | prompt | HybridSpecLLM` chains.

It adds each chunk's cosine similarity to its metadata ("score"). For LangChain's own retriever options (MMR,
score thresholds, metadata filters) use `folder_index.as_retriever(search_type=..., search_kwargs=...)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hsd_rag.retrieval.index import DEFAULT_K, FolderIndex, RetrievedChunk
from hsd_rag.retrieval.optional import missing_message

try:
    from langchain_core.callbacks import AsyncCallbackManagerForRetrieverRun, CallbackManagerForRetrieverRun
    from langchain_core.documents import Document
    from langchain_core.retrievers import BaseRetriever
except ImportError as error:
    raise ImportError(missing_message("langchain-core", "FolderRetriever")) from error
from pydantic import ConfigDict, Field


class FolderRetriever(BaseRetriever):
    """Top-`k` chunks of a document folder; each Document's metadata has source, chunk_index, start_index and
    score (and page for a PDF)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    index: FolderIndex = Field(
        description="The searched index; its search is thread-safe, so async calls share it."
    )
    k: int = Field(default=DEFAULT_K, gt=0, description="How many chunks each query returns.")

    @classmethod
    def from_folder(cls, folder: str | Path, k: int = DEFAULT_K, **index_kwargs: Any) -> FolderRetriever:
        """Open (or build) the folder's index, see `FolderIndex.open` for `index_kwargs`."""
        return cls(index=FolderIndex.open(folder, **index_kwargs), k=k)

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun, k: int | None = None
    ) -> list[Document]:
        """`k` given to `invoke(query, k=...)` overrides the field for one call."""
        return [self._document(chunk) for chunk in self.index.search(query, k or self.k)]

    async def _aget_relevant_documents(
        self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun, k: int | None = None
    ) -> list[Document]:
        """The query is embedded through the embedding model's own async path."""
        return [self._document(chunk) for chunk in await self.index.asearch(query, k or self.k)]

    @staticmethod
    def _document(chunk: RetrievedChunk) -> Document:
        return Document(
            page_content=chunk.text, metadata={**chunk.metadata, "score": chunk.score}, id=chunk.id
        )
