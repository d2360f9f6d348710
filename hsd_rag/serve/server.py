"""Running the app: `run` in the foreground (what `hsd-rag serve` does) or `BackgroundServer` in a thread.

uvicorn owns the sockets and signals; on SIGINT/SIGTERM it stops accepting, lets open requests finish for
`drain_timeout_s`, then runs the app's lifespan shutdown (the engine drains and stops).
"""

from __future__ import annotations

import socket
import threading
import time

from hsd_rag.decoder import HybridSpecDecoder
from hsd_rag.serve.app import create_app
from hsd_rag.serve.settings import ServerSettings

STARTUP_TIMEOUT_S = 60.0


def _uvicorn():
    try:
        import uvicorn
    except ImportError as error:
        raise ImportError("The server needs FastAPI and uvicorn: pip install 'hsd-rag[serve]'.") from error
    return uvicorn


def run(decoder: HybridSpecDecoder, settings: ServerSettings | None = None, host: str = "127.0.0.1",
        port: int = 8000, log_level: str = "info") -> None:
    """Serve until interrupted (blocks)."""
    uvicorn = _uvicorn()
    settings = settings or ServerSettings()
    app = create_app(decoder, settings)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=max(1, round(settings.drain_timeout_s)))
    uvicorn.Server(config).run()


class BackgroundServer:
    """Serve an app on a free loopback port in a background thread (tests, notebooks, load scripts).

        with BackgroundServer(create_app(decoder)) as server:
            client = OpenAI(base_url=server.base_url + "/v1", api_key="-")
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, drain_timeout_s: float = 5.0):
        self.app = app
        self.host = host
        self.port = port
        self.drain_timeout_s = drain_timeout_s
        self._server = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> BackgroundServer:
        uvicorn = _uvicorn()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning",
                                timeout_graceful_shutdown=max(1, round(self.drain_timeout_s)))
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name="hsd-rag-server", daemon=True)
        self._thread.start()
        give_up = time.monotonic() + STARTUP_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > give_up:
                raise RuntimeError("The background server did not start (see the log above).")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 60.0) -> None:
        """Graceful: uvicorn drains open requests, then the app's lifespan drains the engine."""
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(timeout_s)
            self._server = None

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
