"""OpenAIServing: OpenAI requests -> engine jobs -> OpenAI responses (whole or SSE), with limits and metrics.

The route handlers in app.py only call these methods. Everything that can be refused is refused before the job
is queued (bad values 400, prompt or documents over the limits 400 / 413, queue full 429), so a client never
waits in the queue for an answer it could have had at once.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from hsd_rag.decoder import HybridSpecDecoder
from hsd_rag.integrations_common import FINISH_REASONS
from hsd_rag.serve.engine import GenerationEngine, GenerationJob, GenerationRequest, Outcome
from hsd_rag.serve.errors import (
    APIError,
    Cancelled,
    ContextLengthExceeded,
    InvalidRequest,
    ModelNotFound,
    PayloadTooLarge,
)
from hsd_rag.serve.metrics import ServerMetrics
from hsd_rag.serve.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DecodingStats,
    DeltaMessage,
    RequestBase,
    Usage,
    new_id,
    unix_time,
)
from hsd_rag.serve.settings import ServerSettings

CHAT, COMPLETIONS = "chat", "completions"
SSE_DONE = "data: [DONE]\n\n"


def sse(payload: dict | Any) -> str:
    body = payload if isinstance(payload, dict) else payload.model_dump(exclude_none=True)
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


class OpenAIServing:
    def __init__(self, decoder: HybridSpecDecoder, engine: GenerationEngine, settings: ServerSettings,
                 metrics: ServerMetrics, model_name: str):
        self.decoder = decoder
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self.model_name = model_name

    @property
    def context_window(self) -> int | None:
        return self.decoder.context_window

    # ---- endpoints ------------------------------------------------------------------------------------------

    async def chat_completion(self, body: ChatCompletionRequest, raw: Request):
        messages = [m.as_template_message() for m in body.messages]
        return await self._serve(CHAT, body, messages, raw)

    async def completion(self, body: CompletionRequest, raw: Request):
        return await self._serve(COMPLETIONS, body, body.prompt, raw)

    # ---- shared path ----------------------------------------------------------------------------------------

    async def _serve(self, endpoint: str, body: RequestBase, prompt, raw: Request):
        arrived = time.monotonic()
        try:
            request = self._engine_request(body, prompt, arrived)
            job = self.engine.submit(request)
        except APIError as error:
            self.metrics.requests.labels(endpoint, str(error.status)).inc()
            raise
        if body.stream:
            return JobStreamingResponse(job, self._chunks(endpoint, body, job, arrived))
        return await self._whole(endpoint, body, job, raw, arrived)

    def _engine_request(self, body: RequestBase, prompt, arrived: float) -> GenerationRequest:
        """Validate against the model and the limits, tokenize, and fix the deadline."""
        if body.model not in (None, "", self.model_name):
            raise ModelNotFound(
                f"The model {body.model!r} does not exist on this server; it serves {self.model_name!r} "
                "(GET /v1/models).", param="model",
            )
        documents = body.documents or []
        self._check_documents(documents)
        param = "messages" if isinstance(body, ChatCompletionRequest) else "prompt"
        try:
            prompt_ids = self.decoder.encode_prompt(prompt)
        except (ValueError, TypeError) as error:
            raise InvalidRequest(str(error), param=param) from None
        prompt_limit = self.settings.max_prompt_tokens or self.context_window
        window = self.context_window
        if prompt_limit is not None and len(prompt_ids) > prompt_limit:
            raise ContextLengthExceeded(
                f"The prompt has {len(prompt_ids)} tokens; this server accepts at most {prompt_limit}. Send fewer "
                "or shorter documents in the prompt, or a shorter question.", param=param,
            )
        room = None if window is None else window - len(prompt_ids)
        if room is not None and room <= 0:
            raise ContextLengthExceeded(
                f"The prompt has {len(prompt_ids)} tokens and fills the model's context window ({window}); "
                "nothing can be generated. Shorten it.", param=param,
            )
        if body.max_tokens is not None and room is not None and body.max_tokens > room:
            raise ContextLengthExceeded(
                f"max_tokens={body.max_tokens} does not fit: the prompt has {len(prompt_ids)} tokens and the "
                f"context window is {window}, so at most {room} can be generated.", param="max_tokens",
            )
        max_tokens = body.max_tokens or min(self.settings.default_max_tokens, room or self.settings.default_max_tokens)
        settings = self._generation_settings(body, max_tokens)
        timeout = min(body.timeout or self.settings.request_timeout_s, self.settings.request_timeout_s)
        return GenerationRequest(prompt_ids, documents, settings, arrived + timeout)

    def _generation_settings(self, body: RequestBase, max_tokens: int) -> dict[str, Any]:
        s = self.settings
        settings: dict[str, Any] = {
            "max_new_tokens": max_tokens,
            "temperature": s.default_temperature if body.temperature is None else body.temperature,
            "budget": s.default_budget if body.budget is None else body.budget,
            "answer_history": s.answer_history,
        }
        method = body.method or s.default_method
        if method is not None:
            settings["method"] = method
        if body.top_p is not None:
            settings["top_p"] = body.top_p
        if body.stop_list():
            settings["stop"] = body.stop_list()
        if body.seed is not None:
            settings["seed"] = body.seed
        try:
            self.decoder.config(**settings)  # bad values and unavailable methods fail now, as a 400
        except ValueError as error:
            raise InvalidRequest(str(error)) from None
        return settings

    def _check_documents(self, documents: list[str]) -> None:
        s = self.settings
        if len(documents) > s.max_documents:
            raise PayloadTooLarge(
                f"{len(documents)} documents were sent; this server takes at most {s.max_documents} per request "
                "(--max-documents). Send the best ones.", param="documents",
            )
        chars = sum(len(d) for d in documents)
        if chars > s.max_documents_chars:
            raise PayloadTooLarge(
                f"The documents hold {chars} characters; this server takes at most {s.max_documents_chars} per "
                "request (--max-documents-chars). Send fewer or shorter ones.", param="documents",
            )

    # ---- whole responses ------------------------------------------------------------------------------------

    async def _whole(self, endpoint: str, body: RequestBase, job: GenerationJob, raw: Request, arrived: float):
        """Collect the generation; a client that hangs up meanwhile cancels it."""
        watcher = asyncio.create_task(_cancel_on_disconnect(raw, job))
        status, text, first = "500", [], None
        try:
            async for delta in job.deltas():
                first = first or time.monotonic()
                text.append(delta.text)
            status = "200"
        except Cancelled:
            status = "cancelled"
            return JSONResponse({}, status_code=499)  # nobody reads it: the client has gone
        except APIError as error:
            status = str(error.status)
            raise
        finally:
            watcher.cancel()
            self._record(endpoint, status, arrived, first if status == "200" else None)
        outcome = job.outcome
        stats = self._stats(job, outcome)
        if endpoint == CHAT:
            choice = ChatChoice(message=ChatResponseMessage(content="".join(text)),
                                finish_reason=self._finish_reason(outcome),
                                token_ids=self._token_ids(body, outcome))
            response = ChatCompletionResponse(model=self.model_name, choices=[choice], usage=self._usage(outcome, stats),
                                              hsd_rag=stats)
        else:
            choice = CompletionChoice(text="".join(text), finish_reason=self._finish_reason(outcome),
                                      token_ids=self._token_ids(body, outcome))
            response = CompletionResponse(model=self.model_name, choices=[choice], usage=self._usage(outcome, stats),
                                          hsd_rag=stats)
        return JSONResponse(response.model_dump(exclude_none=True))

    # ---- streams --------------------------------------------------------------------------------------------

    async def _chunks(self, endpoint: str, body: RequestBase, job: GenerationJob, arrived: float
                      ) -> AsyncIterator[str]:
        """SSE events; a client that hangs up cancels the generation (Starlette cancels this generator)."""
        make = self._chat_chunk if endpoint == CHAT else self._completion_chunk
        response_id, created = new_id("chatcmpl" if endpoint == CHAT else "cmpl"), unix_time()
        status, first = "cancelled", None
        try:
            if endpoint == CHAT:
                yield sse(make(response_id, created, DeltaMessage(role="assistant", content="")))
            async for delta in job.deltas():
                first = first or time.monotonic()
                if delta.text or body.return_token_ids:
                    yield sse(make(response_id, created, delta.text, token_ids=self._ids(body, delta.token_ids)))
            outcome = job.outcome
            stats = self._stats(job, outcome)
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            yield sse(make(response_id, created, "", finish_reason=self._finish_reason(outcome), stats=stats))
            if include_usage:
                yield sse(make(response_id, created, None, usage=self._usage(outcome, stats), stats=stats))
            yield SSE_DONE
            status = "200"
        except APIError as error:  # headers are gone already: the error travels as an event, as OpenAI's does
            status = str(error.status)
            yield sse(error.body())
            yield SSE_DONE
        except Cancelled:
            status = "cancelled"
        finally:
            job.cancel("disconnect")  # a no-op once finished; otherwise the client hung up mid-stream
            self._record(endpoint, status, arrived, first if status == "200" else None)

    def _chat_chunk(self, response_id: str, created: int, content, *, finish_reason=None, token_ids=None,
                    usage=None, stats=None) -> ChatCompletionChunk:
        delta = content if isinstance(content, DeltaMessage) else DeltaMessage(content=content)
        choices = [] if content is None else [ChatChunkChoice(delta=delta, finish_reason=finish_reason,
                                                              token_ids=token_ids)]
        return ChatCompletionChunk(id=response_id, created=created, model=self.model_name, choices=choices,
                                   usage=usage, hsd_rag=stats)

    def _completion_chunk(self, response_id: str, created: int, content, *, finish_reason=None, token_ids=None,
                          usage=None, stats=None) -> CompletionResponse:
        choices = [] if content is None else [CompletionChoice(text=content, finish_reason=finish_reason,
                                                               token_ids=token_ids)]
        return CompletionResponse(id=response_id, created=created, model=self.model_name, choices=choices,
                                  usage=usage, hsd_rag=stats)

    # ---- bits of responses ----------------------------------------------------------------------------------

    @staticmethod
    def _finish_reason(outcome: Outcome) -> str:
        return FINISH_REASONS.get(outcome.result.stats.stop_reason, "stop")

    @staticmethod
    def _usage(outcome: Outcome, decoding: DecodingStats) -> Usage:
        stats = outcome.result.stats
        return Usage(prompt_tokens=stats.prompt_tokens, completion_tokens=stats.new_tokens,
                     total_tokens=stats.prompt_tokens + stats.new_tokens, hsd_rag=decoding)

    @staticmethod
    def _ids(body: RequestBase, token_ids: list[int]) -> list[int] | None:
        return token_ids if body.return_token_ids else None

    def _token_ids(self, body: RequestBase, outcome: Outcome) -> list[int] | None:
        return self._ids(body, list(outcome.result.token_ids))

    def _stats(self, job: GenerationJob, outcome: Outcome) -> DecodingStats:
        stats = outcome.result.stats
        return DecodingStats(
            method=job.request.settings.get("method", self.decoder.default_method),
            tau=stats.tau,
            steps=stats.steps,
            accepted_by_source=dict(stats.accepted_by_source),
            drafted_by_source=dict(stats.drafted_by_source),
            stop_reason=stats.stop_reason,
            tokens_per_s=stats.tokens_per_s,
            queue_s=outcome.queue_s,
            generation_s=outcome.generation_s,
        )

    def _record(self, endpoint: str, status: str, arrived: float, first: float | None) -> None:
        self.metrics.requests.labels(endpoint, status).inc()
        if status == "200":
            self.metrics.latency.labels(endpoint).observe(time.monotonic() - arrived)
            if first is not None:
                self.metrics.first_token.observe(first - arrived)


class JobStreamingResponse(StreamingResponse):
    """SSE over a job. The job is cancelled however the response ends: also when the client leaves before the
    event generator has started (then the generator's own cleanup never runs)."""

    media_type = "text/event-stream"

    def __init__(self, job: GenerationJob, events: AsyncIterator[str]):
        super().__init__(events, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel("disconnect")  # a no-op once the job has finished


async def _cancel_on_disconnect(raw: Request, job: GenerationJob) -> None:
    """Wait for the client to hang up (the body is already read, so the next message is the disconnect)."""
    while True:
        message = await raw.receive()
        if message["type"] == "http.disconnect":
            job.cancel("disconnect")
            return
