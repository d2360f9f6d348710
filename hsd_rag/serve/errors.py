"""Errors as OpenAI clients expect them: a status code and {"error": {"message", "type", "param", "code"}}.

Every failure the server knows about is an `APIError` subclass carrying its status, so handlers raise and one
exception handler renders; the `openai` SDK turns the status into its matching exception class
(400 BadRequestError, 401 AuthenticationError, 404 NotFoundError, 429 RateLimitError, ...).
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

from hsd_rag.serve.protocol import ErrorInfo, ErrorResponse


class APIError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or type(self).code
        self.headers = headers or {}

    def body(self) -> dict:
        info = ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=info).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class InvalidRequest(APIError):
    status = 400
    type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class Unauthorized(APIError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class ModelNotFound(APIError):
    status = 404
    type = "not_found_error"
    code = "model_not_found"


class PayloadTooLarge(APIError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class QueueFull(APIError):
    """The bounded queue is full: retry after `Retry-After` seconds."""

    status = 429
    type = "rate_limit_error"
    code = "queue_full"

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})
        self.retry_after_s = retry_after_s


class ShuttingDown(APIError):
    status = 503
    type = "service_unavailable"
    code = "shutting_down"


class DeadlineExceeded(APIError):
    status = 504
    type = "timeout_error"
    code = "deadline_exceeded"


class GenerationFailed(APIError):
    status = 500
    type = "server_error"
    code = "generation_failed"


class Cancelled(Exception):
    """The request was cancelled (client gone, server stopping): nobody waits for an answer."""
