"""Verification: one target forward over the whole tree, acceptance, and KV-cache rollback.

All correctness-critical rules live here:
- greedy: follow the target's argmax from the root while a draft child carries it (token-identical to plain
  greedy decoding);
- sampling: the multi-draft recursive rejection rule for deterministic drafts (SpecInfer, Miao et al. 2024,
  Alg. 2 with point-mass proposals; Leviathan et al. 2023 for one draft): at a node with target distribution p,
  try its children x_1..x_m in turn, accepting x_i with probability p(x_i) / (1 - sum_{j<i} p(x_j)); if all are
  rejected, draw the bonus token from p with the rejected children removed. The output token is then
  distributed exactly as p, whatever the drafts were. The bonus token always comes from the target.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from hsd_rag.attention_layout import FULL, AttentionLayout
from hsd_rag.sampling import logits_to_probs
from hsd_rag.tree import TokenTree


@dataclass
class Acceptance:
    """The accepted path of one step."""

    nodes: list[int]  # node ids root first; the root is always accepted
    bonus_token: int  # the target's own token after the last accepted node

    @property
    def num_accepted_drafts(self) -> int:
        return len(self.nodes) - 1


def cache_kwarg_name(model) -> str:
    """transformers >= 5.2x calls the cache argument `cache`; older 5.x releases call it `past_key_values`."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def forward_tree(
    model, cache, tree: TokenTree, past_length: int, cache_arg: str = "cache", layout: AttentionLayout | None = None
) -> torch.Tensor:
    """Run the target once over every node of `tree` on top of the cache; returns logits [n, V].

    `layout` (default: read from the model) gives each layer kind its mask, sliding windows included.
    """
    device = model.device
    dtype = model.dtype if model.dtype.is_floating_point else torch.float32
    layout = layout or AttentionLayout.of(model)
    outputs = model(
        input_ids=tree.input_ids(device),
        attention_mask=layout.tree_mask(tree, past_length, cache, dtype, device),
        position_ids=tree.position_ids(past_length, device),
        use_cache=True,
        **{cache_arg: cache},
    )
    return outputs.logits[0]


def prefill(model, cache, token_ids: list[int], cache_arg: str = "cache") -> None:
    """Fill the cache with `token_ids` (plain causal forward; logits are not needed)."""
    if not token_ids:
        return
    ids = torch.tensor([token_ids], dtype=torch.long, device=model.device)
    model(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_arg: cache})


def accept_greedy(tree: TokenTree, logits: torch.Tensor) -> Acceptance:
    """Longest root path whose every draft equals the target's argmax at its parent."""
    target = logits.argmax(dim=-1).tolist()  # the step's one host sync
    node, path = 0, [0]
    while (nxt := tree.child(node, target[node])) is not None:
        node = nxt
        path.append(node)
    return Acceptance(path, target[node])


def accept_sampling(
    tree: TokenTree,
    logits: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator | None,
    min_p: float = 0.0,
) -> Acceptance:
    """Lossless tree speculative sampling with deterministic drafts (see module docstring)."""
    probs = logits_to_probs(logits, temperature, top_k, top_p, min_p)  # [n, V]
    n = len(tree)
    if n > 1:
        parents = torch.tensor(tree.parents[1:], device=probs.device)
        tokens = torch.tensor(tree.tokens[1:], device=probs.device)
        p_child = probs[parents, tokens]  # [n-1] target prob of each draft at its parent
        uniforms = torch.rand(n - 1, generator=generator, device=probs.device)
        p_child, uniforms = torch.stack([p_child, uniforms]).tolist()  # one host sync
    node, path = 0, [0]
    while True:
        residual = 1.0
        rejected: list[int] = []
        accepted = None
        for child in tree.children(node):
            p = p_child[child - 1]
            if residual > 0 and uniforms[child - 1] * residual < p:
                accepted = child
                break
            residual -= p
            rejected.append(tree.tokens[child])
        if accepted is None:
            break
        node = accepted
        path.append(node)
    dist = probs[node]
    if rejected:
        residual_dist = dist.clone()
        residual_dist[rejected] = 0.0
        # float round-off can leave no mass when the drafts held (almost) all of it: fall back to p itself
        dist = torch.where(residual_dist.sum() > 0, residual_dist, dist)
    # Under a grammar a stop token's row allows nothing (NaN after softmax); the loop cuts the output at that
    # stop token, so its bonus is never used: draw it from anything rather than fail.
    dist = torch.where(dist.sum() > 0, dist, torch.ones_like(dist))
    bonus = torch.multinomial(dist, 1, generator=generator).item()
    return Acceptance(path, int(bonus))


def accept(tree: TokenTree, logits: torch.Tensor, config, generator: torch.Generator | None) -> Acceptance:
    """Greedy when `config.greedy`, else lossless tree speculative sampling with the config's warpers."""
    if config.greedy:
        return accept_greedy(tree, logits)
    return accept_sampling(
        tree, logits, config.temperature, config.top_k, config.top_p, generator, min_p=config.min_p or 0.0
    )


def keep_accepted(cache, past_length: int, accepted_nodes: list[int]) -> None:
    """Roll a full-history cache back to `past_length` plus the accepted path's rows, in path order.

    The tree forward appended one row per node; the accepted nodes are moved to the front of that block (in
    place, only the accepted rows are copied) and the rest is cropped. The decode loop calls
    `AttentionLayout.keep_accepted`, which also handles sliding-window layers holding fewer rows.
    """
    tree_size = cache.get_seq_length() - past_length
    AttentionLayout((FULL,) * len(cache.layers)).keep_accepted(cache, tree_size, accepted_nodes)
