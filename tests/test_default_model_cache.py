"""The cached de-quantized default model is a clean HF checkpoint: no GGUF quantization_config left in config.json.

Both paths run against a private cache (HSD_RAG_CACHE in a temp dir) with a tiny stand-in for the GGUF model, so
the test needs neither the real de-quantization nor the user's cache.
"""

from __future__ import annotations

import json

import pytest
import torch

from hsd_rag import loading
from tests.tiny_models import tiny_model

GGUF_QUANTIZATION = {"dequantize": False, "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf", "quant_method": "gguf"}


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(loading.CACHE_ENV, str(tmp_path))
    return tmp_path / "models" / loading.DEFAULT_MODEL_NAME


def test_an_old_cache_is_cleaned_on_upgrade(private_cache):
    private_cache.mkdir(parents=True)
    config = {"model_type": "llama", "hidden_size": 576, "quantization_config": GGUF_QUANTIZATION}
    (private_cache / "config.json").write_text(json.dumps(config))
    (private_cache / "model.safetensors").write_bytes(b"weights")
    (private_cache / "tokenizer_config.json").write_text("{}")
    assert loading.default_snapshot() == private_cache
    cleaned = json.loads((private_cache / "config.json").read_text())
    assert cleaned == {"model_type": "llama", "hidden_size": 576}
    assert sorted(p.name for p in private_cache.iterdir()) == ["config.json", "model.safetensors", "tokenizer_config.json"]


def test_a_fresh_cache_is_a_plain_checkpoint(private_cache, monkeypatch):
    from transformers import AutoConfig, AutoModelForCausalLM

    from tests.test_streaming_text import byte_fallback_tokenizer

    source = tiny_model("llama", layers=2, hidden=32)
    source.config.quantization_config = dict(GGUF_QUANTIZATION)  # what a GGUF-loaded config carries
    monkeypatch.setattr(loading, "default_gguf_path", lambda: private_cache.parent / "fake.gguf")
    monkeypatch.setattr(loading, "_load_gguf", lambda path, dtype: (source, byte_fallback_tokenizer()))
    snapshot = loading.default_snapshot()
    assert "quantization_config" not in json.loads((snapshot / "config.json").read_text())
    assert getattr(AutoConfig.from_pretrained(snapshot), "quantization_config", None) is None
    reloaded = AutoModelForCausalLM.from_pretrained(snapshot, dtype=torch.float32)
    for name, tensor in source.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
