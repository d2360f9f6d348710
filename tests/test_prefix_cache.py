"""hsd_rag.prefix_cache: a shared prompt prefix is prefilled once, later requests copy its KV rows, and every
output stays what `generate` gives (the rows are the same up to float rounding)."""

from __future__ import annotations

import pytest
import torch

from hsd_rag import HybridSpecDecoder
from hsd_rag.attention_layout import AttentionLayout
from hsd_rag.drafters.eagle import EagleDrafter
from hsd_rag.heads import Eagle3Head
from hsd_rag.prefix_cache import PrefixCache, shared_prefix_length
from hsd_rag.verify import cache_kwarg_name, prefill
from tests.tiny_models import IdTokenizer, tiny_model
from tests.tiny_sliding_models import sliding_model

SYSTEM = list(range(40, 72))  # a 32-token "system prompt" every request starts with
MAX_NEW = 24


def _prompt(tail: list[int]) -> list[int]:
    return [0, *SYSTEM, *tail]


def _generate(model, prompt):
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False)
    return out[0, len(prompt):].tolist()


def test_restored_rows_give_the_logits_of_a_full_prefill():
    model = tiny_model("llama")
    layout = AttentionLayout.of(model)
    first, second = _prompt([5, 6, 7, 8]), _prompt([9, 10, 11, 12, 13])
    store = PrefixCache()
    with torch.inference_mode():
        cache = layout.new_cache()
        prefill(model, cache, first, cache_kwarg_name(model))
        store.store(first, cache)
        reused = layout.new_cache()
        n = store.restore(second, reused)
        assert n == shared_prefix_length(first, second) == len(SYSTEM) + 1
        cache_arg = cache_kwarg_name(model)
        logits = model(input_ids=torch.tensor([second[n:]]), use_cache=True, **{cache_arg: reused}).logits[0, -1]
        reference = model(input_ids=torch.tensor([second])).logits[0, -1]
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)
    assert store.hits == 1 and store.reused_tokens == n


def test_short_prefixes_eviction_and_redundant_entries():
    model = tiny_model("llama")
    layout = AttentionLayout.of(model)

    def filled(tokens):
        cache = layout.new_cache()
        with torch.inference_mode():
            prefill(model, cache, tokens, cache_kwarg_name(model))
        return cache

    store = PrefixCache(max_entries=2, min_reuse=8)
    short = list(range(5))
    store.store(short, filled(short))
    assert len(store) == 0  # shorter than min_reuse: never worth keeping
    a, b, c = _prompt([1]), _prompt([2]), [3] * 20
    store.store(a, filled(a))
    store.store(a + [4, 5], filled(a + [4, 5]))  # covers `a`: the old entry goes
    assert len(store) == 1
    store.store(b, filled(b))
    store.store(c, filled(c))  # over max_entries: the least recently used (a + [4, 5]) goes
    assert len(store) == 2
    with torch.inference_mode():
        assert store.restore(a + [4, 5, 6], layout.new_cache()) == len(SYSTEM) + 1  # only b's shared part left
        assert store.restore([7] * 30, layout.new_cache()) == 0
    tiny = PrefixCache(max_bytes=1)
    tiny.store(a, filled(a))
    assert len(tiny) == 0 and tiny.nbytes == 0
    with pytest.raises(ValueError):
        PrefixCache(min_reuse=0)


@pytest.mark.parametrize("method", ["vanilla", "ngram"])
def test_decoder_reuses_a_shared_prefix_and_stays_lossless(method):
    model = tiny_model("llama", seed=3)
    decoder = HybridSpecDecoder(model, IdTokenizer())
    for i, tail in enumerate([[5, 6, 7, 8, 9], [20, 21, 22, 5, 6, 7], [20, 21, 22, 5, 6, 7]]):
        prompt = _prompt(tail)
        result = decoder.generate(prompt, method=method, max_new_tokens=MAX_NEW, answer_history=False)
        assert result.token_ids == _generate(model, prompt)
        expected = [0, len(SYSTEM) + 1, len(prompt) - 1][i]  # the repeated prompt reuses all but its last token
        assert result.stats.cached_prompt_tokens == expected
    off = HybridSpecDecoder(model, IdTokenizer(), prefix_cache=False)
    for _ in range(2):
        assert off.generate(prompt, method=method, max_new_tokens=4).stats.cached_prompt_tokens == 0


@pytest.mark.parametrize("window", [None, 8, 64])
def test_eagle_reads_only_the_prefilled_prompt_pairs_and_stays_lossless(window):
    model = tiny_model("llama", seed=5, layers=8)
    torch.manual_seed(0)
    decoder = HybridSpecDecoder(model, IdTokenizer(), head=Eagle3Head.from_target(model))
    decoder.drafter_factories = {
        **decoder.drafter_factories,
        "eagle": lambda d, cfg: EagleDrafter(d.model, d.head, prompt_window=window),
    }
    cached = []
    for tail in ([5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]):
        prompt = _prompt(tail)
        for method in ("eagle", "hybrid"):  # the second method finds the whole prompt stored by the first
            result = decoder.generate(prompt, method=method, budget=8, max_new_tokens=MAX_NEW, answer_history=False)
            assert result.token_ids == _generate(model, prompt)
            assert method != "eagle" or result.stats.drafted_by_source.get("eagle", 0) > 0
            cached.append(result.stats.cached_prompt_tokens)
    assert cached == [0, len(_prompt([5, 6, 7, 8, 9, 10])) - 1, len(SYSTEM) + 1, len(_prompt([11] * 10)) - 1]


def test_sliding_window_models_do_not_reuse():
    model = sliding_model("mistral", window=8)
    decoder = HybridSpecDecoder(model, IdTokenizer())
    prompt = _prompt([5, 6, 7])
    for _ in range(2):
        result = decoder.generate(prompt, method="ngram", max_new_tokens=8)
        assert result.stats.cached_prompt_tokens == 0
        assert result.token_ids == _generate(model, prompt)[:8]


def test_bench_variants_never_reuse_each_others_rows(monkeypatch):
    from hsd_rag.bench.runner import BenchCase, run_benchmark

    model = tiny_model("llama", seed=3)
    decoder = HybridSpecDecoder(model, IdTokenizer())
    restored = []
    real = PrefixCache.restore

    def spy(self, token_ids, cache, *args):
        restored.append(real(self, token_ids, cache, *args))
        return restored[-1]

    monkeypatch.setattr(PrefixCache, "restore", spy)
    cases = [BenchCase("a", "tiny", _prompt([5, 6, 7])), BenchCase("b", "tiny", _prompt([8, 9]))]
    run_benchmark(decoder, cases, ["vanilla", "ngram"], [4], 8, progress=False)
    # warm-up (2 variants) and the first prompt (2 variants) find nothing; the second prompt shares the system part
    assert restored == [0, 0, 0, 0, len(SYSTEM) + 1, len(SYSTEM) + 1]


def test_a_noprefix_variant_runs_without_the_cache(monkeypatch):
    from hsd_rag.bench.runner import BenchCase, run_benchmark

    model = tiny_model("llama", seed=3)
    decoder = HybridSpecDecoder(model, IdTokenizer())
    restored = []
    real = PrefixCache.restore
    monkeypatch.setattr(PrefixCache, "restore", lambda self, *a: restored.append(real(self, *a)) or restored[-1])
    cases = [BenchCase("a", "tiny", _prompt([5, 6, 7])), BenchCase("b", "tiny", _prompt([8, 9]))]
    records = run_benchmark(decoder, cases, ["vanilla", "vanilla/noprefix"], [4], 8, progress=False)
    # warm-ups of both variants (a throwaway cache each), then only the cached variant looks up its prompts
    assert restored == [0, 0, 0, len(SYSTEM) + 1]
    assert all(r.matches_baseline for r in records if r.method != "hf")
    assert decoder.prefix_cache is not None  # the decoder's own cache is back after the run


def test_entries_are_dropped_when_the_weights_change():
    model = tiny_model("llama", seed=3)
    decoder = HybridSpecDecoder(model, IdTokenizer())
    first, second = _prompt([5, 6, 7]), _prompt([8, 9, 10])
    decoder.generate(first, method="vanilla", max_new_tokens=4)
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight.mul_(1.5)  # fine-tuned in place: stored rows are stale
    result = decoder.generate(second, method="vanilla", max_new_tokens=MAX_NEW)
    assert result.stats.cached_prompt_tokens == 0
    assert result.token_ids == _generate(model, second)
    assert decoder.generate(first, method="vanilla", max_new_tokens=4).stats.cached_prompt_tokens == len(SYSTEM) + 1
