"""The `hsd-rag` commands `tune`, `bench` and `qa`, run in-process on a tiny model directory.

`HSD_RAG_CACHE` points at a temporary directory in every test, so the cost profile `tune` writes and the index
`qa` builds never touch the user's cache. Outputs are checked against HF `generate`, not against our own decoder.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hsd_rag import loading
from hsd_rag.cli import main
from tests.tiny_files import save_model_dir, tiny_smollm2_model

MODEL_ARGS = ["--head", "none", "--device", "cpu", "--threads", "1"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv(loading.CACHE_ENV, str(cache))
    return cache


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_model_dir(tmp_path_factory.mktemp("cli") / "tiny-llama", tiny_smollm2_model())


@pytest.fixture(autouse=True)
def restore_threads():
    """`--threads` sets torch's global thread count; give the rest of the suite its own back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def hf_greedy_text(target_dir: Path, messages: list[dict], max_new_tokens: int) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    model = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32)
    ids = torch.tensor([tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_tune_writes_its_profile_to_the_private_cache(model_dir, private_cache, capsys):
    assert main(["tune", "--target", str(model_dir), *MODEL_ARGS, "--context", "48"]) == 0
    out = capsys.readouterr().out
    profiles = list((private_cache / "profiles").glob("*.json"))
    assert len(profiles) == 1 and f"saved to {profiles[0]}" in out
    profile = json.loads(profiles[0].read_text())
    assert profile["tokens"][0] == 1 and profile["relative_cost"][0] == pytest.approx(1.0)
    assert len(profile["tokens"]) == len(profile["relative_cost"]) == out.count("\n| ") - 1  # one row per size


def test_bench_compares_with_generate(model_dir, tmp_path, capsys):
    dataset = tmp_path / "prompts.jsonl"
    records = [
        {"id": "tower", "question": "Who designed the Eiffel Tower?",
         "documents": ["The Eiffel Tower was designed by the engineer Gustave Eiffel's company."]},
        {"id": "reef", "question": "Where is the Great Barrier Reef?",
         "documents": ["The Great Barrier Reef lies off the coast of Queensland, Australia."]},
    ]
    dataset.write_text("".join(json.dumps(r) + "\n" for r in records))
    out_dir = tmp_path / "report"
    code = main(["bench", "--target", str(model_dir), *MODEL_ARGS, "--dataset", str(dataset), "--limit", "2",
                 "--methods", "vanilla,ngram", "--budgets", "4", "--max-new-tokens", "6", "--out", str(out_dir)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "greedy outputs differing from HF generate: 0" in out
    assert "| ngram" in out and "| vanilla" in out
    assert (out_dir / "records.jsonl").exists() and (out_dir / "report.md").exists()
    lines = (out_dir / "records.jsonl").read_text().splitlines()
    assert {json.loads(line)["method"] for line in lines} >= {"vanilla", "ngram"}


def test_qa_streams_the_lossless_answer(model_dir, tmp_path, private_cache, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "tower.md").write_text("# Eiffel Tower\n\nThe Eiffel Tower was designed by Gustave Eiffel's company.")
    (docs / "reef.txt").write_text("The Great Barrier Reef lies off the coast of Queensland, Australia.")
    question = "Who designed the Eiffel Tower?"
    code = main(["qa", str(docs), question, "--target", str(model_dir), *MODEL_ARGS, "--k", "1",
                 "--max-new-tokens", "8", "--method", "ngram", "--budget", "4"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "[source 1] tower.md" in captured.err and "[stats] 8 tokens" in captured.err
    assert any((private_cache / "indexes").iterdir())  # the index went to the private cache, not the folder
    from hsd_rag.data import format_prompt
    from hsd_rag.retrieval import FolderIndex

    chunks = FolderIndex.open(docs).search(question, k=1)  # what the command put in the prompt
    messages = [{"role": "user", "content": format_prompt(question, [c.text for c in chunks])}]
    assert captured.out == hf_greedy_text(model_dir, messages, 8) + "\n"


def test_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    assert main(["qa", str(tmp_path / "missing"), "hello?", *MODEL_ARGS]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hsd-rag: error:") and "missing" in err and "Traceback" not in err
