"""The verification forward and the cache rollback, checked number by number against plain causal decoding.

Greedy equality can hide a small error: a tiny random model's argmax rarely flips when, say, a tree node's
position is off by one (scripts/mutants.py found such a bug surviving every greedy test but one). So here the
numbers themselves are compared: every tree node's logits equal those of a plain forward over the prompt and the
node's path, and after the rollback the KV cache equals a plain prefill of the accepted tokens.
"""

from __future__ import annotations

import random

import pytest
import torch

from hsd_rag.tree import SOURCE_NGRAM, TokenTree
from hsd_rag.verify import cache_kwarg_name, forward_tree, keep_accepted, prefill
from tests.tiny_models import TINY_VOCAB, tiny_model

ARCHS = ["llama", "qwen2", "mistral"]
PROMPT = list(range(2, 20))
NODES = 24  # drafts in the random tree: siblings at every level and chains several deep


def random_tree(root: int, seed: int) -> TokenTree:
    """Each new node hangs under a uniformly chosen earlier node: wide and deep at once."""
    rng = random.Random(seed)
    tree = TokenTree.root(root)
    while tree.num_drafts < NODES:
        tree.add(rng.randrange(len(tree)), rng.randrange(TINY_VOCAB), rng.random(), SOURCE_NGRAM)
    return tree


def deepest_skipping_path(tree: TokenTree) -> list[int]:
    """The longest root-to-leaf path whose node ids are not 0..k: keeping it moves cache rows."""
    paths = [p for p in tree.paths() if p != list(range(len(p)))]
    return max(paths, key=len)


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    return tiny_model(request.param, seed=4)


def new_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


@torch.no_grad()
def test_tree_logits_equal_sequential_logits(model):
    arg = cache_kwarg_name(model)
    for seed in range(3):
        cache = new_cache(model)
        prefill(model, cache, PROMPT[:-1], arg)
        tree = random_tree(PROMPT[-1], seed)
        logits = forward_tree(model, cache, tree, len(PROMPT) - 1, arg)
        assert max(tree.depths) >= 3 and len(tree.children(0)) >= 2
        for node in range(len(tree)):
            path = [tree.tokens[n] for n in tree.path_to(node)[1:]]
            expected = model(torch.tensor([PROMPT + path])).logits[0, -1]
            torch.testing.assert_close(logits[node], expected, atol=1e-4, rtol=1e-4, msg=f"node {node}")


@torch.no_grad()
def test_rollback_keeps_exactly_the_accepted_rows(model):
    arg = cache_kwarg_name(model)
    for seed in range(3):
        cache = new_cache(model)
        past = len(PROMPT) - 1
        prefill(model, cache, PROMPT[:-1], arg)
        tree = random_tree(PROMPT[-1], seed)
        forward_tree(model, cache, tree, past, arg)
        path = deepest_skipping_path(tree)
        keep_accepted(cache, past, path)
        reference = new_cache(model)
        prefill(model, reference, PROMPT + [tree.tokens[n] for n in path[1:]], arg)
        assert cache.get_seq_length() == reference.get_seq_length() == past + len(path)
        for got, want in zip(cache.layers, reference.layers, strict=True):
            torch.testing.assert_close(got.keys, want.keys, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(got.values, want.values, atol=1e-5, rtol=1e-4)
