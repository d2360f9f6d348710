"""kv_cache.GrowingCache: appends in place (no copy of the cache per forward) and behaves as a DynamicCache."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from hsd_rag.attention_layout import FULL, AttentionLayout
from hsd_rag.kv_cache import MIN_SPARE_ROWS, GrowingCache, GrowingLayer
from tests.tiny_models import tiny_model


def _kv(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 2, rows, 8, generator=g), torch.randn(1, 2, rows, 8, generator=g)


def test_appends_write_into_one_buffer_and_match_concatenation():
    growing, dynamic = GrowingCache(), DynamicCache()
    for step, rows in enumerate([5, 1, 3, 1, 7]):
        k, v = _kv(rows, step)
        gk, gv = growing.update(k, v, 0)
        dk, dv = dynamic.update(k, v, 0)
        assert torch.equal(gk, dk) and torch.equal(gv, dv)
        if step == 0:
            buffer = growing.layers[0]._key_buffer.data_ptr()
    assert isinstance(growing.layers[0], GrowingLayer)
    assert growing.layers[0]._key_buffer.data_ptr() == buffer  # 17 rows fit the first allocation: no copy
    assert growing.get_seq_length() == 17


def test_rollback_to_an_accepted_path_then_append_matches_dynamic_cache():
    layout = AttentionLayout((FULL,))
    caches = [GrowingCache(), DynamicCache()]
    for cache in caches:
        cache.update(*_kv(10, 0), 0)
        cache.update(*_kv(6, 1), 0)  # a 6-node tree
        layout.keep_accepted(cache, 6, [0, 2, 5])  # non-contiguous accepted path
        cache.update(*_kv(4, 2), 0)
    (gk, gv), (dk, dv) = [(c.layers[0].keys, c.layers[0].values) for c in caches]
    assert gk.shape[-2] == 17 and torch.equal(gk, dk) and torch.equal(gv, dv)


def test_a_foreign_tensor_or_overflow_gets_a_fresh_buffer():
    cache = GrowingCache()
    cache.update(*_kv(4, 0), 0)
    layer = cache.layers[0]
    first = layer._key_buffer.data_ptr()
    layer.keys, layer.values = layer.keys[..., 2:, :].clone(), layer.values[..., 2:, :].clone()  # trimmed front
    k, v = _kv(1, 1)
    keys, _ = cache.update(k, v, 0)
    assert keys.shape[-2] == 3 and torch.equal(keys[..., -1:, :], k)
    assert layer._key_buffer.data_ptr() != first
    big = _kv(MIN_SPARE_ROWS * 3, 2)
    keys, values = cache.update(*big, 0)
    assert keys.shape[-2] == 3 + MIN_SPARE_ROWS * 3 and torch.equal(values[..., 3:, :], big[1])


def test_model_forwards_through_growing_and_dynamic_caches_agree():
    model = tiny_model("llama")
    ids = torch.arange(2, 40)[None]
    with torch.inference_mode():
        outs = []
        for cache in (GrowingCache(), DynamicCache()):
            model(input_ids=ids[:, :30], past_key_values=cache, use_cache=True)
            outs.append(model(input_ids=ids[:, 30:], past_key_values=cache, use_cache=True).logits)
    assert torch.equal(outs[0], outs[1])
