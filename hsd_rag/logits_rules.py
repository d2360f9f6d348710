"""Logits rules: settings that reshape the target's next-token distribution from the tokens before it.

Examples: a repetition penalty (HF's `RepetitionPenaltyLogitsProcessor`) or a grammar constraint (JSON schema,
regex). In a token tree every node has its own history — the prompt, the tokens decided so far and the node's
own ancestors — so a rule is applied to each node's logits row with *that node's* path. Verification then
accepts against exactly the distribution the target would have under the rule when decoding alone, which keeps
speculative decoding lossless under the rule.

The decode loop calls, per request: `start(prompt_ids)` once; per step `refine(tree)` on the drafted tree before
it is cut to the budget (drop drafts the rule forbids, so no budget is spent on them; a rule may also graft drafts
it knows are certain, e.g. grammar-forced tokens), `apply(tree, logits, history)` on the verify forward's logits,
and `advance(new_tokens)` with the tokens the step emitted. Rules run in list order, before the sampling
warpers (temperature, top-k, top-p), as HF `generate` runs its processors before its warpers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

from hsd_rag.tree import TokenTree

if TYPE_CHECKING:
    from hsd_rag.config import DecodeConfig


@runtime_checkable
class LogitsRule(Protocol):
    """A per-request rule over next-token logits, applied at every tree node along the node's own path."""

    name: str

    def start(self, prompt_ids: Sequence[int]) -> None:
        """Begin a request (the rule's state is per request)."""

    def refine(self, tree: TokenTree) -> TokenTree:
        """The drafted tree without the drafts the rule forbids, plus any it knows are certain (may be `tree`)."""

    def apply(self, tree: TokenTree, logits: torch.Tensor, history: Sequence[int]) -> torch.Tensor:
        """[n, V] logits of the tree's nodes -> processed logits; `history` ends with the root token."""

    def advance(self, new_tokens: Sequence[int]) -> None:
        """The step's emitted tokens (accepted drafts, then the bonus token), in order."""


# (decoder, config) -> a rule for this request, or None when the config does not ask for it.
LogitsRuleFactory = Callable[[object, "DecodeConfig"], LogitsRule | None]


def build_rules(factories: Sequence[LogitsRuleFactory], decoder, config: DecodeConfig) -> list[LogitsRule]:
    """The rules a request's config asks for, in factory order."""
    return [rule for factory in factories if (rule := factory(decoder, config)) is not None]
