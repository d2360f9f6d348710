"""hsd_rag: lossless hybrid speculative decoding (n-gram drafts from retrieved documents + EAGLE-3) for RAG."""

from __future__ import annotations

from hsd_rag.config import DecodeConfig
from hsd_rag.decoder import ContextWindowError, HybridSpecDecoder
from hsd_rag.stats import GenerationResult, GenerationStats
from hsd_rag.tree import TokenTree

__all__ = [
    "ContextWindowError",
    "DecodeConfig",
    "GenerationResult",
    "GenerationStats",
    "HybridSpecDecoder",
    "HybridSpecLLM",
    "TokenTree",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The LangChain adapter is imported lazily so the core decoder works without langchain-core installed.
    if name == "HybridSpecLLM":
        from hsd_rag.langchain import HybridSpecLLM

        return HybridSpecLLM
    raise AttributeError(f"module 'hsd_rag' has no attribute {name!r}")
