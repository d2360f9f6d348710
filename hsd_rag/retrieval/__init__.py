"""Retrieval over a document folder, built from LangChain's and LlamaIndex's own parts.

`FolderIndex` (one call: load, chunk, embed, index, update incrementally), `FolderLoader` (a LangChain
`BaseLoader`), `FaissStore` (a LangChain `VectorStore`, saved without pickle) and the embedding helpers. The
LangChain and LlamaIndex retrievers live in `hsd_rag.retrieval.langchain_retriever` and
`hsd_rag.retrieval.llama_index_retriever`.

Names are imported on first use, so `import hsd_rag.retrieval` works without the optional packages (the `rag`
extra) and never imports the model loader; using a name without them raises an ImportError with the pip command.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DEFAULT_CHUNK_OVERLAP": "chunking",
    "DEFAULT_CHUNK_SIZE": "chunking",
    "split_documents": "chunking",
    "LlamaIndexEmbeddings": "embeddings",
    "as_langchain_embeddings": "embeddings",
    "default_embedding": "embeddings",
    "load_embedding": "embeddings",
    "FolderIndex": "index",
    "IndexMismatchError": "index",
    "RetrievedChunk": "index",
    "UpdateReport": "index",
    "default_index_dir": "index",
    "SUPPORTED_EXTENSIONS": "loaders",
    "FolderLoader": "loaders",
    "NoDocumentsError": "loaders",
    "SkippedFile": "loaders",
    "SkippedFileWarning": "loaders",
    "UnreadableFileError": "loaders",
    "FaissStore": "vectorstore",
    "StoreFileError": "vectorstore",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hsd_rag.retrieval' has no attribute {name!r}")
    return getattr(importlib.import_module(f"hsd_rag.retrieval.{_EXPORTS[name]}"), name)
