"""Peers in the benchmark: vLLM's CPU build on the same prompts, interleaved with HF `generate` and our methods.

Each peer is a loopback vLLM OpenAI server from the vLLM venv (hsd_rag.engines.vllm.launch), one per method,
all started before the run so the runner can rotate through them prompt by prompt. A peer run sends the exact
prompt token ids HF `generate` gets (`/v1/completions` with a token-id prompt, streamed), so greedy outputs are
compared token for token with HF's. Timing, at the client:

- wall: request sent -> last token received (loopback HTTP adds ~1 ms to what vLLM itself spends);
- decode: first token received -> last token, over the tokens after the first (the prefill step emits one);
- forwards: from vLLM's own counters (/metrics, scraped around each request, outside the timed span): one
  request at a time, every step emits its accepted drafts plus one token, so forwards = tokens - accepted.

Threads: with `threads` set, every peer's thread pools (OpenMP, numba) are capped at `threads` unbound threads
(`launch.server_env`), as torch's own threads are for HF `generate` and our methods.
Memory: vLLM's CPU build reserves host RAM for its KV cache; peers get `PEER_KV_CACHE_BYTES` each (~5.8k tokens
of the 135M default model, enough for one request of `PEER_MAX_MODEL_LEN`) and at most `PEER_MAX_NUM_SEQS`.
"""

from __future__ import annotations

import json
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from hsd_rag.bench.runner import BenchCase, BenchRecord

PLAIN_PEER = "vllm"  # vLLM without speculation: the peers' own plain decode


@dataclass(frozen=True)
class PeerSpec:
    speculative: str  # hsd_rag.engines.vllm.launch.SPECULATIVE_METHODS
    num_speculative_tokens: int  # draft tokens per step (an upper bound for suffix and ours)


# k as measured in FIELD-NOTES §9 for vLLM's methods; ours sizes chains itself, k only caps them.
PEERS: dict[str, PeerSpec] = {
    PLAIN_PEER: PeerSpec("none", 1),
    "vllm-ngram": PeerSpec("ngram", 8),
    "vllm-suffix": PeerSpec("suffix", 16),
    "vllm-hsd": PeerSpec("hsd", 16),
    "vllm-eagle3": PeerSpec("eagle3", 4),  # vLLM's EAGLE-3 with our shipped head (default model only)
}
PEER_KV_CACHE_BYTES = 256 * 2**20
PEER_MAX_MODEL_LEN = 4096
PEER_MAX_NUM_SEQS = 4
REQUEST_TIMEOUT_S = 600.0
DRAFT_METRICS = {
    "drafted": "vllm:spec_decode_num_draft_tokens_total",
    "accepted": "vllm:spec_decode_num_accepted_tokens_total",
}


def parse_peers(text: str | None) -> list[str]:
    """Peer names from a comma-separated list; ValueError naming the valid ones for anything else."""
    names = [name.strip() for name in (text or "").split(",") if name.strip()]
    unknown = [name for name in names if name not in PEERS]
    if unknown:
        raise ValueError(f"Unknown peer(s) {', '.join(unknown)}: use any of {', '.join(PEERS)}.")
    return list(dict.fromkeys(names))


def is_peer(method: str) -> bool:
    return method in PEERS


@contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """While inside, SIGTERM raises SystemExit(143) in the main thread, so `with` blocks unwind and a PeerPool
    stops its vLLM servers (they run in their own sessions and would otherwise outlive a terminated bench,
    holding gigabytes of RAM). Outside the main thread it does nothing (signals cannot be set there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def exit_on_sigterm(signum, frame):
        sys.exit(128 + signum)

    previous = signal.signal(signal.SIGTERM, exit_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class PeerPool:
    """The requested peers as running vLLM servers; `with PeerPool(...) as pool: pool.run(...)`."""

    def __init__(self, names: Iterable[str], model: str | None = None, threads: int | None = None,
                 log_dir: str | Path | None = None):
        self.names = list(names)
        self.model = model
        self.threads = threads
        self.log_dir = Path(log_dir) if log_dir else None
        self.servers: dict = {}
        self._stack = ExitStack()

    def __enter__(self) -> PeerPool:
        import httpx

        from hsd_rag.engines.vllm.launch import VllmServer

        self._client = self._stack.enter_context(httpx.Client(timeout=REQUEST_TIMEOUT_S))
        try:
            for name in self.names:  # start them all, then wait: cold starts overlap
                spec = PEERS[name]
                server = VllmServer(
                    self.model, "127.0.0.1", free_port(), spec.speculative, spec.num_speculative_tokens,
                    threads=self.threads, dtype="float32", enforce_eager=True,
                    kv_cache_bytes=PEER_KV_CACHE_BYTES, max_model_len=PEER_MAX_MODEL_LEN,
                    extra_args=["--max-num-seqs", str(PEER_MAX_NUM_SEQS)],
                    log_path=self.log_dir / f"{name}.log" if self.log_dir else None,
                )
                self._stack.callback(server.stop)
                self.servers[name] = server.start()
            for server in self.servers.values():
                server.wait_ready()
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def run(self, name: str, prompt_ids: Sequence[int], case: BenchCase, max_new_tokens: int,
            temperature: float, seed: int) -> BenchRecord:
        """One streamed completion on peer `name`, timed at the client (see module docstring)."""
        server = self.servers[name]
        body = {
            "model": server.model_dir, "prompt": list(prompt_ids), "max_tokens": max_new_tokens,
            "temperature": temperature, "seed": seed, "stream": True, "return_token_ids": True,
        }
        if PEERS[name].speculative == "hsd" and case.documents:
            body["documents"] = list(case.documents)  # as our methods index them (hsd_rag.engines.vllm.documents)
        before = self._counters(server)
        tokens: list[int] = []
        finish = ""
        first_token_at = None
        start = time.perf_counter()
        with self._client.stream("POST", f"{server.base_url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                response.read()
                raise RuntimeError(f"{name} answered {response.status_code}: {response.text[:500]}")
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                choice = json.loads(line[len("data: "):])["choices"][0]
                new = choice.get("token_ids") or []
                if new and first_token_at is None:
                    first_token_at = time.perf_counter()
                tokens.extend(new)
                finish = choice.get("finish_reason") or finish
        wall = time.perf_counter() - start
        after = self._counters(server)
        drafted = round(after["drafted"] - before["drafted"])  # Prometheus counters are floats
        accepted = round(after["accepted"] - before["accepted"])
        first_token_s = (first_token_at - start) if first_token_at is not None else wall
        spec = PEERS[name].speculative
        record = BenchRecord(
            case.id, case.dataset, name, PEERS[name].num_speculative_tokens if spec != "none" else 0, temperature,
            len(prompt_ids), len(tokens), max(len(tokens) - accepted, 1 if tokens else 0), wall,
            prefill_s=first_token_s,
            accepted_by_source={spec: accepted} if drafted else {},
            drafted_by_source={spec: drafted} if drafted else {},
            tokens_by_label={"target": len(tokens) - accepted, **({spec: accepted} if accepted else {})},
            stop_reason="eos" if finish == "stop" else finish, token_ids=tokens,
            decode_s=wall - first_token_s, decode_tokens=max(len(tokens) - 1, 0),
        )
        return record

    def _counters(self, server) -> dict[str, float]:
        """vLLM's speculative-decoding counters (summed over label sets; 0 for plain decoding)."""
        text = self._client.get(f"{server.base_url}/metrics").text
        totals = dict.fromkeys(DRAFT_METRICS, 0.0)
        for line in text.splitlines():
            for key, metric in DRAFT_METRICS.items():
                if line.startswith(metric + "{") or line.startswith(metric + " "):
                    totals[key] += float(line.rsplit(" ", 1)[1])
        return totals


def describe(pool: PeerPool) -> str:
    """One line for the report header: which vLLM, how it was configured."""
    from hsd_rag.engines.vllm.launch import vllm_python

    dist = sorted(vllm_python().parent.parent.glob("lib/python*/site-packages/vllm*-*.dist-info"))
    version = dist[0].name.removesuffix(".dist-info").replace("_", "-") if dist else "vLLM"
    methods = ", ".join(f"{n} ({PEERS[n].speculative}, k={PEERS[n].num_speculative_tokens})" for n in pool.names)
    threads = f"{pool.threads} thread(s), unbound" if pool.threads else "vLLM's default thread binding"
    return f"{version}, fp32, eager, {threads}; loopback OpenAI servers: {methods}"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
