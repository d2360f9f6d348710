"""Any number of callers: streams hold nothing between pieces, every decoder on a model shares one FIFO gate.

Threads that could hang on a regression run with a join timeout: a hang fails the test instead of the suite.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from hsd_rag import HybridSpecDecoder
from hsd_rag.heads import Eagle3Head
from tests.tiny_models import IdTokenizer, smollm2_chat_decoder, tiny_model

PROMPT = [0, 21, 22, 23, 24, 25]
HANG_GUARD_S = 300  # a generous bound on two-core CI: only a deadlock gets near it


def in_thread(fn, *args):
    """Run fn in a daemon thread; returns (finished, result or exception)."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn(*args)
        except BaseException as error:  # reported to the test
            box["value"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(HANG_GUARD_S)
    return not thread.is_alive(), box.get("value")


class CloseRecorder:
    """Wraps a decoder's drafter factories to record when each generation's drafter is closed."""

    def __init__(self, decoder):
        self.closed = threading.Event()
        self.closes = 0
        factories = dict(type(decoder).drafter_factories)

        def wrap(factory):
            def make(dec, cfg):
                drafter = factory(dec, cfg)
                close = drafter.close

                def recording_close():
                    close()
                    self.closes += 1
                    self.closed.set()

                drafter.close = recording_close
                return drafter

            return make

        decoder.drafter_factories = {name: wrap(f) for name, f in factories.items()}


class ForwardCounter:
    """Counts target forwards (and which thread ran them) with a pre-hook on the model."""

    def __init__(self, model):
        self.threads: list[str] = []
        self.started = threading.Event()
        self.handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.threads.append(threading.current_thread().name)
        self.started.set()

    @property
    def count(self) -> int:
        return len(self.threads)

    def remove(self):
        self.handle.remove()


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=5, layers=4)


@pytest.fixture
def dec(model):
    d = HybridSpecDecoder(model, IdTokenizer())
    d.eos_token_ids = set()
    return d


# ---- abandoned streams -----------------------------------------------------------------------------------


def test_abandoned_stream_does_not_block_another_thread(dec):
    expected = dec.generate(PROMPT, max_new_tokens=8).token_ids
    stream = dec.stream(PROMPT, max_new_tokens=60)
    for _ in stream:
        break  # the stream object stays alive: it must not hold the model
    finished, result = in_thread(lambda: dec.generate(PROMPT, max_new_tokens=8))
    assert finished, "a second thread waited for the model held by an abandoned stream"
    assert result.token_ids == expected
    assert not dec.gate.locked()
    del stream


def test_paused_stream_and_a_second_request_in_the_same_thread(dec):
    def scenario():
        expected = dec.generate(PROMPT, max_new_tokens=6).token_ids
        pieces = iter(dec.stream_tokens(PROMPT, max_new_tokens=30))
        first = next(pieces)
        again = dec.generate(PROMPT, max_new_tokens=6).token_ids  # while the first stream is paused
        rest = [p.token_id for p in pieces]
        return expected, again, [first.token_id, *rest]

    finished, result = in_thread(scenario)
    assert finished, "the same thread deadlocked on its own paused stream"
    expected, again, streamed = result
    assert again == expected and streamed[:6] == expected and len(streamed) == 30


def test_abandoned_stream_releases_everything_at_once(dec):
    recorder = CloseRecorder(dec)
    for _ in dec.stream(PROMPT, max_new_tokens=60, method="ngram"):
        break
    assert recorder.closes == 1  # the drafter (hooks, indexes) and the cache went with the loop, no GC needed
    with dec.stream_tokens(PROMPT, max_new_tokens=60, method="ngram") as stream:
        next(iter(stream))
    assert recorder.closes == 2
    stream = dec.stream(PROMPT, max_new_tokens=60, method="ngram")
    next(iter(stream))
    stream.close()
    assert recorder.closes == 3 and stream.result is None


def test_inference_mode_never_leaks_into_the_consumer(dec):
    for _ in dec.stream(PROMPT, max_new_tokens=10):
        assert not torch.is_inference_mode_enabled()
        weight = torch.ones(2, requires_grad=True)
        assert (weight * 2).requires_grad  # the consumer's own autograd works between pieces
    assert not torch.is_inference_mode_enabled()


def test_a_generation_inside_a_step_fails_loudly_instead_of_deadlocking(dec):
    from hsd_rag.model_gate import ReentrantGateError

    class Reentrant:
        name = "reentrant"

        def start(self, prompt_ids, documents):
            dec.generate(PROMPT, max_new_tokens=2)  # runs while this request holds the model

        def propose(self, context):
            raise AssertionError("not reached")

        def observe(self, outcome):
            pass

        def close(self):
            pass

    dec.drafter_factories = {"ngram": lambda d, cfg: Reentrant()}
    finished, result = in_thread(lambda: dec.generate(PROMPT, max_new_tokens=4, method="ngram"))
    assert finished and isinstance(result, ReentrantGateError)
    assert not dec.gate.locked()


# ---- sharing one model -------------------------------------------------------------------------------------


def test_two_decoders_on_one_model_from_four_threads():
    """EAGLE hooks on one shared model, two decoders (e.g. a LangChain and a LlamaIndex adapter) and four
    threads whose steps interleave: every output equals its solo run."""
    from hsd_rag.model_gate import gate_for

    target = tiny_model("llama", seed=9, layers=4)
    torch.manual_seed(0)
    head = Eagle3Head.from_target(target)
    first = HybridSpecDecoder(target, IdTokenizer(), head=head)
    second = HybridSpecDecoder(target, IdTokenizer(), head=Eagle3Head.from_target(target))
    assert first.gate is second.gate is gate_for(target)
    requests = []
    for i in range(8):
        prompt = [0, 30 + i, 31 + i, 32, 33 + i]
        document = " ".join(str(40 + (i * 7 + k) % 50) for k in range(30))
        method = ["eagle", "hybrid", "ngram", "hybrid-fixed"][i % 4]
        requests.append(((first, second)[i % 2], prompt, [document], method, i % 3 == 0))
    solo = [dec.generate(p, documents=d, method=m, budget=8, max_new_tokens=16).token_ids for dec, p, d, m, _ in requests]

    def run(dec, prompt, documents, method, streamed):
        if streamed:  # a slow consumer: other requests' steps run between its pieces
            stream = dec.stream_tokens(prompt, documents=documents, method=method, budget=8, max_new_tokens=16)
            ids = []
            for piece in stream:
                ids.append(piece.token_id)
                time.sleep(0.001)
            return stream.result.token_ids
        return dec.generate(prompt, documents=documents, method=method, budget=8, max_new_tokens=16).token_ids

    results: list = [None] * len(requests)
    barrier = threading.Barrier(4)

    def worker(slot):
        barrier.wait()
        for index in range(slot, len(requests), 4):
            try:
                results[index] = run(*requests[index])
            except BaseException as error:  # reported below
                results[index] = error

    threads = [threading.Thread(target=worker, args=(slot,), daemon=True) for slot in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(HANG_GUARD_S)
    assert not any(t.is_alive() for t in threads)
    assert results == solo


def test_requests_are_served_in_arrival_order(model):
    """Three requests queue while the model is busy: they start in arrival order, then take strict turns."""
    decoders = [HybridSpecDecoder(model, IdTokenizer()) for _ in range(3)]
    gate = decoders[0].gate
    counter = ForwardCounter(model)
    threads = []
    try:
        with gate.hold():
            for i, dec in enumerate(decoders):
                dec.eos_token_ids = set()
                thread = threading.Thread(
                    target=dec.generate, args=(PROMPT,), kwargs=dict(max_new_tokens=5, method="vanilla"),
                    name=f"request-{i}", daemon=True,
                )
                waiting = gate.waiting
                thread.start()
                threads.append(thread)
                while gate.waiting == waiting:  # this request has queued: the next one arrives after it
                    time.sleep(0.001)
        for thread in threads:
            thread.join(HANG_GUARD_S)
    finally:
        counter.remove()
    # prefill then 5 steps each, one forward per turn, round-robin in arrival order
    assert counter.threads == [f"request-{i}" for _ in range(6) for i in range(3)]


def test_queue_time_is_reported_apart_from_compute_time(dec):
    box: dict = {}

    def call():
        started = time.perf_counter()
        box["result"] = dec.generate(PROMPT, max_new_tokens=6)
        box["wall"] = time.perf_counter() - started

    with dec.gate.hold():
        thread = threading.Thread(target=call, daemon=True)
        thread.start()
        while dec.gate.waiting == 0:
            time.sleep(0.001)
        seen_waiting = time.perf_counter()
        time.sleep(0.2)
        released = time.perf_counter()
    thread.join(HANG_GUARD_S)
    stats = box["result"].stats
    assert stats.queue_s >= released - seen_waiting  # at least the time we watched it wait
    assert stats.total_s + stats.queue_s <= box["wall"]
    assert stats.total_s >= stats.prefill_s + stats.draft_s + stats.verify_s


def test_consumer_time_is_not_compute_time(dec):
    stream = dec.stream_tokens(PROMPT, max_new_tokens=4)
    paused = 0.0
    started = time.perf_counter()
    for _ in stream:
        before = time.perf_counter()
        time.sleep(0.05)
        paused += time.perf_counter() - before
    wall = time.perf_counter() - started
    assert stream.result.stats.total_s <= wall - paused


# ---- async adapters: cancellation stops the generation and frees the model -------------------------------

MANY = 200  # far more tokens than any cancelled request gets to run


@pytest.fixture(scope="module")
def chat_decoder():
    dec = smollm2_chat_decoder()
    dec.eos_token_ids = set()
    return dec


@pytest.fixture
def watched(chat_decoder):
    recorder = CloseRecorder(chat_decoder)
    counter = ForwardCounter(chat_decoder.model)
    yield chat_decoder, recorder, counter
    counter.remove()
    chat_decoder.drafter_factories = type(chat_decoder).drafter_factories


async def _cancel_after_start(awaitable_factory, counter, recorder):
    task = asyncio.ensure_future(awaitable_factory())
    assert await asyncio.to_thread(counter.started.wait, HANG_GUARD_S)  # the generation is running
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await asyncio.to_thread(recorder.closed.wait, HANG_GUARD_S), "the generation never stopped"
    return counter.count


async def _check_model_is_free(chat_decoder, count_at_stop, counter):
    assert count_at_stop < MANY // 2  # stopped within a few steps of the cancellation, not run to the end
    assert not chat_decoder.gate.locked()
    result = await asyncio.to_thread(chat_decoder.generate, [{"role": "user", "content": "hi"}], max_new_tokens=2)
    assert len(result.token_ids) == 2


async def test_langchain_astream_cancelled(watched):
    from hsd_rag.langchain import HybridSpecLLM

    dec, recorder, counter = watched
    llm = HybridSpecLLM(decoder=dec, max_new_tokens=MANY, method="ngram")

    async def consume():
        async for _ in llm.astream("What is the capital of France?"):
            await asyncio.sleep(0)

    count = await _cancel_after_start(consume, counter, recorder)
    await _check_model_is_free(dec, count, counter)


async def test_langchain_ainvoke_cancelled(watched):
    from hsd_rag.langchain import HybridSpecLLM

    dec, recorder, counter = watched
    llm = HybridSpecLLM(decoder=dec, max_new_tokens=MANY, method="ngram")
    count = await _cancel_after_start(lambda: llm.ainvoke("What is the capital of France?"), counter, recorder)
    await _check_model_is_free(dec, count, counter)


async def test_llama_index_astream_chat_cancelled(watched):
    from llama_index.core.llms import ChatMessage, MessageRole

    from hsd_rag.llama_index import HybridSpecLLM

    dec, recorder, counter = watched
    llm = HybridSpecLLM(decoder=dec, max_new_tokens=MANY, method="ngram")
    messages = [ChatMessage(role=MessageRole.USER, content="What is the capital of France?")]

    async def consume():
        async for _ in await llm.astream_chat(messages):
            await asyncio.sleep(0)

    count = await _cancel_after_start(consume, counter, recorder)
    await _check_model_is_free(dec, count, counter)


async def test_llama_index_achat_cancelled(watched):
    from llama_index.core.llms import ChatMessage, MessageRole

    from hsd_rag.llama_index import HybridSpecLLM

    dec, recorder, counter = watched
    llm = HybridSpecLLM(decoder=dec, max_new_tokens=MANY, method="ngram")
    messages = [ChatMessage(role=MessageRole.USER, content="What is the capital of France?")]
    count = await _cancel_after_start(lambda: llm.achat(messages), counter, recorder)
    await _check_model_is_free(dec, count, counter)
