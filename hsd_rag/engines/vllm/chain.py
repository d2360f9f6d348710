"""From our scored draft tree to the chain vLLM verifies, and how much of each chain one engine step verifies.

vLLM's custom proposers hand back one chain per request: its rejection sampler verifies chains, not trees. A
node's score estimates P(node accepted) (calibrated online, monotone along paths), so by linearity of
expectation a chain's expected accepted length is the sum of its scores; `best_chain` returns the root path
with the largest sum.

One forward verifies the whole batch, so lengths are chosen for the batch at once (as suffix decoding sizes
drafts by match strength, here by calibrated score and by what the engine pays per verified token). With R
requests in the step, each yielding its bonus token, and the verification cost c(n) of n tokens, keeping the
drafts D maximises the expected tokens per unit of time

    (R + Σ_{d∈D} s_d) / c(R + |D|).

Scores fall along every chain, so taking drafts from the pooled scores in decreasing order keeps each chain a
prefix (ties go to the shallower draft). At one request and a flat cost curve long chains pay; with many
requests in the batch a draft must be likelier to be accepted to be worth its slot.
"""

from __future__ import annotations

from collections.abc import Sequence

from hsd_rag.budget import CostProfile
from hsd_rag.tree import TokenTree


def best_chain(tree: TokenTree, max_length: int) -> tuple[list[int], list[float]]:
    """Tokens and scores of the root path (at most `max_length` drafts) with the largest expected accepted
    length (sum of effective scores); ([], []) when the tree holds no drafts."""
    if max_length <= 0 or tree.num_drafts == 0:
        return [], []
    scores = tree.effective_scores()
    depth = tree.depths
    n = len(tree)
    gain = [0.0] * n  # best sum of scores strictly below each node, along one path within max_length
    pick = [-1] * n  # the child that achieves it
    for node in range(n - 1, 0, -1):  # children have larger ids than their parents: bottom-up
        if depth[node] > max_length:
            continue
        total = scores[node] + gain[node]
        parent = tree.parents[node]
        if total > gain[parent]:
            gain[parent], pick[parent] = total, node
    tokens, chain_scores = [], []
    node = pick[0]
    while node >= 0:
        tokens.append(tree.tokens[node])
        chain_scores.append(scores[node])
        node = pick[node]
    return tokens, chain_scores


def chain_lengths(chain_scores: Sequence[Sequence[float]], profile: CostProfile, rows: int) -> list[int]:
    """How many leading drafts of each chain to verify in one step of `rows` requests (see module docstring).

    `chain_scores[i]` must be non-increasing (chains from `best_chain` are); `rows` counts every request the
    forward carries, those without a chain included.
    """
    rows = max(rows, len(chain_scores), 1)
    pooled = sorted(
        ((score, depth, i) for i, scores in enumerate(chain_scores) for depth, score in enumerate(scores, 1)),
        key=lambda item: (-item[0], item[1]),
    )
    gain = float(rows)  # every request yields its bonus token
    best_rate, best_count = gain / profile.cost(rows), 0
    for count, (score, _, _) in enumerate(pooled, 1):
        gain += score
        rate = gain / profile.cost(rows + count)
        if rate > best_rate:
            best_rate, best_count = rate, count
    lengths = [0] * len(chain_scores)
    for _, depth, i in pooled[:best_count]:
        lengths[i] = max(lengths[i], depth)
    return lengths
