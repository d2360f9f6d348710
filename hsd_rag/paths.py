"""Where hsd_rag keeps its files: one user cache directory, shared by models, profiles, data and indexes.

Its own module so that code which only needs the path (retrieval, data) does not import the model loader
(and torch with it).
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "HSD_RAG_CACHE"


def cache_dir() -> Path:
    """Where de-quantized models, tuned budgets and indexes are cached (`$HSD_RAG_CACHE` overrides)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("hsd_rag"))
