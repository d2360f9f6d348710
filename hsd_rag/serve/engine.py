"""GenerationEngine: one worker thread runs the decoder; the event loop submits jobs and awaits their pieces.

Why a worker of its own: the decoder's stream is a synchronous generator that holds torch state (inference
mode is thread-local, the KV cache lives in the generator), so one thread must drive it from start to close.
The event loop only enqueues, awaits pieces posted back with `call_soon_threadsafe`, and cancels.

Requests are served one at a time in arrival order (a bounded FIFO): the engine serialises them itself and does
not rely on any locking inside the decoder. When `max_queue` requests are already waiting, `submit` refuses
with 429 and a Retry-After estimated from recent service times. Cancelling a job (client gone, deadline,
shutdown) removes it from the queue, or stops its generation at the next token and closes the generator, which
releases the decoder and runs the drafters' cleanup.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from hsd_rag.decoder import HybridSpecDecoder, TokenPiece
from hsd_rag.serve.errors import Cancelled, DeadlineExceeded, GenerationFailed, QueueFull, ShuttingDown
from hsd_rag.serve.metrics import ServerMetrics
from hsd_rag.stats import GenerationResult

SERVICE_TIME_SMOOTHING = 0.2  # weight of the newest request in the running mean of service time (Retry-After)
INITIAL_SERVICE_TIME_S = 1.0  # Retry-After before any request has finished
DRAIN_POLL_S = 0.05  # how often shutdown checks whether the queue has drained


@dataclass
class GenerationRequest:
    """One generation as the engine sees it: validated, tokenized, with an absolute deadline."""

    prompt_ids: list[int]
    documents: list[str]  # texts for this request's n-gram index only
    settings: dict[str, Any]  # HybridSpecDecoder generation kwargs (already validated)
    deadline: float  # time.monotonic() by which the last token must be out


@dataclass
class Delta:
    """Text and tokens decided since the previous delta (all pieces already waiting, merged)."""

    text: str
    token_ids: list[int]


@dataclass
class Outcome:
    """How a finished generation ended, with the times the engine measured."""

    result: GenerationResult
    queue_s: float
    generation_s: float


@dataclass
class _Stopped:
    reason: str


@dataclass
class _Failed:
    error: BaseException


class GenerationJob:
    """A submitted request: `async for delta in job.deltas()`, then `job.outcome`. `cancel()` at any time."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop,
                 on_cancel: Callable[[GenerationJob, str], None] | None = None):
        self.request = request
        self._on_cancel = on_cancel
        self.submitted_at = time.monotonic()
        self.started_at: float | None = None
        self.outcome: Outcome | None = None
        self.cancel_reason: str | None = None
        self._loop = loop
        self._events: asyncio.Queue = asyncio.Queue()
        self._cancelled = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self, reason: str) -> None:
        """Stop this job (idempotent; a no-op once it has finished). The engine sees it at the next token."""
        if self.outcome is None and not self._cancelled.is_set():
            self.cancel_reason = reason
            self._cancelled.set()
            if self._on_cancel is not None:
                self._on_cancel(self, reason)

    def post(self, event) -> None:
        """From the worker thread: hand an event to the consumer on the event loop."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancel("event loop closed")

    async def deltas(self) -> AsyncIterator[Delta]:
        """Pieces as they come, merged when several are waiting; raises on failure, deadline or shutdown."""
        while True:
            remaining = self.request.deadline - time.monotonic()
            try:
                if remaining <= 0:
                    raise TimeoutError
                first = await asyncio.wait_for(self._events.get(), timeout=remaining)
            except TimeoutError:
                self.cancel("deadline")
                raise DeadlineExceeded(
                    f"The request did not finish within its deadline ({self._deadline_s():.0f} s, queueing "
                    "included); raise `timeout` (up to the server's --request-timeout) or ask for fewer tokens."
                ) from None
            events = [first]
            while not self._events.empty():
                events.append(self._events.get_nowait())
            pieces = [e for e in events if isinstance(e, TokenPiece)]
            if pieces:
                yield Delta("".join(p.text for p in pieces), [p.token_id for p in pieces])
            end = next((e for e in events if not isinstance(e, TokenPiece)), None)
            if isinstance(end, Outcome):
                self.outcome = end
                return
            if isinstance(end, _Failed):
                raise end.error
            if isinstance(end, _Stopped):
                if end.reason == "shutdown":
                    raise ShuttingDown("The server is shutting down; retry against a running instance.")
                raise Cancelled(end.reason)

    def _deadline_s(self) -> float:
        return self.request.deadline - self.submitted_at


@dataclass
class _Queue:
    waiting: deque = field(default_factory=deque)
    running: GenerationJob | None = None
    closing: bool = False  # no new jobs (shutdown has begun)
    stopped: bool = False  # the worker should exit


class GenerationEngine:
    """Runs a HybridSpecDecoder's generations one at a time in a worker thread, fed by a bounded FIFO queue."""

    def __init__(self, decoder: HybridSpecDecoder, metrics: ServerMetrics | None = None, max_queue: int = 64):
        self.decoder = decoder
        self.metrics = metrics or ServerMetrics()
        self.max_queue = max_queue
        self._state = _Queue()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._service_s = INITIAL_SERVICE_TIME_S
        self.metrics.queue_depth.set_function(lambda: len(self._state.waiting))

    # ---- lifecycle ------------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="hsd-rag-engine", daemon=True)
            self._thread.start()

    async def shutdown(self, drain_timeout_s: float) -> None:
        """Refuse new jobs, let queued and running ones finish for up to `drain_timeout_s`, cancel the rest."""
        with self._cond:
            self._state.closing = True
        give_up = time.monotonic() + drain_timeout_s
        while self.busy and time.monotonic() < give_up:
            await asyncio.sleep(DRAIN_POLL_S)
        with self._cond:
            left = list(self._state.waiting)
            self._state.waiting.clear()
            running = self._state.running
            self._state.stopped = True
            self._cond.notify_all()
        for job in left:
            self._cancel_queued(job, "shutdown")
        if running is not None:
            running.cancel("shutdown")
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    @property
    def busy(self) -> bool:
        return bool(self._state.waiting) or self._state.running is not None

    @property
    def accepting(self) -> bool:
        return not self._state.closing

    @property
    def queued(self) -> int:
        return len(self._state.waiting)

    # ---- the event loop's side ------------------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> GenerationJob:
        """Queue a generation (call from the event loop). Raises QueueFull (429) or ShuttingDown (503)."""
        job = GenerationJob(request, asyncio.get_running_loop(), on_cancel=self._forget)
        with self._cond:
            state = self._state
            if state.closing:
                self.metrics.rejected.labels("shutting_down").inc()
                raise ShuttingDown("The server is shutting down; retry against a running instance.")
            # An idle engine takes one job straight away, so it does not count against the waiting room.
            room = self.max_queue + (0 if state.running is not None else 1)
            if len(state.waiting) >= room:
                self.metrics.rejected.labels("queue_full").inc()
                retry = self.retry_after_s()
                raise QueueFull(
                    f"The server is busy: {len(state.waiting)} requests are waiting (--max-queue "
                    f"{self.max_queue}). Retry after {retry} s.",
                    retry,
                )
            state.waiting.append(job)
            self._cond.notify_all()
        return job

    def _forget(self, job: GenerationJob, reason: str) -> None:
        """A job was cancelled: drop it from the queue (a running one stops at its next token)."""
        with self._cond:
            if job in self._state.waiting:
                self._state.waiting.remove(job)
        self.metrics.cancelled.labels(reason).inc()

    def retry_after_s(self) -> int:
        """Seconds until the queue likely has room again: about one request's service time."""
        return max(1, math.ceil(self._service_s))

    def _cancel_queued(self, job: GenerationJob, reason: str) -> None:
        job.cancel(reason)
        job.post(_Stopped(reason))  # its consumer is waiting for events, not for the worker

    # ---- the worker thread ----------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._state.waiting and not self._state.stopped:
                    self._cond.wait()
                if self._state.stopped:
                    return
                job = self._state.waiting.popleft()
                self._state.running = job
            try:
                if not job.cancelled:
                    self._generate(job)
            finally:
                with self._cond:
                    self._state.running = None

    def _generate(self, job: GenerationJob) -> None:
        """Drive one generation entirely in this thread, posting pieces; stop at the next token on cancel."""
        job.started_at = time.monotonic()
        self.metrics.queue_wait.observe(job.started_at - job.submitted_at)
        self.metrics.running.set(1)
        request = job.request
        try:
            stream = self.decoder.stream_tokens(request.prompt_ids, request.documents, **request.settings)
            pieces = iter(stream)
            try:
                for piece in pieces:
                    self.metrics.tokens_generated(1)
                    if job.cancelled:
                        break
                    job.post(piece)
            finally:
                pieces.close()  # releases the decoder and runs the drafters' cleanup, also when stopped early
            if job.cancelled:
                job.post(_Stopped(job.cancel_reason or "cancelled"))
                return
            generation_s = time.monotonic() - job.started_at
            self._service_s += SERVICE_TIME_SMOOTHING * (generation_s - self._service_s)
            self.metrics.generation_finished(stream.result.stats)
            job.post(Outcome(stream.result, job.started_at - job.submitted_at, generation_s))
        except Exception as error:  # reported to the request that caused it; the engine keeps serving
            job.post(_Failed(GenerationFailed(f"Generation failed: {type(error).__name__}: {error}")))
        finally:
            self.metrics.running.set(0)
