"""Sliding-window and interleaved sliding/global attention are lossless in every method.

Windows are far shorter than prompt + output, so every step's tree straddles the window edge; random draft
trees deeper than the window check that each node's mask row applies the window at the node's own depth.
"""

from __future__ import annotations

import pytest
import torch

from hsd_rag import HybridSpecDecoder
from hsd_rag.heads import Eagle3Head
from tests.fake_drafters import RandomTreeDrafter
from tests.fidelity import chi_square_p
from tests.tiny_models import IdTokenizer
from tests.tiny_sliding_models import SLIDING_ARCHS, sliding_model

WINDOW = 6
FULL, SLIDING = "full_attention", "sliding_attention"  # HF's layer type names
PROMPT = [0, 30, 31, 32, 33, 34, 35, 36, 37, 38]  # 10 tokens: longer than the window already
MAX_NEW = 40
METHODS = ["vanilla", "ngram", "eagle", "hybrid", "hybrid-fixed"]


def hf_greedy(model, prompt, max_new):
    out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new, min_new_tokens=0)
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module", params=SLIDING_ARCHS)
def decoder(request):
    model = sliding_model(request.param, WINDOW, seed=4)
    torch.manual_seed(0)
    return HybridSpecDecoder(model, IdTokenizer(), head=Eagle3Head.from_target(model))


@pytest.fixture(scope="module")
def expected(decoder):
    return hf_greedy(decoder.model, PROMPT, MAX_NEW)


def test_layouts_are_read_from_the_configs(decoder):
    layout = decoder.layout
    assert layout.sliding_window == WINDOW
    kinds = {
        "MistralForCausalLM": (SLIDING,) * 4,
        "Gemma2ForCausalLM": (SLIDING, FULL, SLIDING, FULL),
        "Qwen2ForCausalLM": (FULL, FULL, SLIDING, SLIDING),
    }[type(decoder.model).__name__]
    assert layout.layer_types == kinds


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("budget", [1, 4, 16])
def test_greedy_equals_generate(decoder, expected, method, budget):
    # a document holding the answer makes n-gram drafts run many tokens deep (well past the window)
    document = " ".join(map(str, PROMPT[-3:] + expected[:30]))
    res = decoder.generate(PROMPT, documents=[document], method=method, budget=budget, max_new_tokens=MAX_NEW)
    assert res.token_ids == expected, (method, budget)
    if method in ("ngram", "hybrid") and budget > 1:
        assert res.stats.tau > 1.5  # deep drafts were accepted and rolled back across the window edge


@pytest.mark.parametrize("seed", [0, 1])
def test_random_trees_deeper_than_the_window(decoder, expected, seed):
    drafter = RandomTreeDrafter(96, seed=seed, oracle=PROMPT + expected, width=3, depth=2 * WINDOW)
    dec = HybridSpecDecoder(decoder.model, IdTokenizer())
    dec.drafter_factories = {"ngram": lambda d, cfg: drafter}
    res = dec.generate(PROMPT, method="ngram", budget=40, max_new_tokens=MAX_NEW)
    assert res.token_ids == expected


@pytest.mark.parametrize("method", ["vanilla", "ngram"])
def test_gemma3_local_global_pattern(method):
    model = sliding_model("gemma3", WINDOW, seed=2)
    expected = hf_greedy(model, PROMPT, MAX_NEW)
    dec = HybridSpecDecoder(model, IdTokenizer())
    if method == "ngram":  # random trees deeper than the window, with the true path planted
        dec.drafter_factories = {"ngram": lambda d, cfg: RandomTreeDrafter(96, seed=5, oracle=PROMPT + expected,
                                                                           depth=2 * WINDOW)}
    assert dec.generate(PROMPT, method=method, budget=24, max_new_tokens=MAX_NEW).token_ids == expected


def test_sliding_layers_keep_only_the_window(decoder, expected):
    """The cache of a sliding layer never grows past window - 1 rows between steps (HF's own cache size)."""
    from hsd_rag.attention_layout import AttentionLayout

    sizes: dict[str, int] = {}

    class Recording(AttentionLayout):
        def keep_accepted(self, cache, tree_size, accepted_nodes):
            super().keep_accepted(cache, tree_size, accepted_nodes)
            for kind, layer in zip(self.layer_types, cache.layers, strict=True):
                sizes[kind] = max(sizes.get(kind, 0), layer.keys.shape[-2])

    dec = HybridSpecDecoder(decoder.model, IdTokenizer())
    dec.layout = Recording(decoder.layout.layer_types, decoder.layout.sliding_window)
    document = " ".join(map(str, PROMPT[-3:] + expected))
    assert dec.generate(PROMPT, documents=[document], budget=16, max_new_tokens=MAX_NEW).token_ids == expected
    assert sizes[SLIDING] == WINDOW - 1
    if FULL in sizes:
        assert sizes[FULL] == len(PROMPT) + MAX_NEW - 1


def test_unsupported_attention_kinds_are_refused():
    from transformers import LlamaConfig

    from hsd_rag.attention_layout import AttentionLayout, UnsupportedAttentionError

    config = LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4)
    config.layer_types = ["full_attention", "linear_attention"]

    class Model:
        pass

    model = Model()
    model.config = config
    with pytest.raises(UnsupportedAttentionError, match="linear_attention"):
        AttentionLayout.of(model)


# ---- sampling: the same distribution as the target, with a window shorter than prompt + output ----------------

VOCAB = 8
SAMPLE_PROMPT = [0, 3, 5, 2, 6, 4]
SAMPLE_WINDOW = 3
SAMPLES = 800
P_FLOOR = 1e-3
SAMPLING = dict(temperature=0.8, top_k=0, top_p=0.95)


def _probs(model, ids):
    from hsd_rag.sampling import logits_to_probs

    return logits_to_probs(model(torch.tensor([ids])).logits[0, -1], **SAMPLING)


def test_sampling_matches_the_target_distribution():
    model = sliding_model("gemma2", SAMPLE_WINDOW, vocab=VOCAB, hidden=32, seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(0.6)  # spread enough that many cells get samples
        p1 = _probs(model, SAMPLE_PROMPT)
        joint = {(a, b): float(p1[a] * _probs(model, SAMPLE_PROMPT + [a])[b]) for a in range(VOCAB) for b in range(VOCAB)}
    torch.manual_seed(0)
    dec = HybridSpecDecoder(model, IdTokenizer(), head=Eagle3Head.from_target(model))
    dec.eos_token_ids = set()
    documents = [" ".join(map(str, SAMPLE_PROMPT + [1, 7] + SAMPLE_PROMPT[-3:] + [2, 2]))]
    counts: dict[tuple[int, int], int] = {}
    drafted = 0
    for seed in range(SAMPLES):
        res = dec.generate(SAMPLE_PROMPT, documents=documents, method="hybrid", budget=8, max_new_tokens=3, seed=seed,
                           **SAMPLING)
        counts[tuple(res.token_ids[:2])] = counts.get(tuple(res.token_ids[:2]), 0) + 1
        drafted += res.stats.tree_nodes
    assert drafted > SAMPLES  # drafts were verified, so acceptance was exercised
    p_value = chi_square_p(counts, joint)
    assert p_value > P_FLOOR, f"sampled distribution differs from the target's (p={p_value:.2e})"
