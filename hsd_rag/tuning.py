"""`hsd-rag tune`: measure what a step costs on this device — verification vs tree size, and drafting per source.

`budget="auto"` sizes every tree by expected tokens per unit of time (hsd_rag.budget), and the hybrid drafter asks
a costly source (an EAGLE head) for drafts only when they are expected to pay (hsd_rag.drafters.hybrid); both need
these costs in one unit, a one-token target forward. The profile is cached per (model, device, dtype, threads) in
the user cache dir; without one the decoder uses the device type's default profile.
"""

from __future__ import annotations

import hashlib
import statistics
import time
from pathlib import Path

import torch

from hsd_rag.budget import CostProfile
from hsd_rag.drafters.base import DraftContext
from hsd_rag.kernels import fast_kernel_names
from hsd_rag.kernels.int8_linear import int8_linear_count
from hsd_rag.paths import cache_dir
from hsd_rag.tree import SOURCE_NGRAM, TokenTree
from hsd_rag.verify import forward_tree, prefill

DEFAULT_SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)
DEFAULT_CONTEXT = 512  # a typical RAG prompt: a question plus a few retrieved passages
DEFAULT_REPEATS = 9
DRAFT_DEPTHS = (1, 6)  # head levels timed to split the EAGLE cost into a fixed part and a per-level part
# Accepted pairs the head catches up on before drafting (a step's accepted tokens, about τ): part of the fixed
# cost of asking it, measured with this many.
CATCH_UP_PAIRS = 4


def _threads(device_type: str) -> int:
    return torch.get_num_threads() if device_type == "cpu" else 0


def profile_key(decoder) -> str:
    model = decoder.model
    name = getattr(model.config, "name_or_path", "") or type(model).__name__
    raw = (
        f"{name}|{model.config.hidden_size}|{model.config.num_hidden_layers}|{model.device.type}|{model.dtype}"
        f"|threads={_threads(model.device.type)}"
    )
    kernels = fast_kernel_names(model)
    if kernels:  # fast kernels change the forward's cost curve (hsd_rag.kernels)
        raw += f"|kernels={'+'.join(kernels)}"
    head = getattr(decoder, "head", None)
    if head is not None and int8_linear_count(head):  # an int8 head drafts at another cost
        raw += "|head=int8"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def profile_path(decoder) -> Path:
    return cache_dir() / "profiles" / f"{profile_key(decoder)}.json"


def cost_profile(decoder) -> CostProfile:
    """The tuned profile for this model, device and thread count if `hsd-rag tune` ran, else the default."""
    key = profile_key(decoder)
    cached = getattr(decoder, "_cost_profile", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    path = profile_path(decoder)
    profile = CostProfile.load(path) if path.exists() else CostProfile.default_for(decoder.model.device.type)
    decoder._cost_profile = (key, profile)
    return profile


def _chain(root: int, n: int) -> TokenTree:
    tree = TokenTree.root(root)
    tree.add_path([root] * (n - 1), [1.0] * (n - 1), SOURCE_NGRAM)
    return tree


def _wait(model) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


def _time_forward(decoder, cache, root: int, n: int, context: int) -> float:
    """Seconds of one target forward over an n-token tree on top of `context` cached tokens (then rolled back)."""
    model = decoder.model
    tree = _chain(root, n)
    _wait(model)
    start = time.perf_counter()
    forward_tree(model, cache, tree, context, decoder._cache_arg, decoder.layout)
    _wait(model)
    elapsed = time.perf_counter() - start
    cache.crop(-n)
    return elapsed


def _between_steps(decoder, cache, prompt: list[int]) -> None:
    """A target forward of a small tree, untimed: in decoding the head drafts right after one, which has streamed
    the target's weights through the caches and evicted the head's (timed back to back, the head ran from warm
    caches and its asks measured ~half of what they cost in a decode loop on a 2-core EPYC)."""
    _time_forward(decoder, cache, prompt[-1], CATCH_UP_PAIRS, len(prompt) - 1)  # waits for the device itself


def _time_eagle(decoder, prompt: list[int], repeats: int) -> dict[str, float] | None:
    """Seconds of EAGLE drafting at DRAFT_DEPTHS levels (budget 64, no early exit) after a real prefill, and of
    catching up on CATCH_UP_PAIRS accepted pairs ("catch_up")."""
    if decoder.head is None:
        return None
    from hsd_rag.drafters.eagle import EagleDrafter

    model = decoder.model
    drafter = EagleDrafter(model, decoder.head, depth=max(DRAFT_DEPTHS), early_exit=False)
    cache = decoder._new_cache()
    try:
        drafter.start(prompt, [])
        prefill(model, cache, prompt[:-1], decoder._cache_arg)
        context = DraftContext(list(prompt), len(prompt), 64)
        drafter.propose(context)  # runs the head over the prompt's pairs once; later calls reuse them
        drafter.capture.detach()  # the target forwards below are not the head's to read
        samples: dict[int, list[float]] = {d: [] for d in DRAFT_DEPTHS}
        catch_up: list[float] = []
        for _ in range(repeats):
            for depth in DRAFT_DEPTHS:
                drafter.depth = depth
                _between_steps(decoder, cache, prompt)
                start = time.perf_counter()
                drafter.propose(context)
                _wait(model)
                samples[depth].append(time.perf_counter() - start)
        for _ in range(repeats):  # after the drafts: the head's cache grows by a few pairs each time, as in decoding
            features = torch.randn(CATCH_UP_PAIRS, decoder.head.feature_size, device=decoder.head.device)
            _between_steps(decoder, cache, prompt)
            start = time.perf_counter()
            drafter.catch_up(features, prompt[:CATCH_UP_PAIRS])
            _wait(model)
            catch_up.append(time.perf_counter() - start)
    finally:
        drafter.close()
    times = {d: statistics.median(s) for d, s in samples.items()}
    times["catch_up"] = statistics.median(catch_up)
    return times


def measure_profile(
    decoder, sizes=DEFAULT_SIZES, context: int = DEFAULT_CONTEXT, repeats: int = DEFAULT_REPEATS
) -> CostProfile:
    """Median forward time of trees of each size on top of a `context`-token cache, relative to size 1, and
    the EAGLE head's drafting cost (fixed + per level) in the same unit when the decoder has a head."""
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
        for n in sizes:  # warm-up: the first forward of each shape pays one-off costs (allocations, kernels)
            _time_forward(decoder, cache, prompt[-1], n, context)
        # rounds over all sizes, not one size at a time: a burst of load from another process then shifts
        # every size a little instead of one size a lot
        for _ in range(repeats):
            for n in sizes:
                samples[n].append(_time_forward(decoder, cache, prompt[-1], n, context))
        eagle = _time_eagle(decoder, prompt, repeats)
    times = {n: statistics.median(samples[n]) for n in sizes}
    base = times[sizes[0]]
    draft_costs = {}
    if eagle is not None:
        low, high = min(DRAFT_DEPTHS), max(DRAFT_DEPTHS)
        per_level = max(0.0, (eagle[high] - eagle[low]) / (high - low)) / base
        fixed = max(0.0, eagle[low] / base - per_level * low) + eagle["catch_up"] / base
        draft_costs["eagle"] = {"fixed": fixed, "per_level": per_level}
    return CostProfile(
        tokens=list(sizes),
        relative_cost=[times[n] / base for n in sizes],
        device=str(model.device),
        model=getattr(model.config, "name_or_path", "") or type(model).__name__,
        threads=_threads(model.device.type),
        draft_costs=draft_costs,
    )


def tune(decoder, **kwargs) -> tuple[CostProfile, Path]:
    """Measure, cache and install the profile on `decoder`; returns it and where it was saved."""
    profile = measure_profile(decoder, **kwargs)
    path = profile_path(decoder)
    profile.save(path)
    decoder._cost_profile = (profile_key(decoder), profile)
    return profile, path
