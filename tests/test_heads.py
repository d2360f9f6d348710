"""EAGLE heads: official checkpoint layout, round trips, refusal of wrong targets, feature capture, semantics."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from hsd_rag.heads import (
    Eagle1Head,
    Eagle3Head,
    FeatureCapture,
    HeadCheckpointError,
    eagle3_feature_layers,
    load_head,
    save_head,
)
from hsd_rag.heads.checkpoint import BIN_NAME, SAFETENSORS_NAME
from tests.tiny_models import tiny_model

VOCAB = 128
DRAFT_VOCAB = 48
HIDDEN = 64
LAYERS = 8  # distinct EAGLE-3 feature layers 2, 4, 5
HEADS, KV_HEADS = 4, 2
HEAD_DIM = HIDDEN // HEADS
INTERMEDIATE = 2 * HIDDEN


@pytest.fixture(scope="module")
def target():
    return tiny_model("llama", vocab=VOCAB, layers=LAYERS, hidden=HIDDEN)


def random_eagle3(target, seed: int = 0) -> Eagle3Head:
    torch.manual_seed(seed)
    head = Eagle3Head.from_target(target, draft_vocab_size=DRAFT_VOCAB)
    with torch.no_grad():
        for param in head.parameters():
            param.normal_(0, 0.2)
        head.set_vocab_map(torch.randperm(VOCAB)[:DRAFT_VOCAB].sort().values)
    return head.eval()


def official_eagle3_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Tensors under the exact names and shapes of yuhuili/EAGLE3-LLaMA3.1-Instruct-8B (scaled down)."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape):
        return torch.randn(*shape, generator=g)

    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    d2t = torch.randperm(VOCAB, generator=g)[:DRAFT_VOCAB].sort().values
    t2d = torch.zeros(VOCAB, dtype=torch.bool)
    t2d[d2t] = True
    return {
        "d2t": d2t - torch.arange(DRAFT_VOCAB),
        "t2d": t2d,
        "fc.weight": w(HIDDEN, 3 * HIDDEN),
        "midlayer.self_attn.q_proj.weight": w(q, 2 * HIDDEN),
        "midlayer.self_attn.k_proj.weight": w(kv, 2 * HIDDEN),
        "midlayer.self_attn.v_proj.weight": w(kv, 2 * HIDDEN),
        "midlayer.self_attn.o_proj.weight": w(HIDDEN, q),
        "midlayer.mlp.gate_proj.weight": w(INTERMEDIATE, HIDDEN),
        "midlayer.mlp.up_proj.weight": w(INTERMEDIATE, HIDDEN),
        "midlayer.mlp.down_proj.weight": w(HIDDEN, INTERMEDIATE),
        "midlayer.hidden_norm.weight": w(HIDDEN),
        "midlayer.input_layernorm.weight": w(HIDDEN),
        "midlayer.post_attention_layernorm.weight": w(HIDDEN),
        "norm.weight": w(HIDDEN),
        "lm_head.weight": w(DRAFT_VOCAB, HIDDEN),
    }


def official_config(**extra) -> dict:
    """config.json as the official heads ship it (LlamaConfig fields, legacy rope keys, one layer)."""
    return {
        "architectures": ["LlamaForCausalLMEagle3"],
        "bos_token_id": 0,
        "eos_token_id": 1,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": INTERMEDIATE,
        "max_position_embeddings": 512,
        "model_type": "llama",
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "num_hidden_layers": 1,
        "pad_token_id": 1,
        "rms_norm_eps": 1e-6,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "transformers_version": "4.28.1",
        "use_cache": True,
        "vocab_size": VOCAB,
        **extra,
    }


def write_official(directory, state, config, bin_format: bool = True):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    if bin_format:
        torch.save(state, directory / BIN_NAME)
    else:
        from safetensors.torch import save_file

        save_file(state, str(directory / SAFETENSORS_NAME))
    return directory


# ---- loading the official layout ---------------------------------------------------------------------------


@pytest.mark.parametrize("bin_format", [True, False])
def test_official_eagle3_layout_loads(tmp_path, target, bin_format):
    state = official_eagle3_state()
    folder = write_official(tmp_path / "head", state, official_config(draft_vocab_size=DRAFT_VOCAB), bin_format)
    head = load_head(folder, target, dtype=target.dtype)
    assert isinstance(head, Eagle3Head) and head.kind == "eagle3"
    loaded = head.state_dict()
    assert set(loaded) == set(state)  # no embedding, no RoPE buffers: exactly the official keys
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key
    assert head.target_embedding is target.get_input_embeddings()
    mapped = head.to_target_ids(torch.arange(DRAFT_VOCAB))
    assert head.t2d[mapped].all() and int(head.t2d.sum()) == DRAFT_VOCAB


def test_draft_vocab_size_inferred_from_d2t_when_config_lacks_it(tmp_path, target):
    folder = write_official(tmp_path / "head", official_eagle3_state(), official_config())
    assert load_head(folder, target).draft_vocab_size == DRAFT_VOCAB


def test_official_eagle1_layout_loads(tmp_path, target):
    g = torch.Generator().manual_seed(1)
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    shapes = {
        "fc.weight": (HIDDEN, 2 * HIDDEN),
        "fc.bias": (HIDDEN,),
        "layers.0.self_attn.q_proj.weight": (q, HIDDEN),
        "layers.0.self_attn.k_proj.weight": (kv, HIDDEN),
        "layers.0.self_attn.v_proj.weight": (kv, HIDDEN),
        "layers.0.self_attn.o_proj.weight": (HIDDEN, q),
        "layers.0.mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN),
        "layers.0.mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
        "layers.0.mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
        "layers.0.post_attention_layernorm.weight": (HIDDEN,),
    }
    state = {key: torch.randn(*shape, generator=g) for key, shape in shapes.items()}
    shipped = {**state, "embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=g)}  # some ship a copy
    config = official_config(architectures=["LlamaForCausalLM"])
    head = load_head(write_official(tmp_path / "e1", shipped, config), target)
    assert isinstance(head, Eagle1Head) and head.kind == "eagle1"
    assert set(head.state_dict()) == set(state)
    assert not hasattr(head.layers[0], "input_layernorm")  # the reference's first layer has no input norm
    out = head(torch.randn(1, 3, HIDDEN), torch.tensor([[3, 4, 5]]))
    assert out.logits.shape == (1, 3, VOCAB)  # through the target's own lm_head
    assert torch.allclose(out.logits, target.lm_head(out.hidden))


# ---- round trips -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("safe", [True, False])
def test_eagle3_round_trip_is_exact(tmp_path, target, safe):
    head = random_eagle3(target)
    folder = save_head(head, tmp_path / "saved", safe_serialization=safe)
    assert (folder / (SAFETENSORS_NAME if safe else BIN_NAME)).is_file()
    config = json.loads((folder / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and config["draft_vocab_size"] == DRAFT_VOCAB
    assert config["architectures"] == ["LlamaForCausalLMEagle3"]
    again = load_head(folder, target, dtype=target.dtype)
    for key, value in head.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    features, ids = torch.randn(1, 5, 3 * HIDDEN), torch.randint(0, VOCAB, (1, 5))
    assert torch.equal(head(features, ids).logits, again(features, ids).logits)
    assert json.loads((save_head(again, tmp_path / "twice") / "config.json").read_text()) == config


def test_an_eagle3_head_of_a_float32_cpu_target_drafts_in_bf16_where_the_cpu_has_it(tmp_path, target, monkeypatch):
    """The head's precision picks drafts, never the output; bf16 is the default only with native bf16 matmuls."""
    from hsd_rag.heads import checkpoint

    folder = save_head(random_eagle3(target), tmp_path / "saved")
    monkeypatch.setattr(checkpoint, "_cpu_draft_dtype", lambda: torch.bfloat16)
    assert load_head(folder, target).fc.weight.dtype == torch.bfloat16
    assert load_head(folder, target, dtype=torch.float32).fc.weight.dtype == torch.float32  # asked for: kept
    monkeypatch.setattr(checkpoint, "_cpu_draft_dtype", lambda: None)  # a CPU without native bf16
    assert load_head(folder, target).fc.weight.dtype == torch.float32
    e1 = save_head(Eagle1Head.from_target(target), tmp_path / "e1")
    monkeypatch.setattr(checkpoint, "_cpu_draft_dtype", lambda: torch.bfloat16)
    assert load_head(e1, target).fc.weight.dtype == torch.float32  # EAGLE-1 borrows the target's lm_head


def test_eagle1_round_trip_is_exact(tmp_path, target):
    torch.manual_seed(2)
    head = Eagle1Head.from_target(target, num_layers=2)
    again = load_head(save_head(head, tmp_path / "e1"), target)
    assert isinstance(again, Eagle1Head) and again.num_layers == 2
    for key, value in head.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    assert hasattr(again.layers[1], "input_layernorm")


def test_llama3_rope_scaling_round_trips_and_matches_the_target(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256, "rope_theta": 500000.0}
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                         num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                         max_position_embeddings=512, rope_parameters=rope)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    head = Eagle3Head.from_target(model, draft_vocab_size=DRAFT_VOCAB)
    assert torch.equal(head.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)
    again = load_head(save_head(head, tmp_path / "r"), model)
    assert torch.equal(again.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)
    assert again.config.rope_parameters["rope_type"] == "llama3"


def test_half_precision_keeps_rope_frequencies_in_float32(target):
    head = random_eagle3(target).half()
    assert head.rotary_emb.inv_freq.dtype == torch.float32
    assert head.fc.weight.dtype == torch.float16 and head.d2t.dtype == torch.long


# ---- refusals ----------------------------------------------------------------------------------------------


def test_head_for_a_different_hidden_size_is_refused(tmp_path, target):
    other = tiny_model("llama", vocab=VOCAB, layers=LAYERS, hidden=2 * HIDDEN)
    folder = save_head(random_eagle3(target), tmp_path / "h")
    with pytest.raises(HeadCheckpointError, match=r"different target.*hidden size 64 vs the target's 128"):
        load_head(folder, other)


def test_head_for_a_different_vocabulary_is_refused(tmp_path, target):
    other = tiny_model("llama", vocab=VOCAB + 32, layers=LAYERS, hidden=HIDDEN)
    folder = save_head(random_eagle3(target), tmp_path / "h")
    with pytest.raises(HeadCheckpointError, match=r"vocabulary size 128 vs the target's 160"):
        load_head(folder, other)


def test_missing_and_unexpected_keys_are_named(tmp_path, target):
    state = official_eagle3_state()
    del state["norm.weight"], state["midlayer.hidden_norm.weight"]
    state["midlayer.extra_proj.weight"] = torch.zeros(2, 2)
    folder = write_official(tmp_path / "h", state, official_config(draft_vocab_size=DRAFT_VOCAB))
    with pytest.raises(HeadCheckpointError) as err:
        load_head(folder, target)
    message = str(err.value)
    assert "missing: midlayer.hidden_norm.weight, norm.weight" in message
    assert "unexpected: midlayer.extra_proj.weight" in message


def test_shape_mismatch_is_named(tmp_path, target):
    state = official_eagle3_state()
    folder = write_official(tmp_path / "h", state, official_config(draft_vocab_size=DRAFT_VOCAB + 1))
    with pytest.raises(HeadCheckpointError, match=r"wrong shape: d2t \(48,\) \(expected \(49,\)\), lm_head.weight"):
        load_head(folder, target)


def test_not_a_head_and_missing_files_are_explained(tmp_path, target):
    folder = write_official(tmp_path / "x", {"model.embed_tokens.weight": torch.zeros(2, 2)}, official_config())
    with pytest.raises(HeadCheckpointError, match="Not an EAGLE head"):
        load_head(folder, target)
    (tmp_path / "empty").mkdir()
    with pytest.raises(HeadCheckpointError, match="no config.json"):
        load_head(tmp_path / "empty", target)


def test_hub_failure_gives_an_offline_hint(monkeypatch, target):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(HeadCheckpointError, match="offline machine.*local folder"):
        load_head("nobody/no-such-eagle-head", target)
    assert issubclass(HeadCheckpointError, ValueError)


# ---- semantics ---------------------------------------------------------------------------------------------


def rms(x, weight, eps):
    return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def rotate(x, positions, theta, head_dim):
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = positions[:, None].float() * inv_freq[None]  # [T, hd/2]
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    half = head_dim // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def test_eagle3_layer_matches_the_reference_formula(target):
    """An independent re-statement of the reference layer: residual is the hidden branch, attention reads
    cat(input_layernorm(emb), hidden_norm(h)), logits are lm_head(norm(h)), the returned hidden is pre-norm."""
    head = random_eagle3(target)
    eps = head.config.rms_norm_eps
    length = 6
    features, ids = torch.randn(1, length, 3 * HIDDEN), torch.randint(0, VOCAB, (1, length))
    layer = head.midlayer
    with torch.no_grad():
        out = head(features, ids)
        h = features[0] @ head.fc.weight.T
        emb = target.get_input_embeddings()(ids)[0]
        x = torch.cat((rms(emb, layer.input_layernorm.weight, eps), rms(h, layer.hidden_norm.weight, eps)), -1)
        att = layer.self_attn
        positions = torch.arange(length)
        q = (x @ att.q_proj.weight.T).view(length, HEADS, HEAD_DIM).transpose(0, 1)
        k = (x @ att.k_proj.weight.T).view(length, KV_HEADS, HEAD_DIM).transpose(0, 1)
        v = (x @ att.v_proj.weight.T).view(length, KV_HEADS, HEAD_DIM).transpose(0, 1)
        q, k = rotate(q, positions, 10000.0, HEAD_DIM), rotate(k, positions, 10000.0, HEAD_DIM)
        k, v = k.repeat_interleave(HEADS // KV_HEADS, 0), v.repeat_interleave(HEADS // KV_HEADS, 0)
        scores = q @ k.transpose(1, 2) / math.sqrt(HEAD_DIM)
        scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
        attn = (scores.softmax(-1) @ v).transpose(0, 1).reshape(length, HIDDEN) @ att.o_proj.weight.T
        h = h + attn
        mlp = layer.mlp
        post = rms(h, layer.post_attention_layernorm.weight, eps)
        h = h + (F.silu(post @ mlp.gate_proj.weight.T) * (post @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
        logits = rms(h, head.norm.weight, eps) @ head.lm_head.weight.T
    assert torch.allclose(out.hidden[0], h, atol=1e-4)
    assert torch.allclose(out.logits[0], logits, atol=1e-4)


def test_cache_tree_mask_and_positions_reproduce_the_plain_forward(target):
    """Chunked forwards over the head cache, and a branch drafted under a tree mask, equal one causal pass."""
    head = random_eagle3(target)
    features, ids = torch.randn(1, 7, 3 * HIDDEN), torch.randint(0, VOCAB, (1, 7))
    with torch.no_grad():
        full = head(features, ids)
        cache = head.new_cache()
        first = head(features[:, :4], ids[:, :4], cache=cache)
        rest = head(features[:, 4:], ids[:, 4:], cache=cache)
        assert len(cache) == 7
        assert torch.allclose(torch.cat((first.hidden, rest.hidden), 1), full.hidden, atol=1e-5)
        # Two sibling branches at position 4 after a 4-long prefix: each must equal the causal continuation.
        cache.crop(4)
        hidden_in = torch.cat((features[:, 4:5], features[:, 4:5]), 1)
        branch_ids = torch.tensor([[ids[0, 4].item(), (ids[0, 4].item() + 1) % VOCAB]])
        mask = torch.zeros(1, 1, 2, 6)
        mask[0, 0, 0, 5] = mask[0, 0, 1, 4] = torch.finfo(torch.float32).min
        tree = head(hidden_in, branch_ids, torch.tensor([[4, 4]]), mask, cache)
        assert torch.allclose(tree.hidden[0, 0], full.hidden[0, 4], atol=1e-5)
        alt = head(features[:, :5], torch.cat((ids[:, :4], branch_ids[:, 1:]), 1))
        assert torch.allclose(tree.hidden[0, 1], alt.hidden[0, 4], atol=1e-5)


def test_unbound_head_explains_itself(target):
    head = Eagle3Head(random_eagle3(target).config)
    with pytest.raises(RuntimeError, match="bind_target"):
        head(torch.randn(1, 2, 3 * HIDDEN), torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="must be 192 .* or 64"):
        random_eagle3(target)(torch.randn(1, 2, 100), torch.tensor([[1, 2]]))


# ---- feature capture ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_eagle3_capture_equals_output_hidden_states(arch):
    model = tiny_model(arch, vocab=VOCAB, layers=LAYERS, hidden=HIDDEN)
    low, mid, high = eagle3_feature_layers(LAYERS)
    assert (low, mid, high) == (2, LAYERS // 2, LAYERS - 3)
    ids = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad(), FeatureCapture.for_eagle3(model) as capture:
        out = model(ids, output_hidden_states=True)
        features = capture.pop()
    states = out.hidden_states
    assert features.shape == (1, 9, 3 * HIDDEN)
    assert torch.equal(features, torch.cat((states[low], states[mid], states[high]), dim=-1))
    assert capture.pop() is None and not capture.active
    assert all(not layer._forward_pre_hooks for layer in model.model.layers)


def test_capture_concatenates_chunked_forwards_over_a_cache(target):
    from transformers import DynamicCache

    ids = torch.randint(0, VOCAB, (1, 10))
    capture = FeatureCapture.for_eagle3(target).attach()
    with torch.no_grad():
        reference = target(ids, output_hidden_states=True).hidden_states
        capture.clear()
        cache = DynamicCache(config=target.config)
        target(ids[:, :6], cache=cache, use_cache=True, logits_to_keep=1)
        target(ids[:, 6:], cache=cache, use_cache=True)
    capture.detach()
    expected = torch.cat([reference[i] for i in eagle3_feature_layers(LAYERS)], dim=-1)
    assert torch.allclose(capture.pop(), expected, atol=1e-5)


def test_final_hidden_capture_is_the_post_norm_state(target):
    ids = torch.randint(0, VOCAB, (1, 7))
    with torch.no_grad(), FeatureCapture.for_final_hidden(target) as capture:
        target(ids, logits_to_keep=1)  # the lm_head sees one position, the capture still gets all
        features = capture.pop()
        expected = target.model(ids).last_hidden_state
    assert torch.equal(features, expected)
