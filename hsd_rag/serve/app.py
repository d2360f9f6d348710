"""The FastAPI app: thin routes over OpenAIServing, auth, the body limit, errors in OpenAI's shape, lifespan.

Lifespan: the engine's worker starts with the app; on shutdown uvicorn first stops accepting connections and
lets open requests finish (`timeout_graceful_shutdown`), then the engine drains what is left for
`drain_timeout_s` and cancels the rest, so a stopping server never leaves a client hanging.
"""

from __future__ import annotations

import hmac
from contextlib import asynccontextmanager

try:
    from fastapi import APIRouter, Depends, FastAPI, Header, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as error:
    raise ImportError("The server needs FastAPI, uvicorn and prometheus-client: pip install 'hsd-rag[serve]'.") \
        from error

from hsd_rag.decoder import HybridSpecDecoder
from hsd_rag.integrations_common import model_name
from hsd_rag.serve.engine import GenerationEngine
from hsd_rag.serve.errors import APIError, InvalidRequest, PayloadTooLarge, Unauthorized
from hsd_rag.serve.metrics import ServerMetrics
from hsd_rag.serve.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from hsd_rag.serve.serving import OpenAIServing
from hsd_rag.serve.settings import ServerSettings

HTTP_ERROR_TYPES = {404: "not_found_error", 405: "invalid_request_error"}


def create_app(decoder: HybridSpecDecoder, settings: ServerSettings | None = None) -> FastAPI:
    """An OpenAI-compatible app over a loaded decoder (serve it with uvicorn, or `hsd_rag.serve.run`)."""
    settings = settings or ServerSettings()
    metrics = ServerMetrics()
    engine = GenerationEngine(decoder, metrics, max_queue=settings.max_queue)
    served_name = settings.model_name or model_name(decoder)
    serving = OpenAIServing(decoder, engine, settings, metrics, served_name)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await engine.shutdown(settings.drain_timeout_s)

    app = FastAPI(title="hsd-rag", summary="OpenAI-compatible server over HybridSpecDecoder", lifespan=lifespan)
    app.state.engine, app.state.metrics, app.state.serving = engine, metrics, serving
    _install_error_handlers(app)
    app.add_middleware(BodyLimit, max_body_bytes=settings.max_body_bytes)

    def require_api_key(authorization: str | None = Header(default=None)) -> None:
        if settings.api_key is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise Unauthorized("Missing or wrong API key: send `Authorization: Bearer <key>` (the key given to "
                               "`hsd-rag serve --api-key`).")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])

    @v1.get("/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=served_name, max_model_len=decoder.context_window)])

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await serving.chat_completion(body, request)

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await serving.completion(body, request)

    app.include_router(v1)

    @app.get("/health")
    async def health():
        if not engine.accepting:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        return {"status": "ok", "model": served_name, "queued": engine.queued}

    @app.get("/metrics")
    async def prometheus_metrics():
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, error: RequestValidationError):
        """FastAPI says 422 with its own body; OpenAI clients expect 400 with one readable message."""
        problems, param = [], None
        for e in error.errors():
            loc = [str(part) for part in e.get("loc", ()) if part != "body"]
            param = param or (".".join(loc) or None)
            msg = e.get("msg", "invalid").removeprefix("Value error, ")
            if e.get("type") == "extra_forbidden":
                msg = "unsupported parameter (this server does not know it)"
            problems.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
        state = request.app.state
        endpoint = "chat" if request.url.path.endswith("/chat/completions") else "completions"
        state.metrics.requests.labels(endpoint, "400").inc()
        return InvalidRequest("Invalid request: " + "; ".join(problems), param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        kind = HTTP_ERROR_TYPES.get(error.status_code, "invalid_request_error")
        message = f"{error.detail}: {request.method} {request.url.path}"
        body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
        return JSONResponse(body, status_code=error.status_code, headers=getattr(error, "headers", None))


class BodyLimit:
    """Refuse a body larger than the limit from its Content-Length, before reading it (plain ASGI, so streaming
    responses and disconnect detection pass through untouched)."""

    def __init__(self, app, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            length = dict(scope["headers"]).get(b"content-length", b"")
            if length.isdigit() and int(length) > self.max_body_bytes:
                error = PayloadTooLarge(
                    f"The request body has {int(length)} bytes; this server takes at most {self.max_body_bytes} "
                    "(--max-body-bytes). Send fewer or shorter documents."
                )
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)
