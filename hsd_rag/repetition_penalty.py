"""HF's repetition penalty as a per-node logits rule, so speculative decoding stays lossless under it.

`RepetitionPenaltyLogitsProcessor` divides the logit of every token already in the sequence (prompt included) by
`penalty` when positive and multiplies it when negative. In a token tree the sequence differs per node: node i's
logits predict the token after the prompt, the decided tokens and the drafts on i's own path, so its row is
penalised over exactly those. The decided part is a device-side bit mask updated once per step; each step adds
only the path tokens (n x depth index pairs), with no host sync.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hsd_rag.tree import TokenTree


class RepetitionPenalty:
    """`LogitsRule` (hsd_rag.logits_rules) applying HF's repetition penalty along every node's own path."""

    name = "repetition_penalty"

    def __init__(self, penalty: float):
        if not penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {penalty}")
        self.penalty = float(penalty)
        self._seen: torch.Tensor | None = None  # [V + 1] bool: tokens of prompt + decided output (+1: ids >= V)
        self._unseen_ids: list[int] = []  # decided tokens not yet written into `_seen`

    def start(self, prompt_ids: Sequence[int]) -> None:
        self._seen = None
        self._unseen_ids = [int(t) for t in prompt_ids]

    def refine(self, tree: TokenTree) -> TokenTree:
        return tree  # every draft stays possible, only less likely

    def apply(self, tree: TokenTree, logits: torch.Tensor, history: Sequence[int]) -> torch.Tensor:
        scores = logits.float()  # HF runs its processors on float32 logits
        n, vocab = scores.shape
        if self._seen is None:
            self._seen = torch.zeros(vocab + 1, dtype=torch.bool, device=scores.device)
        if self._unseen_ids:
            ids = torch.tensor(self._unseen_ids, device=scores.device).clamp_(max=vocab)
            self._seen[ids] = True
            self._unseen_ids = []
        seen = self._seen[:vocab].expand(n, vocab).clone()  # [n, V]
        rows, cols = [], []
        for node in range(1, n):  # node i has seen the drafts on its path, itself included (the root is decided)
            ancestor = node
            while ancestor > 0:
                if tree.tokens[ancestor] < vocab:  # ids past the lm_head can't be produced, so can't be penalised
                    rows.append(node)
                    cols.append(tree.tokens[ancestor])
                ancestor = tree.parents[ancestor]
        if rows:
            index = torch.tensor([rows, cols], device=scores.device)
            seen[index[0], index[1]] = True
        penalised = torch.where(scores < 0, scores * self.penalty, scores / self.penalty)
        return torch.where(seen, penalised, scores)

    def advance(self, new_tokens: Sequence[int]) -> None:
        self._unseen_ids.extend(int(t) for t in new_tokens)


def repetition_penalty_rule(decoder, config) -> RepetitionPenalty | None:
    """`LogitsRuleFactory`: the rule when the resolved config asks for a penalty other than 1.0."""
    penalty = getattr(config, "repetition_penalty", None)
    if penalty is None or penalty == 1.0:
        return None
    return RepetitionPenalty(penalty)
