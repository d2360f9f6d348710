"""Import an optional dependency or fail with the pip command that installs it.

The retrieval integrations (faiss, sentence-transformers, LangChain, LlamaIndex) are extras: the decoder itself
must import without them.
"""

from __future__ import annotations

import importlib
from types import ModuleType

EXTRA_HINT = "pip install 'hsd-rag[rag]'"


def missing_message(pip_name: str, purpose: str) -> str:
    return f"{purpose} needs the optional package `{pip_name}`: `pip install {pip_name}` (or `{EXTRA_HINT}`)."


def require(module: str, pip_name: str, purpose: str) -> ModuleType:
    """`importlib.import_module(module)`, or an ImportError naming both the package and the hsd-rag extra."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(missing_message(pip_name, purpose)) from error
