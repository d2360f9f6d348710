"""`hsd-rag serve`: an OpenAI-compatible HTTP server over a loaded HybridSpecDecoder.

    protocol.py  request / response schemas (OpenAI's, plus `documents`, `method`, `budget`, `hsd_rag` stats)
    engine.py    GenerationEngine: the decoder in one worker thread behind a bounded FIFO queue
    serving.py   OpenAIServing: requests -> engine jobs -> whole responses or SSE streams
    app.py       FastAPI routes, auth, errors in OpenAI's shape, lifespan
    metrics.py   Prometheus metrics
    server.py    run (foreground, uvicorn) and BackgroundServer (a thread, for tests and notebooks)
    harness.py   client-side load and fault checks against any OpenAI-compatible base URL (needs only httpx)

The server needs the `serve` extra: pip install 'hsd-rag[serve]'.
"""

from __future__ import annotations

__all__ = ["BackgroundServer", "ServerSettings", "create_app", "run"]


def __getattr__(name: str):
    # Imported lazily so the client-side harness works where FastAPI is not installed.
    if name == "create_app":
        from hsd_rag.serve.app import create_app

        return create_app
    if name in ("BackgroundServer", "run"):
        from hsd_rag.serve import server

        return getattr(server, name)
    if name == "ServerSettings":
        from hsd_rag.serve.settings import ServerSettings

        return ServerSettings
    raise AttributeError(f"module 'hsd_rag.serve' has no attribute {name!r}")
