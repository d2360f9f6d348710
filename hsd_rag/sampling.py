"""Logits -> next-token probabilities, applied exactly as HF `generate` applies its warpers.

Order and tie rules follow transformers' `TemperatureLogitsWarper` -> `TopKLogitsWarper` -> `TopPLogitsWarper` ->
`MinPLogitsWarper` (top-k keeps every token tied with the k-th logit; top-p drops the low tail whose cumulative
mass is at most 1 - top_p; min-p drops tokens less likely than min_p times the most likely one; top-p and min-p
always keep the most likely token), so a sampled speculative decode draws from the very distribution a plain
`generate(do_sample=True)` would.
"""

from __future__ import annotations

import torch


def warp_logits(
    logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0
) -> torch.Tensor:
    """[..., V] logits -> warped logits (filtered entries set to -inf). Requires temperature > 0."""
    scores = logits.float() / temperature
    flat = scores.reshape(-1, scores.shape[-1])
    if top_k and top_k > 0:
        k = min(top_k, flat.shape[-1])
        kth = torch.topk(flat, k, dim=-1).values[..., -1:]
        flat = flat.masked_fill(flat < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(flat, descending=False, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - top_p)
        remove_sorted[..., -1:] = False
        remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
        flat = flat.masked_fill(remove, float("-inf"))
    if min_p and min_p > 0:
        probs = flat.softmax(dim=-1)
        remove = probs < min_p * probs.amax(dim=-1, keepdim=True)
        remove.scatter_(-1, probs.argmax(dim=-1, keepdim=True), False)
        flat = flat.masked_fill(remove, float("-inf"))
    return flat.reshape(scores.shape)


def logits_to_probs(
    logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0
) -> torch.Tensor:
    """[..., V] logits -> [..., V] float32 probabilities of the sampling distribution."""
    return warp_logits(logits, temperature, top_k, top_p, min_p).softmax(dim=-1)
