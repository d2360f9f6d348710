"""GrammarRule: a response format enforced on every tree node, along that node's own path (a `LogitsRule`).

Lossless by construction: `apply` masks each node's logits row with the grammar state reached by the decided
tokens plus that node's ancestors, so verification accepts against exactly the distribution the target has
when it decodes alone under the same constraint (a constrained plain decode applies the same mask to the same
row). Drafts only decide which rows get computed:

- `refine` drops drafts the grammar forbids (they could never be accepted: their masked probability is 0), so
  no verification budget is spent on them;
- it grafts the grammar's forced continuation (e.g. `{"name": "` at the start of an object) below every kept
  node as drafts of their own source, `SOURCE_GRAMMAR`: free drafts, still verified like any other.

The grammar's tokenization of a forced string may differ from the one the target prefers, so grafted drafts
are scored by their running acceptance rate in this request (a Beta prior, updated from each step's outcome).
Everything runs on the host from token ids the loop already has: no device sync is added.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hsd_rag.tree import SOURCE_GRAMMAR, TokenTree

# Prior of the grafted drafts' acceptance rate: the target, under the same grammar, must produce the forced
# text; it usually picks the engine's longest-match tokenization. Worth 10 observations.
GRAFT_PRIOR_ACCEPTED = 9.0
GRAFT_PRIOR_TESTED = 10.0
MAX_GRAFT_LENGTH = 32  # forced tokens grafted below one node per step (longer runs continue next step)


@dataclass
class GraftRate:
    """Running estimate of P(a grafted draft is accepted | its parent was), with a Beta prior."""

    accepted: float = GRAFT_PRIOR_ACCEPTED
    tested: float = GRAFT_PRIOR_TESTED

    @property
    def value(self) -> float:
        return self.accepted / self.tested

    def observe(self, tree: TokenTree, accepted_nodes: Sequence[int]) -> None:
        """Every grammar draft whose parent was accepted was tested; count those that were accepted too."""
        on_path = set(accepted_nodes)
        for node in accepted_nodes:
            for child in tree.children(node):
                if tree.sources[child] & SOURCE_GRAMMAR:
                    self.tested += 1
                    self.accepted += child in on_path


class GrammarRule:
    """Per-request grammar state: one matcher holding the decided tokens, forked along tree paths by rollback."""

    name = "grammar"

    def __init__(self, engine, compiled, graft: bool = True):
        self.engine = engine
        self.compiled = compiled
        self.graft = graft
        self.matcher = None
        self.rate = GraftRate()
        self._verified: TokenTree | None = None  # the last tree `apply` masked, for the graft rate
        self._bitmask: torch.Tensor | None = None  # [rows, ceil(V/32)] int32, reused (pinned for a GPU target)

    def start(self, prompt_ids: Sequence[int]) -> None:
        # The prompt is not constrained: the matcher starts empty and follows the generated tokens only.
        self.matcher = self.engine.matcher(self.compiled)
        self.rate = GraftRate()
        self._verified = None

    # ---- before verification: prune and graft -------------------------------------------------------------

    def refine(self, tree: TokenTree) -> TokenTree:
        """The drafts the grammar allows (depth first, rolling the matcher back), plus grafted forced runs."""
        out = TokenTree.root(tree.tokens[0])
        self._copy_allowed(tree, 0, out, 0)
        return out

    def _copy_allowed(self, tree: TokenTree, node: int, out: TokenTree, out_node: int) -> None:
        """Copy `node`'s allowed subtree under `out_node`; the matcher stands at `node` on entry and on exit."""
        matcher = self.matcher
        if matcher.is_terminated():  # the node is a stop token: nothing may follow it
            return
        never = self.engine.never_allowed
        for child in tree.children(node):
            token = tree.tokens[child]
            if token in never or token >= self.engine.vocab_size:
                continue
            if matcher.accept_token(token):  # a rejected token leaves the matcher unchanged
                kept = out.add(out_node, token, tree.scores[child], tree.sources[child])
                self._copy_allowed(tree, child, out, kept)
                matcher.rollback(1)
        if self.graft:
            self._graft_forced(out, out_node)

    def _graft_forced(self, out: TokenTree, node: int) -> None:
        forced = self.matcher.find_jump_forward_tokens()[:MAX_GRAFT_LENGTH]
        score, rate = out.scores[node], self.rate.value
        for token in forced:
            score *= rate
            node = out.add(node, token, score, SOURCE_GRAMMAR)

    # ---- verification: mask every node's row by its own path ----------------------------------------------

    def apply(self, tree: TokenTree, logits: torch.Tensor, history: Sequence[int]) -> torch.Tensor:
        """[n, V] logits -> the same with every token the grammar forbids at that node set to -inf."""
        first_child, next_sibling = _child_links(tree)
        bitmask = self._full_bitmask(len(tree), logits.device)
        # Walks the tree from the matcher's state (the root's), masking each node by its path; a node whose
        # own token the grammar forbids keeps a full row, as do its descendants: it can never be accepted
        # (its parent's row gives it probability 0), so their rows are never read.
        self.matcher.traverse_draft_tree(first_child, next_sibling, torch.tensor(tree.tokens), bitmask)
        self._verified = tree
        return self.engine.apply_bitmask(logits, bitmask)

    def _full_bitmask(self, rows: int, device: torch.device) -> torch.Tensor:
        """The first `rows` rows of the reused mask buffer, all allowed. Reuse is safe: the previous step's
        copy to the device finished before its acceptance was read back on the host."""
        held = 0 if self._bitmask is None else self._bitmask.shape[0]
        if held < rows:
            self._bitmask = self.engine.full_bitmask(max(rows, 2 * held), pinned=device.type == "cuda")
        bitmask = self._bitmask[:rows]
        self.engine.reset_bitmask(bitmask)
        return bitmask

    # ---- after acceptance ---------------------------------------------------------------------------------

    def advance(self, new_tokens: Sequence[int]) -> None:
        if self._verified is not None:
            self.rate.observe(self._verified, _accepted_nodes(self._verified, new_tokens))
        for token in new_tokens:
            if self.matcher.is_terminated():  # a stop token was accepted: the loop ends the output there
                break
            if not self.matcher.accept_token(int(token)):
                raise RuntimeError(
                    f"The grammar rejected token {token}, which the constrained target emitted: the mask and the "
                    "matcher disagree (a bug in hsd_rag.constrain; please report it)."
                )


def _child_links(tree: TokenTree) -> tuple[torch.Tensor, torch.Tensor]:
    """xgrammar's tree encoding: [n] first child of each node and [n] next sibling, -1 for none."""
    n = len(tree)
    first_child, next_sibling = [-1] * n, [-1] * n
    for node in range(n):
        kids = tree.children(node)
        if kids:
            first_child[node] = kids[0]
            for left, right in zip(kids, kids[1:], strict=False):
                next_sibling[left] = right
    return torch.tensor(first_child, dtype=torch.int64), torch.tensor(next_sibling, dtype=torch.int64)


def _accepted_nodes(tree: TokenTree, new_tokens: Sequence[int]) -> list[int]:
    """The accepted path (root first): the drafts that match the emitted tokens, in order."""
    node, path = 0, [0]
    for token in new_tokens[:-1]:  # the last emitted token is the target's bonus, never a draft
        child = tree.child(node, int(token))
        if child is None:
            break
        node = child
        path.append(node)
    return path


def grammar_rule(decoder, config) -> GrammarRule | None:
    """The LogitsRule factory: a GrammarRule when the config has a `response_format`, else None.

    The plain method ("vanilla") drafts nothing, so it gets no grafts either: it stays the constrained
    one-token-per-forward baseline.
    """
    fmt = getattr(config, "response_format", None)
    if fmt is None:
        return None
    from hsd_rag.constrain.engine import engine_for

    engine = engine_for(decoder)
    return GrammarRule(engine, engine.compile(fmt), graft=config.method != "vanilla")
