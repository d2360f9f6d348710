"""Load and fault tests of `hsd-rag serve` (CI size), through the reusable client harness hsd_rag.serve.harness.

32 concurrent clients x 4 requests on a tiny random model: nothing lost or duplicated, every output equal to
HF generate's, no document leaking between requests, no request object surviving the run, RSS flat; a burst
over the queue gets 429 + Retry-After and succeeds on retry; hang-ups cancel; a server killed mid-stream gives
every client a clear error, and a restarted one answers again. scripts/load_test.py runs the same checks at
full size on the default model.
"""

from __future__ import annotations

import asyncio
import gc
import random
import socket
import sys
import weakref
from pathlib import Path

import pytest

from hsd_rag.serve import BackgroundServer, ServerSettings, create_app
from hsd_rag.serve.engine import GenerationEngine
from hsd_rag.serve.harness import (
    LoadCase,
    ServerProcess,
    Target,
    probe_disconnect,
    probe_kill_restart,
    probe_queue_full,
    run_load,
    scrape_metric,
    wait_healthy,
)
from tests.serve_support import (
    GatedDecoder,
    hf_greedy,
    one_torch_thread,  # noqa: F401  (autouse: one torch thread here)
    tiny_id_decoder,
)
from tests.tiny_models import TINY_VOCAB, smollm2_chat_decoder

CLIENTS = 32
REQUESTS_PER_CLIENT = 4
GROUPS = 8  # prompts; each is sent with its own answer as a document ("rich") and with unrelated ones ("poor")
NEW_TOKENS = 24
DECODING = {"method": "ngram", "budget": 8}
RSS_SLACK_BYTES = 64 * 2**20  # allocator noise; a per-request leak at this size would show in the weakrefs first
SUCCESSES = ("hsd_rag_requests_total", {"status": "200"})
REPO = Path(__file__).resolve().parents[1]

# The leak checks compare each request's drafts with its solo run, so no cross-request draft source is on.
ISOLATED = ServerSettings(answer_history=False)


@pytest.fixture(scope="module")
def tiny():
    return tiny_id_decoder()


def text(tokens: list[int]) -> str:
    return " ".join(map(str, tokens))


@pytest.fixture(scope="module")
def cases(tiny) -> list[LoadCase]:
    """Rich/poor pairs per prompt, with HF generate's answer and the solo run's draft counts as expectations.

    A poor request that drafted from its rich twin's documents (a leak) would have n-gram drafts accepted that
    its solo run never had; rich requests do accept many, so the check has teeth (asserted below).
    """
    rng = random.Random(0)
    out = []
    for g in range(GROUPS):
        prompt = [0] + [rng.randrange(2, TINY_VOCAB) for _ in range(11)]
        expected = hf_greedy(tiny.model, prompt, NEW_TOKENS)
        answer = [t for t in expected if t != tiny.tokenizer.eos_token_id]
        unrelated = text(rng.randrange(2, TINY_VOCAB) for _ in range(30))
        for kind, documents in (("rich", [text(answer), unrelated]), ("poor", [unrelated])):
            solo = tiny.generate(prompt, documents, max_new_tokens=NEW_TOKENS, temperature=0, answer_history=False,
                                 **DECODING)
            assert solo.token_ids == expected
            stats = {"drafted_by_source": dict(solo.stats.drafted_by_source),
                     "accepted_by_source": dict(solo.stats.accepted_by_source)}
            out.append(LoadCase(f"g{g}-{kind}", text(prompt), documents, NEW_TOKENS, expected_token_ids=expected,
                                expected_draft_stats=stats))
    return out


def target_of(server, **kwargs) -> Target:
    return Target(server.base_url, extra_body=dict(DECODING), timeout_s=120, **kwargs)


def test_the_leak_check_has_teeth(cases):
    """Rich requests accept n-gram drafts their poor twins never get: a leak would show in the poor ones."""
    for rich, poor in zip(cases[::2], cases[1::2], strict=True):
        assert rich.expected_draft_stats["accepted_by_source"].get("ngram", 0) > \
            poor.expected_draft_stats["accepted_by_source"].get("ngram", 0), rich.key


async def test_32_concurrent_clients_nothing_lost_equal_to_hf_no_leak_memory_flat(tiny, cases, monkeypatch):
    jobs: list[weakref.ref] = []
    submit = GenerationEngine.submit

    def tracked(self, request):
        job = submit(self, request)
        jobs.append(weakref.ref(job))
        return job

    monkeypatch.setattr(GenerationEngine, "submit", tracked)
    with BackgroundServer(create_app(tiny, ISOLATED)) as server:
        target = target_of(server)
        warm = await run_load(target, cases, clients=4, requests_per_client=len(cases) // 4)
        assert warm.problems() == []
        rss_before = await scrape_metric(target, "process_resident_memory_bytes")
        report = await run_load(target, cases, clients=CLIENTS, requests_per_client=REQUESTS_PER_CLIENT,
                                success_metric=SUCCESSES)
        rss_after = await scrape_metric(target, "process_resident_memory_bytes")
        assert await scrape_metric(target, "hsd_rag_queue_depth") == 0
    assert report.problems() == []
    assert len(report.completed) == CLIENTS * REQUESTS_PER_CLIENT
    assert report.server_successes == CLIENTS * REQUESTS_PER_CLIENT
    assert {o.stream for o in report.outcomes} == {True, False}
    assert {o.case.key for o in report.outcomes} == {c.key for c in cases}
    gc.collect()
    assert len(jobs) == len(warm.outcomes) + len(report.outcomes)
    assert [ref for ref in jobs if ref() is not None] == []  # nothing of a finished request is kept
    assert rss_before and rss_after - rss_before < RSS_SLACK_BYTES


async def test_the_leak_check_catches_a_server_that_shares_documents(tiny, cases):
    """Mutation test: a server whose index keeps every request's documents fails the harness's leak check."""

    class SharedIndexDecoder(GatedDecoder):
        def __init__(self, decoder):
            super().__init__(decoder)
            self.open()
            self.seen: list[str] = []

        def stream_tokens(self, prompt, documents=None, **kwargs):
            self.seen += documents or []
            return super().stream_tokens(prompt, list(self.seen), **kwargs)

    with BackgroundServer(create_app(SharedIndexDecoder(tiny), ISOLATED)) as server:
        report = await run_load(target_of(server), cases, clients=1, requests_per_client=len(cases))
    leaks = [p for p in report.problems() if "document leak" in p]
    assert any("(g0-poor)" in p for p in leaks)  # the first poor request drafted from its rich twin's answer
    assert not any("(g0-rich)" in p for p in leaks)  # the first request had nothing to leak from
    assert not [p for p in report.problems() if "solo reference" in p]  # outputs stay right: only drafts show it


async def test_a_burst_over_the_queue_gets_429_then_succeeds_on_retry(tiny, cases):
    gate = GatedDecoder(tiny)
    burst, max_queue = 12, 2
    try:
        with BackgroundServer(create_app(gate, ServerSettings(max_queue=max_queue, answer_history=False))) as server:
            target = target_of(server)
            probe = asyncio.create_task(probe_queue_full(target, cases[0], burst))
            while await scrape_metric(target, "hsd_rag_rejected_total", {"reason": "queue_full"}) < \
                    burst - max_queue - 1:
                await asyncio.sleep(0.02)
            gate.open()
            result = await asyncio.wait_for(probe, timeout=120)
    finally:
        gate.open()
    assert result.refused == burst - max_queue - 1
    assert result.problems() == []
    assert all(o.ok for o in result.outcomes)


async def test_hang_ups_under_load_cancel_their_generation(tiny, cases):
    slow = GatedDecoder(tiny, delay_s=0.005)  # 480 tokens take seconds: a hang-up always lands mid-generation
    slow.open()
    long_case = LoadCase("long", cases[0].prompt, cases[0].documents, max_tokens=480)
    with BackgroundServer(create_app(slow, ISOLATED)) as server:
        target = target_of(server)
        load = asyncio.create_task(run_load(target, cases, clients=4, requests_per_client=2))
        after_stream = await probe_disconnect(target, long_case, stream=True, follow_up=cases[1])
        after_whole = await probe_disconnect(target, long_case, stream=False, hang_up_after_s=0.5,
                                             follow_up=cases[1])
        report = await load
        cancelled = await scrape_metric(target, "hsd_rag_cancelled_total", {"reason": "disconnect"})
    assert cancelled == 2
    assert after_stream.ok and after_whole.ok
    assert after_stream.mismatch() is None and after_whole.mismatch() is None
    assert report.problems() == []


# ---- killing the server --------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def saved_chat_model(tmp_path_factory):
    """The tiny random Llama with the real SmolLM2 tokenizer, saved so `hsd-rag serve --model DIR` loads it."""
    decoder = smollm2_chat_decoder()
    folder = tmp_path_factory.mktemp("tiny-smollm2")
    decoder.model.save_pretrained(folder)
    decoder.tokenizer.save_pretrained(folder)
    return decoder, folder


def tiny_server(model_dir: Path, port: int, log: Path) -> ServerProcess:
    """`python -m hsd_rag.cli serve` of a saved tiny model on a fixed port, killable and restartable."""
    command = [sys.executable, "-m", "hsd_rag.cli", "serve", "--model", str(model_dir), "--head", "none",
               "--port", str(port), "--threads", "1", "--temperature", "0", "--method", "ngram",
               "--budget", "8", "--served-model-name", "tiny"]
    return ServerProcess(command, log, REPO, wait_s=30)


async def test_killed_mid_stream_clients_get_a_clear_error_and_a_restart_serves_again(saved_chat_model, tmp_path):
    openai = pytest.importorskip("openai")
    decoder, folder = saved_chat_model
    messages = [{"role": "user", "content": "Who designed the Eiffel Tower?"}]
    new_tokens = 300
    expected = hf_greedy(decoder.model, decoder.encode_prompt(messages), new_tokens)
    case = LoadCase("kill", messages, max_tokens=new_tokens, expected_token_ids=expected)
    port = _free_port()
    server = tiny_server(folder, port, tmp_path / "server.log")
    target = Target(f"http://127.0.0.1:{port}", model="tiny", timeout_s=60)
    server.start()
    try:
        await wait_healthy(target, 120)
        sdk = openai.AsyncOpenAI(base_url=target.base_url + "/v1", api_key="-", max_retries=0, timeout=60)

        async def sdk_stream():
            stream = await sdk.chat.completions.create(model="tiny", messages=messages, max_tokens=new_tokens,
                                                       temperature=0, stream=True)
            async for _ in stream:
                pass

        sdk_task = asyncio.create_task(sdk_stream())
        probe = await probe_kill_restart(target, case, kill=server.kill, restart=server.start, clients=4)
        sdk_error = (await asyncio.gather(sdk_task, return_exceptions=True))[0]
    finally:
        server.stop()
    assert probe.problems() == [], (tmp_path / "server.log").read_text()[-3000:]
    assert all("closed the connection" in o.error or "without [DONE]" in o.error for o in probe.during)
    assert isinstance(sdk_error, Exception)  # the SDK raises (a connection error), it does not hang
    assert all(o.ok for o in probe.after)
