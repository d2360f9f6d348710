"""Helpers of the server tests: tiny decoders, HF greedy references, and a decoder whose tokens wait on a gate.

The gate makes queue-full, deadline, disconnect and drain tests deterministic: a generation holds the engine
exactly as long as the test wants, and the test can see how many tokens it produced and whether the server
closed it early.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from hsd_rag import HybridSpecDecoder
from tests.tiny_models import IdTokenizer, tiny_model

GATE_GIVE_UP_S = 60.0  # a gated generation waits at most this long for a permit (a failing test cannot hang)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run faster on one thread, and two threads spin badly when other work shares the CPUs
    (measured here: a 16-step generation took 50 ms on one thread, 8 s on two under a load of 11)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_id_decoder() -> HybridSpecDecoder:
    """Tiny random Llama over integer-id text ("0 11 12" <-> [0, 11, 12]): milliseconds per token."""
    return HybridSpecDecoder(tiny_model("llama"), IdTokenizer())


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """The reference: HF generate, greedy (EOS kept, as the decoder keeps it).

    The attention mask is explicit: without it generate masks every prompt token equal to pad_token_id, and the
    tiny models' pad id (1) is `<|im_start|>` in the SmolLM2 vocabulary, which every chat prompt contains.
    """
    ids = torch.tensor([prompt_ids], device=model.device)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_new_tokens, min_new_tokens=0)
    return out[0, len(prompt_ids):].tolist()


def wait_until(condition, timeout_s: float = 30.0, what: str = "condition") -> None:
    """Poll `condition` (bounded, so a broken server fails the test instead of hanging it)."""
    give_up = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > give_up:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


class GatedDecoder:
    """Wraps a decoder; each generated token waits for a permit (`allow(n)`), or none once `open()`ed."""

    def __init__(self, decoder: HybridSpecDecoder, delay_s: float = 0.0):
        self._decoder = decoder
        self.delay_s = delay_s  # extra time per token: a slow model, so a hang-up always lands mid-generation
        self._permits = threading.Semaphore(0)
        self._open = threading.Event()
        self.started = threading.Event()  # a generation has begun
        self.closed = threading.Event()  # a generation's iterator was closed (finished or stopped early)
        self.produced = 0  # tokens handed out, all generations together
        self.calls: list[dict] = []  # (prompt_ids, documents, kwargs) of each stream_tokens call

    def __getattr__(self, name):
        return getattr(self._decoder, name)

    def allow(self, tokens: int) -> None:
        for _ in range(tokens):
            self._permits.release()

    def open(self) -> None:
        self._open.set()

    def _wait_for_permit(self) -> None:
        give_up = time.monotonic() + GATE_GIVE_UP_S
        while not self._open.is_set():
            if self._permits.acquire(timeout=0.01):
                return
            if time.monotonic() > give_up:
                raise RuntimeError("gated generation: no permit came")

    def stream_tokens(self, prompt, documents=None, **kwargs):
        self.calls.append({"prompt": prompt, "documents": documents, "kwargs": kwargs})
        return _GatedStream(self, self._decoder.stream_tokens(prompt, documents, **kwargs))


class _GatedStream:
    def __init__(self, gate: GatedDecoder, inner):
        self._gate = gate
        self._inner = inner

    @property
    def result(self):
        return self._inner.result

    def __iter__(self):
        gate = self._gate
        gate.closed.clear()
        gate.started.set()
        pieces = iter(self._inner)
        try:
            for piece in pieces:
                gate._wait_for_permit()
                if gate.delay_s:
                    time.sleep(gate.delay_s)
                gate.produced += 1
                yield piece
        finally:
            pieces.close()
            gate.closed.set()
