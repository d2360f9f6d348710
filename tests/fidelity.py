"""Exact target laws and goodness-of-fit p-values for the sampling-fidelity tests.

Why a module: the acceptance-rule tests, the decoder-level tests and the real-model test all compare sampled
token sequences with a law computed exactly from the target, and report their p-values the same way, so that
`scripts/mutants.py` and the three-seed runs can read them back (`[fidelity] <test> seed=<s> p=<p>`).

`HSD_RAG_TEST_SEED` (default 0) reseeds every sampling test: the suite must pass for any seed.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable

import torch
from scipy.stats import chisquare

from hsd_rag.sampling import logits_to_probs
from hsd_rag.tree import TokenTree

SEED = int(os.environ.get("HSD_RAG_TEST_SEED", "0"))
# Correct code fails a test with probability P_FLOOR per seed; the deliberate bugs of scripts/mutants.py give
# p-values below 1e-6, so this floor leaves a wide margin on both sides.
P_FLOOR = 1e-4
MIN_EXPECTED = 5.0  # chi-square needs expected counts of ~5 per cell: rarer cells are pooled into one


def step_law(tree: TokenTree, probs: torch.Tensor) -> dict[tuple[int, ...], float]:
    """Exact law of the tokens one verification step emits (accepted drafts, then the bonus token).

    The target alone would draw x ~ p(node) at the root, then at the child carrying x, and so on; the step
    ends with the first token that is not a drafted child. Lossless tree sampling must emit exactly this law.
    `probs` is [n, V]: the target's sampling distribution at every node.
    """
    table = probs.double().tolist()
    law: dict[tuple[int, ...], float] = {}

    def walk(node: int, prefix: tuple[int, ...], mass: float) -> None:
        for token, p in enumerate(table[node]):
            if p <= 0.0:
                continue
            child = tree.child(node, token)
            if child is None:
                law[prefix + (token,)] = mass * p
            else:
                walk(child, prefix + (token,), mass * p)

    walk(0, (), 1.0)
    return law


@torch.no_grad()
def sequence_law(model, prompt: list[int], length: int, temperature: float, top_k: int = 0,
                 top_p: float = 1.0) -> dict[tuple[int, ...], float]:
    """Exact law of the first `length` tokens the target samples after `prompt` (one batched forward per level).

    Tokens of probability zero (cut by top-k / top-p) are not expanded, so the work stays small."""
    law: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(length):
        prefixes = list(law)
        ids = torch.tensor([prompt + list(p) for p in prefixes], device=model.device)
        logits = model(ids).logits[:, -1]
        probs = logits_to_probs(logits, temperature, top_k, top_p).double().tolist()
        law = {
            prefix + (token,): law[prefix] * p
            for prefix, row in zip(prefixes, probs, strict=True)
            for token, p in enumerate(row)
            if p > 0.0
        }
    return law


def marginal(law_or_counts: dict, positions: slice) -> dict:
    """Sum a law (or counts) over sequences onto their tokens at `positions`, e.g. slice(0, 1) = first token."""
    out: dict = {}
    for seq, value in law_or_counts.items():
        key = seq[positions]
        out[key] = out.get(key, 0) + value
    return out


def chi_square_p(counts: dict, law: dict[tuple, float]) -> float:
    """Pearson chi-square p-value of observed `counts` against the exact `law` (small cells pooled).

    A sampled sequence outside the law's support (probability zero) makes the p-value 0."""
    if any(count and law.get(cell, 0.0) <= 0.0 for cell, count in counts.items()):
        return 0.0
    total = sum(counts.values())
    observed, expected, pool_obs, pool_exp = [], [], 0.0, 0.0
    for cell in sorted(law, key=law.get, reverse=True):
        exp = law[cell] * total
        if exp >= MIN_EXPECTED:
            observed.append(counts.get(cell, 0))
            expected.append(exp)
        else:
            pool_obs += counts.get(cell, 0)
            pool_exp += exp
    if pool_exp > 0:
        observed.append(pool_obs)
        expected.append(pool_exp)
    if len(observed) < 2:
        return 1.0  # a single cell: nothing to compare
    scale = sum(observed) / sum(expected)  # the law sums to 1 up to float round-off
    return float(chisquare(observed, [e * scale for e in expected]).pvalue)


def fidelity_p(samples: Iterable[tuple[int, ...]], law: dict[tuple[int, ...], float], lengths=(1, 2, 3)) -> float:
    """Bonferroni-combined p-value of the marginals of the first `lengths` tokens of `samples` against `law`.

    The 1-token marginal has few, well-filled cells (it catches a biased first token that a large joint table
    dilutes); the longer ones see the tokens decided after a rollback."""
    counts = Counter(tuple(s) for s in samples)
    p_values = [chi_square_p(marginal(counts, slice(0, n)), marginal(law, slice(0, n))) for n in lengths]
    return min(1.0, len(p_values) * min(p_values))


def report(name: str, p_value: float, **details) -> str:
    """The line `scripts/mutants.py` and the seed runs read back; also the assertion message."""
    extra = "".join(f" {key}={value}" for key, value in details.items())
    line = f"[fidelity] {name} seed={SEED} p={p_value:.3g}{extra}"
    print(line)
    return line
