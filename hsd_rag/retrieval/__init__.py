"""Retrieval over a document folder: loaders, chunking, embedders and a FAISS index.

The LangChain and LlamaIndex retrievers live in `hsd_rag.retrieval.langchain_retriever` and
`hsd_rag.retrieval.llama_index_retriever`; they are not imported here so that this package works without them.
"""

from hsd_rag.retrieval.chunking import DEFAULT_CHUNK_OVERLAP, DEFAULT_CHUNK_SIZE, Chunk, chunk_documents
from hsd_rag.retrieval.embedder import Embedder, SentenceTransformerEmbedder, default_embedder, load_embedder
from hsd_rag.retrieval.index import (
    FolderIndex,
    IndexMismatchError,
    RetrievedChunk,
    UpdateReport,
    default_index_dir,
)
from hsd_rag.retrieval.loaders import (
    SUPPORTED_EXTENSIONS,
    LoadedDocument,
    LoadReport,
    NoDocumentsError,
    SkippedFile,
    SkippedFileWarning,
    load_folder,
)

__all__ = [
    "DEFAULT_CHUNK_OVERLAP",
    "DEFAULT_CHUNK_SIZE",
    "SUPPORTED_EXTENSIONS",
    "Chunk",
    "Embedder",
    "FolderIndex",
    "IndexMismatchError",
    "LoadReport",
    "LoadedDocument",
    "NoDocumentsError",
    "RetrievedChunk",
    "SentenceTransformerEmbedder",
    "SkippedFile",
    "SkippedFileWarning",
    "UpdateReport",
    "chunk_documents",
    "default_embedder",
    "default_index_dir",
    "load_embedder",
    "load_folder",
]
