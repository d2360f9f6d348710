"""The OpenAI-compatible server over our engine, on 127.0.0.1 with tiny random models.

Outputs are compared with HF generate (greedy); errors must be OpenAI-shaped with the right status; the queue,
deadlines, disconnects and shutdown are driven deterministically by a gated decoder (tests/serve_support.py).
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import types

import httpx
import pytest

from hsd_rag.serve import BackgroundServer, ServerSettings, create_app
from hsd_rag.serve.harness import parse_metrics
from tests.serve_support import (
    GatedDecoder,
    hf_greedy,
    one_torch_thread,  # noqa: F401  (autouse: one torch thread here)
    tiny_id_decoder,
    wait_until,
)
from tests.tiny_models import smollm2_chat_decoder

PROMPT = "0 11 12 13 14 15 16 17"
PROMPT_IDS = [0, 11, 12, 13, 14, 15, 16, 17]
SHORT = 16  # new tokens: several draft steps, milliseconds on the tiny model
GREEDY = {"temperature": 0, "budget": 8}
TIMEOUT_S = 60


@pytest.fixture(scope="module")
def tiny():
    return tiny_id_decoder()


@pytest.fixture(scope="module")
def reference(tiny):
    return hf_greedy(tiny.model, PROMPT_IDS, SHORT)


@pytest.fixture(scope="module")
def server(tiny):
    with BackgroundServer(create_app(tiny, ServerSettings(max_prompt_tokens=64, max_documents=3,
                                                          max_documents_chars=200))) as running:
        yield running


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=TIMEOUT_S) as client:
        yield client


def sse_events(response: httpx.Response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def metric(http: httpx.Client, name: str, **labels) -> float:
    samples = parse_metrics(http.get("/metrics").text)
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == w for k, w in labels.items()))


# ---- answers ------------------------------------------------------------------------------------------------


def test_completion_equals_hf_greedy_with_usage_and_stats(http, tiny, reference):
    body = {"prompt": PROMPT, "max_tokens": SHORT, "return_token_ids": True, **GREEDY}
    data = http.post("/v1/completions", json=body).json()
    choice = data["choices"][0]
    assert choice["token_ids"] == reference
    assert choice["text"] == tiny.tokenizer.decode(reference, skip_special_tokens=True)
    assert choice["finish_reason"] == ("stop" if reference[-1] == 1 else "length")
    assert data["object"] == "text_completion" and data["id"].startswith("cmpl-")
    usage = data["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (
        8, len(reference), 8 + len(reference))
    stats = data["hsd_rag"]
    assert usage["hsd_rag"] == stats  # repeated for clients that keep only usage
    assert stats["method"] == "ngram" and stats["steps"] >= 1
    assert stats["tau"] == pytest.approx(len(reference) / stats["steps"])
    assert set(stats["accepted_by_source"]) <= {"ngram"}


def test_stream_carries_the_same_tokens_then_usage_and_done(http, reference):
    body = {"prompt": PROMPT, "max_tokens": SHORT, "stream": True, "return_token_ids": True,
            "stream_options": {"include_usage": True}, **GREEDY}
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1
    ids = [t for c in chunks for choice in c["choices"] for t in choice.get("token_ids", [])]
    assert ids == reference
    finals = [choice["finish_reason"] for c in chunks for choice in c["choices"] if choice.get("finish_reason")]
    assert len(finals) == 1
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == len(reference)
    assert usage_chunk["hsd_rag"]["steps"] >= 1


def test_stop_string_and_seeded_sampling(http):
    text = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": SHORT, **GREEDY}).json()
    words = text["choices"][0]["text"].split()
    assert len(words) > 3
    stop = " " + words[3]
    cut = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": SHORT, "stop": stop, **GREEDY}).json()
    assert cut["choices"][0]["text"] == text["choices"][0]["text"].split(stop)[0]
    assert cut["choices"][0]["finish_reason"] == "stop"
    sampled = [http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": SHORT, "temperature": 1.0,
                                                   "seed": 7, "return_token_ids": True}).json()
               for _ in range(2)]
    assert sampled[0]["choices"][0]["token_ids"] == sampled[1]["choices"][0]["token_ids"]


def test_documents_reach_exactly_that_requests_index(tiny, reference):
    """The request's documents are what the decoder drafts from: the exact continuation as a document gets
    n-gram drafts accepted that the same prompt without it does not get."""
    gated = GatedDecoder(tiny)
    gated.open()
    continuation = tiny.tokenizer.decode(reference[:-1] if reference[-1] == 1 else reference)
    with BackgroundServer(create_app(gated)) as srv, httpx.Client(base_url=srv.base_url, timeout=TIMEOUT_S) as c:
        def accepted(documents):
            body = {"prompt": PROMPT, "max_tokens": SHORT, "documents": documents, "return_token_ids": True,
                    **GREEDY}
            data = c.post("/v1/completions", json=body).json()
            assert data["choices"][0]["token_ids"] == reference  # documents never change the answer
            return data["hsd_rag"]["accepted_by_source"].get("ngram", 0)

        with_doc = accepted([continuation, "90 91 92"])
        without = accepted(["90 91 92"])
    assert [call["documents"] for call in gated.calls] == [[continuation, "90 91 92"], ["90 91 92"]]
    assert with_doc > without


def test_chat_with_the_real_chat_template_equals_hf_greedy():
    decoder = smollm2_chat_decoder()
    messages = [{"role": "developer", "content": "Answer briefly."},
                {"role": "user", "content": [{"type": "text", "text": "Who designed the Eiffel Tower?"}]}]
    as_template = [{"role": "system", "content": "Answer briefly."},
                   {"role": "user", "content": "Who designed the Eiffel Tower?"}]
    prompt_ids = decoder.encode_prompt(as_template)
    expected = hf_greedy(decoder.model, prompt_ids, SHORT)
    with BackgroundServer(create_app(decoder)) as srv, httpx.Client(base_url=srv.base_url, timeout=TIMEOUT_S) as c:
        data = c.post("/v1/chat/completions", json={"messages": messages, "max_tokens": SHORT,
                                                    "return_token_ids": True, **GREEDY}).json()
        with c.stream("POST", "/v1/chat/completions",
                      json={"messages": messages, "max_tokens": SHORT, "stream": True, **GREEDY}) as r:
            events = sse_events(r)
    choice = data["choices"][0]
    assert data["object"] == "chat.completion" and choice["message"]["role"] == "assistant"
    assert choice["token_ids"] == expected
    assert choice["message"]["content"] == decoder.tokenizer.decode(expected, skip_special_tokens=True)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    streamed = "".join(ch["delta"].get("content", "") for e in events[:-1] for ch in e["choices"])
    assert streamed == choice["message"]["content"]


def test_models_health_and_metrics(http):
    models = http.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "LlamaForCausalLM"
    assert http.get("/health").json()["status"] == "ok"
    text = http.get("/metrics").text
    for name in ("hsd_rag_queue_depth", "hsd_rag_tokens_per_second", "hsd_rag_tau_bucket",
                 "hsd_rag_request_latency_seconds_bucket", "hsd_rag_time_to_first_token_seconds_bucket",
                 "hsd_rag_acceptance_rate", "process_resident_memory_bytes"):
        assert name in text, name
    done = metric(http, "hsd_rag_requests_total", status="200")
    http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, **GREEDY})
    assert metric(http, "hsd_rag_requests_total", status="200") == done + 1
    assert metric(http, "hsd_rag_generated_tokens_total") > 0


# ---- refusals ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        ({"prompt": PROMPT, "n": 2}, 400, "n=2"),
        ({"prompt": PROMPT, "frobnicate": 1}, 400, "frobnicate"),
        ({"prompt": PROMPT, "temperature": -1}, 400, "temperature"),
        ({"prompt": PROMPT, "method": "eagle"}, 400, "EAGLE head"),
        ({"prompt": PROMPT, "logprobs": 3}, 400, "logprobs"),
        ({"prompt": PROMPT, "model": "gpt-4o"}, 404, "gpt-4o"),
        ({"prompt": " ".join(["5"] * 65)}, 400, "at most 64"),
        ({"prompt": PROMPT, "max_tokens": 600}, 400, "max_tokens=600"),
        ({"prompt": PROMPT, "documents": ["1", "2", "3", "4"]}, 413, "at most 3"),
        ({"prompt": PROMPT, "documents": ["5 " * 101]}, 413, "characters"),
        ({"prompt": ""}, 400, "empty"),
    ],
)
def test_bad_requests_get_openai_shaped_errors(http, body, status, fragment):
    response = http.post("/v1/completions", json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert fragment in error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] in ("invalid_request_error", "not_found_error")


def test_chat_refusals(http):
    tools = http.post("/v1/chat/completions", json={"messages": [{"role": "tool", "content": "x"}]})
    assert tools.status_code == 400 and "tool" in tools.json()["error"]["message"]
    no_template = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert no_template.status_code == 400 and "chat template" in no_template.json()["error"]["message"]
    unknown_route = http.get("/v1/embeddings")
    assert unknown_route.status_code in (404, 405) and "error" in unknown_route.json()


def test_body_over_the_limit_is_refused_before_reading(tiny):
    with BackgroundServer(create_app(tiny, ServerSettings(max_body_bytes=1000))) as srv:
        response = httpx.post(srv.base_url + "/v1/completions", json={"prompt": "5 " * 1000}, timeout=TIMEOUT_S)
    assert response.status_code == 413 and response.json()["error"]["code"] == "payload_too_large"


def test_api_key(tiny):
    with BackgroundServer(create_app(tiny, ServerSettings(api_key="sekret"))) as srv:
        with httpx.Client(base_url=srv.base_url, timeout=TIMEOUT_S) as c:
            body = {"prompt": PROMPT, "max_tokens": 2, **GREEDY}
            missing = c.post("/v1/completions", json=body)
            wrong = c.post("/v1/completions", json=body, headers={"Authorization": "Bearer nope"})
            right = c.post("/v1/completions", json=body, headers={"Authorization": "Bearer sekret"})
            models = c.get("/v1/models")
            assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200
    assert missing.status_code == wrong.status_code == models.status_code == 401
    assert wrong.json()["error"]["type"] == "authentication_error"
    assert right.status_code == 200


# ---- queue, deadlines, disconnects, shutdown -----------------------------------------------------------------


@pytest.fixture()
def gated(tiny):
    gate = GatedDecoder(tiny)
    yield gate
    gate.open()  # never leave a worker waiting


def _post_in_thread(url: str, body: dict, results: list) -> threading.Thread:
    def run():
        try:
            results.append(httpx.post(url, json=body, timeout=TIMEOUT_S))
        except httpx.HTTPError as error:
            results.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_queue_full_gets_429_with_retry_after_and_fifo_order(gated):
    settings = ServerSettings(max_queue=1)
    with BackgroundServer(create_app(gated, settings)) as srv:
        url = srv.base_url + "/v1/completions"
        first, second = [], []
        t1 = _post_in_thread(url, {"prompt": PROMPT, "max_tokens": 4, **GREEDY}, first)
        wait_until(gated.started.is_set, what="the first generation to start")
        t2 = _post_in_thread(url, {"prompt": "0 21 22 23", "max_tokens": 4, **GREEDY}, second)
        wait_until(lambda: srv.app.state.engine.queued == 1, what="the second request to queue")
        refused = httpx.post(url, json={"prompt": PROMPT, "max_tokens": 4}, timeout=TIMEOUT_S)
        gated.open()
        t1.join(TIMEOUT_S), t2.join(TIMEOUT_S)
    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert first[0].status_code == second[0].status_code == 200
    assert [c["prompt"] for c in gated.calls] == [PROMPT_IDS, [0, 21, 22, 23]]  # served in arrival order


def test_deadline_in_the_queue_is_504_and_the_job_never_runs(gated):
    with BackgroundServer(create_app(gated)) as srv:
        url = srv.base_url + "/v1/completions"
        first = []
        t1 = _post_in_thread(url, {"prompt": PROMPT, "max_tokens": 4, **GREEDY}, first)
        wait_until(gated.started.is_set, what="the first generation to start")
        late = httpx.post(url, json={"prompt": "0 21 22", "max_tokens": 4, "timeout": 0.2, **GREEDY},
                          timeout=TIMEOUT_S)
        assert srv.app.state.engine.queued == 0  # the expired job left the queue at once
        gated.open()
        t1.join(TIMEOUT_S)
    assert late.status_code == 504 and late.json()["error"]["code"] == "deadline_exceeded"
    assert len(gated.calls) == 1


def test_deadline_mid_stream_ends_with_an_error_event(gated):
    with BackgroundServer(create_app(gated)) as srv, httpx.Client(base_url=srv.base_url, timeout=TIMEOUT_S) as c:
        gated.allow(1)
        body = {"prompt": PROMPT, "max_tokens": SHORT, "stream": True, "timeout": 0.5, **GREEDY}
        with c.stream("POST", "/v1/completions", json=body) as response:
            events = sse_events(response)
        gated.open()  # the worker may go on: it must stop at the next token
        wait_until(gated.closed.is_set, what="the generation to be closed")
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "deadline_exceeded"
    assert gated.produced <= 2


def test_stream_disconnect_cancels_the_generation(gated):
    with BackgroundServer(create_app(gated)) as srv, httpx.Client(base_url=srv.base_url, timeout=TIMEOUT_S) as c:
        gated.allow(2)
        body = {"prompt": PROMPT, "max_tokens": SHORT, "stream": True, **GREEDY}
        with c.stream("POST", "/v1/completions", json=body) as response:
            for line in response.iter_lines():
                if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                    break  # hang up after the first text
        wait_until(lambda: metric(c, "hsd_rag_cancelled_total", reason="disconnect") == 1,
                   what="the server to notice the disconnect")
        gated.open()  # the worker may go on: it must stop at the next token
        wait_until(gated.closed.is_set, what="the generation to be closed")
        assert metric(c, "hsd_rag_requests_total", status="cancelled") == 1
        assert c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, **GREEDY}).status_code == 200
    assert gated.produced <= 3 + 2  # the cancelled one stopped within a token of the hang-up; then 2 more


def test_whole_request_disconnect_cancels_the_generation(gated):
    with BackgroundServer(create_app(gated)) as srv:
        body = json.dumps({"prompt": PROMPT, "max_tokens": SHORT, **GREEDY}).encode()
        raw = socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT_S)
        raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        wait_until(gated.started.is_set, what="the generation to start")
        raw.close()
        with httpx.Client(base_url=srv.base_url, timeout=TIMEOUT_S) as c:
            wait_until(lambda: metric(c, "hsd_rag_cancelled_total", reason="disconnect") == 1,
                       what="the server to notice the disconnect")
            gated.open()
            wait_until(gated.closed.is_set, what="the generation to be closed")
    assert gated.produced <= 1


def test_graceful_shutdown_drains_running_and_queued_requests(gated, tiny, reference):
    srv = BackgroundServer(create_app(gated, ServerSettings(drain_timeout_s=30)), drain_timeout_s=30).start()
    url = srv.base_url + "/v1/completions"
    results = []
    body = {"prompt": PROMPT, "max_tokens": SHORT, "return_token_ids": True, **GREEDY}
    threads = [_post_in_thread(url, body, results)]
    wait_until(gated.started.is_set, what="the first generation to start")
    threads.append(_post_in_thread(url, body, results))
    wait_until(lambda: srv.app.state.engine.queued == 1, what="the second request to queue")
    stopper = threading.Thread(target=srv.stop)
    stopper.start()  # uvicorn stops accepting, then waits for both requests
    wait_until(lambda: not _accepts(srv.port), what="the listening socket to close")
    gated.open()
    for thread in threads + [stopper]:
        thread.join(TIMEOUT_S)
    assert [r.status_code for r in results] == [200, 200]
    assert all(r.json()["choices"][0]["token_ids"] == reference for r in results)


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


# ---- the command line ----------------------------------------------------------------------------------------


def test_serve_engine_vllm_without_vllm_names_the_setup_script(monkeypatch, capsys):
    from hsd_rag.cli import main

    monkeypatch.setitem(sys.modules, "hsd_rag.engines.vllm.launch", None)  # as if not installed
    assert main(["serve", "--engine", "vllm"]) == 2
    assert "scripts/setup_vllm.sh" in capsys.readouterr().err


def test_serve_engine_vllm_hands_the_flags_to_the_launcher(monkeypatch):
    from hsd_rag.cli import main

    calls = []
    launcher = types.ModuleType("hsd_rag.engines.vllm.launch")
    launcher.serve = lambda **kwargs: calls.append(kwargs) or 0
    monkeypatch.setitem(sys.modules, "hsd_rag.engines.vllm.launch", launcher)
    argv = ["serve", "--engine", "vllm", "--model", "/m", "--port", "9001", "--method", "hsd", "--budget", "6",
            "--api-key", "k"]
    assert main(argv) == 0
    assert calls == [{"model": "/m", "host": "127.0.0.1", "port": 9001, "speculative": "hsd",
                      "num_speculative_tokens": 6, "api_key": "k"}]
    calls.clear()
    assert main(["serve", "--engine", "vllm"]) == 0  # unset flags leave the launcher's defaults (hsd, 8 tokens)
    assert calls == [{"model": None, "host": "127.0.0.1", "port": 8000, "api_key": None}]


def test_serve_rejects_a_bad_budget(capsys):
    from hsd_rag.cli import main

    assert main(["serve", "--budget", "lots"]) == 2
    assert "--budget" in capsys.readouterr().err
