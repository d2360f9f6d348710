"""`hsd-rag tune`: measure verification cost against tree size on this device, for budget="auto".

The profile is cached per (model, device, dtype) in the user cache dir; without one the decoder falls back to
a default profile for the device type (hsd_rag.budget).
"""

from __future__ import annotations

import hashlib
import statistics
import time
from pathlib import Path

import torch

from hsd_rag.budget import CostProfile
from hsd_rag.loading import cache_dir
from hsd_rag.tree import SOURCE_NGRAM, TokenTree
from hsd_rag.verify import forward_tree, prefill

DEFAULT_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)
DEFAULT_CONTEXT = 512  # a typical RAG prompt: a question plus a few retrieved passages
DEFAULT_REPEATS = 9


def profile_key(decoder) -> str:
    model = decoder.model
    name = getattr(model.config, "name_or_path", "") or type(model).__name__
    raw = f"{name}|{model.config.hidden_size}|{model.config.num_hidden_layers}|{model.device.type}|{model.dtype}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def profile_path(decoder) -> Path:
    return cache_dir() / "profiles" / f"{profile_key(decoder)}.json"


def cost_profile(decoder) -> CostProfile:
    """The tuned profile for this model and device if `hsd-rag tune` ran, else the device type's default."""
    cached = getattr(decoder, "_cost_profile", None)
    if cached is not None:
        return cached
    path = profile_path(decoder)
    profile = CostProfile.load(path) if path.exists() else CostProfile.default_for(decoder.model.device.type)
    decoder._cost_profile = profile
    return profile


def _chain(root: int, n: int) -> TokenTree:
    tree = TokenTree.root(root)
    tree.add_path([root] * (n - 1), [1.0] * (n - 1), SOURCE_NGRAM)
    return tree


def _time_forward(decoder, cache, root: int, n: int, context: int) -> float:
    """Seconds of one target forward over an n-token tree on top of `context` cached tokens (then rolled back)."""
    model = decoder.model
    tree = _chain(root, n)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    logits = forward_tree(model, cache, tree, context, decoder._cache_arg)
    logits[-1, 0].item()  # wait for the device
    elapsed = time.perf_counter() - start
    cache.crop(-n)
    return elapsed


def measure_profile(
    decoder, sizes=DEFAULT_SIZES, context: int = DEFAULT_CONTEXT, repeats: int = DEFAULT_REPEATS
) -> CostProfile:
    """Median forward time of trees of each size on top of a `context`-token cache, relative to size 1."""
    model = decoder.model
    vocab = model.config.vocab_size
    window = decoder.context_window or context + max(sizes) + 1
    context = min(context, window - max(sizes) - 1)
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (context,), generator=generator).tolist()
    samples: dict[int, list[float]] = {n: [] for n in sizes}
    with torch.inference_mode():
        cache = decoder._new_cache()
        prefill(model, cache, prompt, decoder._cache_arg)
        _time_forward(decoder, cache, prompt[-1], sizes[0], context)  # warm-up
        # rounds over all sizes, not one size at a time: a burst of load from another process then shifts
        # every size a little instead of one size a lot
        for _ in range(repeats):
            for n in sizes:
                samples[n].append(_time_forward(decoder, cache, prompt[-1], n, context))
    times = {n: statistics.median(samples[n]) for n in sizes}
    base = times[sizes[0]]
    return CostProfile(
        tokens=list(sizes),
        relative_cost=[times[n] / base for n in sizes],
        device=str(model.device),
        model=getattr(model.config, "name_or_path", "") or type(model).__name__,
    )


def tune(decoder, **kwargs) -> tuple[CostProfile, Path]:
    """Measure, cache and install the profile on `decoder`; returns it and where it was saved."""
    profile = measure_profile(decoder, **kwargs)
    path = profile_path(decoder)
    profile.save(path)
    decoder._cost_profile = profile
    return profile, path
