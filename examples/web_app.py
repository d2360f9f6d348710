"""A small web page over a folder of documents: ask a question, watch the answer stream in token by token,
each token coloured by the draft source that produced it, then see the stats and the retrieved sources.

    python examples/web_app.py [folder] --port 8000     # then open http://127.0.0.1:8000/?q=Your+question

Standard library only (`http.server`). Routes:
    GET /                the page (examples/static/index.html); `?q=...` asks at once
    GET /static/...      its script and style sheet
    GET /api/ask?q=...   the answer as Server-Sent Events: one `token` event per generated token
                         ({token_id, text, source, step}), then `done` ({stats, summary, sources, text}),
                         or `error` ({error}) if generation fails midway. A question that cannot be asked
                         (empty, too long for the model) is an HTTP 400 with {error} instead.
"""

from __future__ import annotations

import argparse
import html
import json
from dataclasses import asdict
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from hsd_rag import HybridSpecDecoder
from hsd_rag.app import DEFAULT_K, ask, format_stats
from hsd_rag.retrieval import FolderIndex

HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"
DEFAULT_FOLDER = HERE / "docs"
DEFAULT_PORT = 8000
DEFAULT_MAX_NEW_TOKENS = 128  # a few sentences: enough for a factual answer, quick on a laptop CPU
FILES = {"/": "index.html", "/static/app.js": "app.js", "/static/style.css": "style.css"}
CONTENT_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
FOLDER_PLACEHOLDER = "{{folder}}"


class QAServer(ThreadingHTTPServer):
    """Holds what every request shares: one decoder (it serialises generations itself), one index."""

    daemon_threads = True  # a browser that keeps a stream open must not keep the process alive at exit

    def __init__(self, address, decoder: HybridSpecDecoder, index: FolderIndex, k: int, generation: dict):
        super().__init__(address, QAHandler)
        self.decoder = decoder
        self.index = index
        self.k = k
        self.generation = generation

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


class QAHandler(BaseHTTPRequestHandler):
    server: QAServer

    def do_GET(self):
        url = urlsplit(self.path)
        if url.path == "/api/ask":
            self._answer(parse_qs(url.query).get("q", [""])[0])
        elif url.path in FILES:
            self._send_file(STATIC / FILES[url.path])
        else:
            self._send_json(HTTPStatus.NOT_FOUND, {"error": f"Nothing at {url.path}."})

    def _answer(self, question: str) -> None:
        server = self.server
        try:  # retrieval and prompt checks happen here, before any token, so failures can still be a 400
            answer = ask(server.decoder, server.index, question, server.k, per_token=True, **server.generation)
        except ValueError as err:  # empty question, prompt longer than the context window, bad settings
            self._send_json(HTTPStatus.BAD_REQUEST, {"error": str(err)})
            return
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        pieces = iter(answer.stream)
        try:
            for piece in pieces:
                self._event("token", asdict(piece))
            result = answer.stream.result
            sources = [{"source": c.metadata.get("source"), "score": c.score, "text": c.text} for c in answer.chunks]
            self._event("done", {"stats": result.stats.to_dict(), "summary": format_stats(result.stats),
                                 "sources": sources, "text": result.text})
        except (BrokenPipeError, ConnectionResetError):
            pass  # the browser left: stop generating
        except Exception as err:  # reported to the page, which would otherwise wait forever
            self.log_error("generation failed: %r", err)
            self._event("error", {"error": f"Generation failed: {err}"})
        finally:
            pieces.close()  # ends the decode loop now (and releases the decoder) if it stopped early

    def _event(self, name: str, data: dict) -> None:
        self.wfile.write(f"event: {name}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode())
        self.wfile.flush()

    def _send_file(self, path: Path) -> None:
        body = path.read_text(encoding="utf-8")
        if path.suffix == ".html":
            body = body.replace(FOLDER_PLACEHOLDER, html.escape(str(self.server.index.folder)))
        self._send(HTTPStatus.OK, CONTENT_TYPES[path.suffix], body.encode())

    def _send_json(self, status: HTTPStatus, data: dict) -> None:
        self._send(status, "application/json", json.dumps(data).encode())

    def _send(self, status: HTTPStatus, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", f"{content_type}; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def make_server(decoder: HybridSpecDecoder, index: FolderIndex, host: str = "127.0.0.1", port: int = 0,
                k: int = DEFAULT_K, **generation) -> QAServer:
    """The app bound to host:port (0 picks a free port; see `.url`), not yet serving: call `serve_forever()`.

    `k` passages are retrieved per question; `generation` holds the decoder's keyword arguments for every
    answer (max_new_tokens, method, budget, ...).
    """
    return QAServer((host, port), decoder, index, k, generation)


def main() -> None:
    parser = argparse.ArgumentParser(description="Ask a folder of documents from a web page.")
    parser.add_argument("folder", nargs="?", default=DEFAULT_FOLDER, help="documents (default: examples/docs)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    parser.add_argument("--k", type=int, default=DEFAULT_K, help="passages retrieved into the prompt")
    parser.add_argument("--target", default=None, help="hub id, local dir or .gguf (default: embedded SmolLM2)")
    args = parser.parse_args()

    index = FolderIndex.open(args.folder)  # embeds only new or changed files; the index is cached
    decoder = HybridSpecDecoder.from_pretrained(args.target)
    server = make_server(decoder, index, port=args.port, k=args.k, max_new_tokens=args.max_new_tokens)
    print(f"Answering from {index.folder} ({len(index.sources)} files) at {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
