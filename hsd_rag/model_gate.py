"""One first-come-first-served gate per loaded model: requests take turns on the model, one step at a time.

Every decoder built on the same model object (a LangChain and a LlamaIndex adapter sharing it, two decoders
with different heads, ...) shares this gate, found by `gate_for(model)`. A generation holds it only while it
computes a step (draft, verify, accept, roll back) and never while its consumer handles the step's tokens, so an
abandoned or slow stream blocks nobody. Waiters are served strictly in arrival order (a plain lock lets a
thread that releases and re-acquires overtake the others). While held, `holder` names the request computing,
which is how the EAGLE feature hooks know whose forward is running (hsd_rag.heads.features).
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager


class ReentrantGateError(RuntimeError):
    """A thread asked for the model while it is already computing with it (e.g. generate() inside a drafter)."""


class ModelGate:
    """A FIFO mutex over one model; `hold(owner)` yields the seconds spent waiting for it."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: deque[object] = deque()  # tickets of waiting requests, oldest first
        self._busy = False
        self._thread: int | None = None  # ident of the thread holding the gate
        self.holder: object | None = None  # the request computing now (None when free or held anonymously)

    @property
    def waiting(self) -> int:
        """Requests queued for the model (not counting the one holding it)."""
        return len(self._queue)

    def locked(self) -> bool:
        return self._busy

    @contextmanager
    def hold(self, owner: object | None = None) -> Iterator[float]:
        """Wait for the model (FIFO), hold it for the block, yield how long the wait took."""
        started = time.perf_counter()
        ticket = object()
        with self._cond:
            if self._busy and self._thread == threading.get_ident():
                raise ReentrantGateError(
                    "This thread is already computing with this model (a generation started from inside a drafter, "
                    "logits rule or hook?); run the second generation from another thread or after this step."
                )
            self._queue.append(ticket)
            try:
                while self._busy or self._queue[0] is not ticket:
                    self._cond.wait()
            except BaseException:  # interrupted while waiting: leave the queue so the others keep moving
                self._queue.remove(ticket)
                self._cond.notify_all()
                raise
            self._queue.popleft()
            self._busy, self._thread, self.holder = True, threading.get_ident(), owner
        try:
            yield time.perf_counter() - started
        finally:
            with self._cond:
                self._busy, self._thread, self.holder = False, None, None
                self._cond.notify_all()


_gates: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_gates_lock = threading.Lock()


def gate_for(model) -> ModelGate:
    """The gate shared by everything that runs `model` (created on first use, dropped with the model)."""
    with _gates_lock:
        gate = _gates.get(model)
        if gate is None:
            gate = _gates[model] = ModelGate()
        return gate
