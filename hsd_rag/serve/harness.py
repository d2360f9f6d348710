"""Load and fault checks from the client side, against any OpenAI-compatible base URL (ours, vLLM, ...).

Only httpx is needed, so the same checks run from another venv against another engine. What they establish:

- `run_load`: C concurrent clients x N requests each (streamed and whole, interleaved). `LoadReport.problems()`
  lists every request lost (no complete answer), duplicated (a response id seen twice, or the server counting
  more successes than clients got), answered with another request's output, or different from its expected
  greedy output; and, where the server reports draft statistics (our `hsd_rag` field) and the case carries its
  solo run's, any difference from them: documents are the only per-request input of drafting, so a request
  that drafted from another request's documents shows different draft counts than it had alone.
- `probe_queue_full`: a burst larger than the server's queue gets 429 + Retry-After in OpenAI's error shape,
  and every refused request succeeds when retried after Retry-After.
- `probe_disconnect`: a client hanging up mid-answer (streamed or whole); the server keeps serving.
- `probe_kill_restart`: the server dies mid-stream: every client ends with a clear error within its timeout
  (nothing hangs), and after a restart requests succeed again.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

DEFAULT_TIMEOUT_S = 300.0  # per request, client side: a bound so that nothing can hang
MAX_RETRY_AFTER_S = 30.0  # longest Retry-After a client honours before retrying
DEFAULT_429_RETRIES = 1000  # retries per request when the queue is full (bounded by the request timeout anyway)
HEALTH_POLL_S = 0.2


@dataclass
class Target:
    """Where and how to send requests. `documents_field=None` sends no documents (servers without the field)."""

    base_url: str  # e.g. http://127.0.0.1:8000 (without /v1)
    model: str | None = None
    api_key: str | None = None
    documents_field: str | None = "documents"
    return_token_ids: bool = True  # ask for the generated ids (ours and vLLM's extension), for exact comparisons
    extra_body: dict[str, Any] = field(default_factory=dict)  # e.g. {"method": "ngram", "budget": 16}
    timeout_s: float = DEFAULT_TIMEOUT_S

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, connections: int) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        return httpx.AsyncClient(base_url=self.base_url.rstrip("/"), headers=self.headers, limits=limits,
                                 timeout=httpx.Timeout(self.timeout_s, connect=10.0))


@dataclass
class LoadCase:
    """One request: chat messages (-> /v1/chat/completions) or a text prompt (-> /v1/completions)."""

    key: str
    prompt: str | list[dict]
    documents: list[str] | None = None
    max_tokens: int = 32
    expected_text: str | None = None  # the solo greedy reference (HF generate), decoded
    expected_token_ids: list[int] | None = None  # the same as ids, when the server returns ids
    expected_draft_stats: dict[str, dict[str, int]] | None = None  # {"drafted_by_source", "accepted_by_source"}

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if isinstance(self.prompt, list) else "/v1/completions"

    def body(self, target: Target, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"max_tokens": self.max_tokens, "temperature": 0.0, "stream": stream,
                                **target.extra_body}
        body["messages" if isinstance(self.prompt, list) else "prompt"] = self.prompt
        if target.model:
            body["model"] = target.model
        if stream:
            body["stream_options"] = {"include_usage": True}
        if target.return_token_ids:
            body["return_token_ids"] = True
        if target.documents_field and self.documents:
            body[target.documents_field] = list(self.documents)
        return body


@dataclass
class RequestOutcome:
    case: LoadCase
    tag: str  # who sent it: "c<client>-r<request>"
    stream: bool
    status: int | None = None  # HTTP status of the last attempt; None = no response at all
    text: str = ""
    token_ids: list[int] | None = None
    finish_reason: str | None = None
    response_id: str | None = None
    usage: dict | None = None
    stats: dict | None = None  # the server's `hsd_rag` field, when it sends one
    error: str | None = None
    error_body: dict | None = None
    retries_429: int = 0
    retry_after: list[str] = field(default_factory=list)  # Retry-After headers of the 429s
    latency_s: float = 0.0  # first attempt to last byte, retries included
    first_token_s: float | None = None
    saw_done: bool = False  # the stream ended with `data: [DONE]`

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None and (self.saw_done or not self.stream)

    def mismatch(self) -> str | None:
        """Why the output is not the expected greedy one (None when it is, or nothing is expected)."""
        case = self.case
        if case.expected_token_ids is not None and self.token_ids is not None:
            if self.token_ids != case.expected_token_ids:
                return f"token ids {self.token_ids[:12]}... != expected {case.expected_token_ids[:12]}..."
        elif case.expected_text is not None and self.text != case.expected_text:
            return f"text {self.text[:60]!r} != expected {case.expected_text[:60]!r}"
        return None

    def leak(self) -> str | None:
        """Why the draft statistics differ from the request's solo run (None when equal or not reported)."""
        expected = self.case.expected_draft_stats
        if expected is None or self.stats is None:
            return None
        for key in ("drafted_by_source", "accepted_by_source"):
            got = {k: v for k, v in (self.stats.get(key) or {}).items() if v}
            want = {k: v for k, v in (expected.get(key) or {}).items() if v}
            if got != want:
                return f"{key} {got} != solo run {want}"
        return None


@dataclass
class LoadReport:
    clients: int
    requests_per_client: int
    outcomes: list[RequestOutcome]
    wall_s: float
    server_successes: float | None = None  # successes the server counted during the run, when it exposes them

    @property
    def completed(self) -> list[RequestOutcome]:
        return [o for o in self.outcomes if o.ok]

    @property
    def completion_tokens(self) -> int:
        return sum(_completion_tokens(o) for o in self.completed)

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def latency_percentile(self, q: float) -> float:
        return percentile([o.latency_s for o in self.completed], q)

    @property
    def retries_429(self) -> int:
        return sum(o.retries_429 for o in self.outcomes)

    def problems(self) -> list[str]:
        """Everything that went wrong: lost, duplicated, mixed-up, wrong or leaking requests (empty = all good)."""
        out = []
        expected_tags = {f"c{c}-r{r}" for c in range(self.clients) for r in range(self.requests_per_client)}
        tags = Counter(o.tag for o in self.outcomes)
        out += [f"{t}: no outcome (lost)" for t in sorted(expected_tags - set(tags))]
        out += [f"{t}: {n} outcomes (duplicated)" for t, n in tags.items() if n > 1]
        for o in self.outcomes:
            if not o.ok:
                out.append(f"{o.tag} ({o.case.key}): failed: status {o.status}, {o.error or 'no [DONE]'}")
                continue
            if o.finish_reason is None:
                out.append(f"{o.tag} ({o.case.key}): no finish_reason")
            if (why := o.mismatch()) is not None:
                out.append(f"{o.tag} ({o.case.key}): output differs from its solo reference: {why}")
            if (why := o.leak()) is not None:
                out.append(f"{o.tag} ({o.case.key}): drafted differently than alone (a document leak?): {why}")
        ids = Counter(o.response_id for o in self.completed if o.response_id)
        out += [f"response id {i} returned {n} times (duplicated)" for i, n in ids.items() if n > 1]
        if self.server_successes is not None and self.server_successes != len(self.completed):
            out.append(f"the server counted {self.server_successes:.0f} successful requests, the clients got "
                       f"{len(self.completed)} (lost or duplicated)")
        return out

    def summary(self) -> dict[str, Any]:
        return {
            "concurrency": self.clients,
            "requests": len(self.outcomes),
            "completed": len(self.completed),
            "completion_tokens": self.completion_tokens,
            "wall_s": round(self.wall_s, 2),
            "tokens_per_s": round(self.tokens_per_s, 2),
            "p50_s": round(self.latency_percentile(0.5), 2),
            "p95_s": round(self.latency_percentile(0.95), 2),
            "retries_429": self.retries_429,
            "problems": len(self.problems()),
        }


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 1]); 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def _completion_tokens(outcome: RequestOutcome) -> int:
    if outcome.usage and "completion_tokens" in outcome.usage:
        return int(outcome.usage["completion_tokens"])
    return len(outcome.token_ids or [])


def describe_error(error: BaseException) -> str:
    """A client-side failure in words a user can act on."""
    if isinstance(error, httpx.ConnectError):
        return f"cannot connect to the server (is it running?): {error}"
    if isinstance(error, httpx.RemoteProtocolError | httpx.ReadError):
        return f"the server closed the connection mid-response: {error}"
    if isinstance(error, httpx.TimeoutException):
        return f"no answer within the client timeout: {type(error).__name__}"
    return f"{type(error).__name__}: {error}"


def event_text(line: str) -> str:
    """The generated text an SSE line carries ("" for role, usage, error and [DONE] lines)."""
    if not line.startswith("data:") or line.strip() == "data: [DONE]":
        return ""
    try:
        event = json.loads(line[len("data:"):])
    except ValueError:
        return ""
    pieces = []
    for choice in event.get("choices") or []:
        piece = (choice.get("delta") or {}).get("content") if "delta" in choice else choice.get("text")
        pieces.append(piece or "")
    return "".join(pieces)


# ---- one request ----------------------------------------------------------------------------------------------


async def send(client: httpx.AsyncClient, target: Target, case: LoadCase, *, stream: bool, tag: str = "c0-r0",
               retry_429: bool = True, max_429_retries: int = DEFAULT_429_RETRIES) -> RequestOutcome:
    """Send one request (retrying 429s after Retry-After when asked); never raises for server or network faults."""
    outcome = RequestOutcome(case, tag, stream)
    start = time.monotonic()
    try:
        while True:
            await (_stream_once if stream else _whole_once)(client, target, case, outcome, start)
            if outcome.status != 429 or not retry_429 or outcome.retries_429 >= max_429_retries:
                break
            outcome.retries_429 += 1
            await asyncio.sleep(min(_retry_after(outcome), MAX_RETRY_AFTER_S))
            outcome.error, outcome.error_body = None, None
    except (httpx.HTTPError, OSError) as error:
        outcome.error = describe_error(error)
    outcome.latency_s = time.monotonic() - start
    return outcome


def _retry_after(outcome: RequestOutcome) -> float:
    try:
        return max(0.0, float(outcome.retry_after[-1]))
    except (IndexError, ValueError):
        return 1.0


def _refused(outcome: RequestOutcome, response: httpx.Response, body: bytes) -> None:
    outcome.status = response.status_code
    if response.status_code == 429:
        outcome.retry_after.append(response.headers.get("retry-after", ""))
    try:
        outcome.error_body = json.loads(body)
        outcome.error = outcome.error_body["error"]["message"]
    except (ValueError, KeyError, TypeError):
        outcome.error = f"HTTP {response.status_code}: {body[:200]!r}"


async def _whole_once(client, target, case, outcome: RequestOutcome, start: float) -> None:
    response = await client.post(case.path, json=case.body(target, stream=False))
    if response.status_code != 200:
        _refused(outcome, response, response.content)
        return
    outcome.status = 200
    data = response.json()
    choice = data["choices"][0]
    outcome.text = choice["message"]["content"] if "message" in choice else choice["text"]
    outcome.token_ids = choice.get("token_ids")
    outcome.finish_reason = choice.get("finish_reason")
    outcome.response_id = data.get("id")
    outcome.usage = data.get("usage")
    outcome.stats = data.get("hsd_rag")
    outcome.first_token_s = time.monotonic() - start


async def _stream_once(client, target, case, outcome: RequestOutcome, start: float) -> None:
    async with client.stream("POST", case.path, json=case.body(target, stream=True)) as response:
        if response.status_code != 200:
            _refused(outcome, response, await response.aread())
            return
        outcome.status = 200
        text, ids = [], []
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            payload = line[len("data:"):].strip()
            if payload == "[DONE]":
                outcome.saw_done = True
                break
            event = json.loads(payload)
            if event.get("error"):
                outcome.error_body = event
                outcome.error = event["error"].get("message", str(event["error"]))
                continue
            outcome.response_id = outcome.response_id or event.get("id")
            outcome.usage = event.get("usage") or outcome.usage
            outcome.stats = event.get("hsd_rag") or outcome.stats
            for choice in event.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content") if "delta" in choice else choice.get("text")
                if piece:
                    outcome.first_token_s = outcome.first_token_s or time.monotonic() - start
                    text.append(piece)
                ids.extend(choice.get("token_ids") or [])
                outcome.finish_reason = choice.get("finish_reason") or outcome.finish_reason
        outcome.text = "".join(text)
        outcome.token_ids = ids if target.return_token_ids and ids else None


# ---- load -----------------------------------------------------------------------------------------------------


async def run_load(target: Target, cases: Sequence[LoadCase], *, clients: int = 32, requests_per_client: int = 4,
                   stream: bool | None = None, success_metric: tuple[str, dict[str, str]] | None = None
                   ) -> LoadReport:
    """`clients` concurrent clients, each sending `requests_per_client` requests one after the other.

    Request r of client c is case (c * requests_per_client + r) mod len(cases); stream=None alternates streamed
    and whole requests. `success_metric` (a Prometheus counter and label filter, e.g. ("hsd_rag_requests_total",
    {"status": "200"}) or ("vllm:request_success_total", {})) lets the server's own count confirm nothing was
    lost or duplicated.
    """
    if not cases:
        raise ValueError("run_load needs at least one case.")
    before = await scrape_metric(target, *success_metric) if success_metric else None

    async def client_loop(c: int, client: httpx.AsyncClient) -> list[RequestOutcome]:
        outcomes = []
        for r in range(requests_per_client):
            case = cases[(c * requests_per_client + r) % len(cases)]
            streamed = (c + r) % 2 == 0 if stream is None else stream
            outcomes.append(await send(client, target, case, stream=streamed, tag=f"c{c}-r{r}"))
        return outcomes

    async with target.client(clients) as client:
        started = time.monotonic()
        per_client = await asyncio.gather(*(client_loop(c, client) for c in range(clients)))
        wall = time.monotonic() - started
    report = LoadReport(clients, requests_per_client, [o for group in per_client for o in group], wall)
    if success_metric:
        after = await scrape_metric(target, *success_metric)
        if before is not None and after is not None:
            report.server_successes = after - before
    return report


# ---- faults ---------------------------------------------------------------------------------------------------


@dataclass
class QueueFullProbe:
    burst: int
    first_statuses: list[int | None]  # each request's first answer, before any retry
    retry_after: list[str]  # Retry-After headers of the 429s
    error_types: list[str]  # error.type of the 429 bodies
    outcomes: list[RequestOutcome]  # after retrying

    @property
    def refused(self) -> int:
        return sum(s == 429 for s in self.first_statuses)

    def problems(self) -> list[str]:
        out = []
        if not all(h.isdigit() and int(h) >= 1 for h in self.retry_after):
            out.append(f"429 without a valid Retry-After: {self.retry_after}")
        if any(t != "rate_limit_error" for t in self.error_types):
            out.append(f"429 bodies not OpenAI-shaped rate_limit_error: {self.error_types}")
        unexpected = [s for s in self.first_statuses if s not in (200, 429)]
        if unexpected:
            out.append(f"statuses other than 200/429 in the burst: {unexpected}")
        out += [f"{o.tag}: failed after retrying: {o.error}" for o in self.outcomes if not o.ok]
        out += [f"{o.tag}: {why}" for o in self.outcomes if o.ok and (why := o.mismatch())]
        return out


async def probe_queue_full(target: Target, case: LoadCase, burst: int) -> QueueFullProbe:
    """Send `burst` requests at once without retrying, then retry the refused ones after their Retry-After."""
    async with target.client(burst) as client:
        first = await asyncio.gather(*(send(client, target, case, stream=False, tag=f"b{i}", retry_429=False)
                                       for i in range(burst)))
        retry_after = [h for o in first for h in o.retry_after]
        types = [(o.error_body or {}).get("error", {}).get("type", "") for o in first if o.status == 429]

        async def settle(o: RequestOutcome) -> RequestOutcome:
            if o.status != 429:
                return o
            await asyncio.sleep(min(_retry_after(o), MAX_RETRY_AFTER_S))
            return await send(client, target, case, stream=False, tag=o.tag)

        final = await asyncio.gather(*(settle(o) for o in first))
    return QueueFullProbe(burst, [o.status for o in first], retry_after, types, list(final))


async def probe_disconnect(target: Target, case: LoadCase, *, stream: bool, hang_up_after_s: float = 0.5,
                           follow_up: LoadCase | None = None) -> RequestOutcome:
    """Hang up mid-answer: a stream after its first text, a whole request after `hang_up_after_s`. Then check
    the server still answers: the returned outcome is that follow-up request (`follow_up`, default `case`)."""
    async with target.client(2) as client:
        if stream:
            async with client.stream("POST", case.path, json=case.body(target, stream=True)) as response:
                async for line in response.aiter_lines():
                    if event_text(line):
                        break  # first real text: hang up
        else:
            task = asyncio.create_task(client.post(case.path, json=case.body(target, stream=False)))
            await asyncio.sleep(hang_up_after_s)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    async with target.client(1) as client:
        return await send(client, target, follow_up or case, stream=False, tag="after-disconnect")


@dataclass
class KillRestartProbe:
    during: list[RequestOutcome]  # the clients streaming when the server died
    after: list[RequestOutcome]  # requests sent after the restart
    ended_within_s: float  # how long the last client took to notice, after the kill

    def problems(self) -> list[str]:
        out = []
        if not any(o.error for o in self.during):
            out.append("no client saw an error although the server was killed mid-stream")
        for o in self.during:
            if not o.ok and not o.error:
                out.append(f"{o.tag}: stream broke without a clear error")
        out += [f"{o.tag}: failed after restart: {o.error}" for o in self.after if not o.ok]
        out += [f"{o.tag}: {why}" for o in self.after if o.ok and (why := o.mismatch())]
        return out


async def probe_kill_restart(target: Target, case: LoadCase, kill: Callable[[], Any],
                             restart: Callable[[], Awaitable[Any] | Any], *, clients: int = 4,
                             startup_timeout_s: float = 120.0) -> KillRestartProbe:
    """Start `clients` streams, kill the server once one has text, wait for every client (each bounded by the
    target's timeout), restart the server, wait for /health, and send `clients` requests again."""
    first_text = asyncio.Event()

    async def streaming(i: int, client: httpx.AsyncClient) -> RequestOutcome:
        outcome = RequestOutcome(case, f"k{i}", True)
        start = time.monotonic()
        try:
            async with client.stream("POST", case.path, json=case.body(target, stream=True)) as response:
                outcome.status = response.status_code
                async for line in response.aiter_lines():
                    if line.strip() == "data: [DONE]":
                        outcome.saw_done = True
                    elif line.startswith("data:") and '"error"' in line and "error" in json.loads(line[5:]):
                        outcome.error = json.loads(line[5:])["error"].get("message", "error event")
                    elif event_text(line):
                        first_text.set()
        except (httpx.HTTPError, OSError) as error:
            outcome.error = describe_error(error)
        if outcome.status == 200 and not outcome.saw_done and not outcome.error:
            outcome.error = "the stream ended without [DONE] (server gone)"
        outcome.latency_s = time.monotonic() - start
        return outcome

    async with target.client(clients) as client:
        tasks = [asyncio.create_task(streaming(i, client)) for i in range(clients)]
        try:
            await asyncio.wait_for(first_text.wait(), timeout=target.timeout_s)
        except TimeoutError:
            for task in tasks:
                task.cancel()
            raise
        kill()
        killed = time.monotonic()
        during = await asyncio.gather(*tasks)
        noticed = time.monotonic() - killed
    result = restart()
    if asyncio.iscoroutine(result):
        await result
    await wait_healthy(target, startup_timeout_s)
    async with target.client(clients) as client:
        after = await asyncio.gather(*(send(client, target, case, stream=i % 2 == 0, tag=f"r{i}")
                                       for i in range(clients)))
    return KillRestartProbe(list(during), list(after), noticed)


async def wait_healthy(target: Target, timeout_s: float) -> None:
    """Poll /health until it answers 200 (raises TimeoutError after `timeout_s`)."""
    give_up = time.monotonic() + timeout_s
    async with httpx.AsyncClient(base_url=target.base_url, timeout=5.0) as client:
        while True:
            try:
                if (await client.get("/health")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > give_up:
                raise TimeoutError(f"{target.base_url}/health did not answer within {timeout_s:.0f} s")
            await asyncio.sleep(HEALTH_POLL_S)


# ---- server metrics -------------------------------------------------------------------------------------------

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Prometheus text format -> (name, labels, value) samples."""
    samples = []
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        match = _SAMPLE.match(line)
        if match:
            name, labels, value = match.groups()
            try:
                samples.append((name, dict(_LABEL.findall(labels or "")), float(value)))
            except ValueError:
                continue
    return samples


async def scrape_metric(target: Target, name: str, labels: dict[str, str] | None = None) -> float | None:
    """Sum of the samples of `name` whose labels include `labels` (0 if none yet); None without /metrics."""
    try:
        async with httpx.AsyncClient(base_url=target.base_url, headers=target.headers, timeout=10.0) as client:
            response = await client.get("/metrics")
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    return sum(v for n, lab, v in parse_metrics(response.text)
               if n == name and all(lab.get(k) == want for k, want in (labels or {}).items()))


class ServerProcess:
    """A server command in a subprocess that the fault checks can SIGKILL and start again.

    `repo` goes first on PYTHONPATH (so that checkout's hsd_rag serves) and the hub stays offline; output is
    appended to `log`.
    """

    def __init__(self, command: list[str], log: Path, repo: Path, wait_s: float = 60.0):
        self.command = command
        self.log = log
        self.repo = repo
        self.wait_s = wait_s
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(self.repo), "HF_HUB_OFFLINE": "1"}
        with open(self.log, "a") as log:
            self.process = subprocess.Popen(self.command, cwd=self.repo, env=env, stdout=log,
                                            stderr=subprocess.STDOUT)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(self.wait_s)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(self.wait_s)
            except subprocess.TimeoutExpired:
                self.kill()
