"""The token tree: draft candidates from any source, merged into one trie and verified in one forward.

Node 0 is the *root*: the last decided token, not yet in the target's KV cache. Every other node is a draft
token whose parent is an earlier node (`parents[i] < i`, so the lists are in topological order). Drafts from
several sources are merged so a shared prefix costs one node; a node proposed by several sources carries all
their labels. `score` is the estimated probability that the node gets accepted; `truncate` keeps the best
`budget` drafts together with all their ancestors.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

# Source labels are bit flags so a node proposed by several drafters carries all of them.
SOURCE_TARGET = 0  # the bonus token, sampled from the target itself
SOURCE_NGRAM = 1
SOURCE_EAGLE = 2
SOURCE_GRAMMAR = 4  # tokens a response format forces (hsd_rag.constrain), drafted for free
SOURCE_HISTORY = 8  # n-gram drafts copied from earlier answers of the same decoder (drafters/answer_history.py)
SOURCE_NAMES = {SOURCE_NGRAM: "ngram", SOURCE_EAGLE: "eagle", SOURCE_GRAMMAR: "grammar", SOURCE_HISTORY: "history"}


def source_names(mask: int) -> list[str]:
    """Names of the sources set in a label bitmask (empty for the target's own tokens)."""
    return [name for bit, name in SOURCE_NAMES.items() if mask & bit]


@dataclass
class TokenTree:
    """A trie of draft tokens rooted at the pending token. Lists are indexed by node id ([n] each)."""

    tokens: list[int]  # [n] token id of each node; tokens[0] is the root (pending) token
    parents: list[int]  # [n] parent node id, -1 for the root; parents[i] < i
    scores: list[float]  # [n] estimated acceptance probability; the root has 1.0
    sources: list[int]  # [n] bitmask of SOURCE_* labels; the root has SOURCE_TARGET
    depths: list[int]  # [n] distance from the root (root 0)
    _children: dict[tuple[int, int], int] = field(default_factory=dict, repr=False)  # (parent, token) -> node
    _kids: list[list[int]] = field(default_factory=lambda: [[]], repr=False)  # node -> child node ids

    @classmethod
    def root(cls, token: int) -> TokenTree:
        return cls(tokens=[int(token)], parents=[-1], scores=[1.0], sources=[SOURCE_TARGET], depths=[0])

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_drafts(self) -> int:
        """Draft nodes (everything but the root)."""
        return len(self.tokens) - 1

    def add(self, parent: int, token: int, score: float, source: int) -> int:
        """Add (or merge into) the child `token` of `parent`; returns its node id."""
        key = (parent, int(token))
        node = self._children.get(key)
        if node is not None:
            self.scores[node] = max(self.scores[node], float(score))
            self.sources[node] |= source
            return node
        node = len(self.tokens)
        self.tokens.append(int(token))
        self.parents.append(parent)
        self.scores.append(float(score))
        self.sources.append(source)
        self.depths.append(self.depths[parent] + 1)
        self._children[key] = node
        self._kids[parent].append(node)
        self._kids.append([])
        return node

    def add_path(self, tokens: Sequence[int], scores: Sequence[float], source: int, parent: int = 0) -> list[int]:
        """Add a chain of drafts below `parent`; returns the node ids along it."""
        nodes = []
        for token, score in zip(tokens, scores, strict=True):
            parent = self.add(parent, token, score, source)
            nodes.append(parent)
        return nodes

    def merge(self, other: TokenTree) -> None:
        """Merge another tree with the same root into this one (shared prefixes counted once)."""
        if other.tokens[0] != self.tokens[0]:
            raise ValueError("Cannot merge trees with different roots.")
        mapping = [0] * len(other)
        for i in range(1, len(other)):
            mapping[i] = self.add(mapping[other.parents[i]], other.tokens[i], other.scores[i], other.sources[i])

    def child(self, node: int, token: int) -> int | None:
        """The child of `node` carrying `token`, if any."""
        return self._children.get((node, token))

    def children(self, node: int) -> list[int]:
        return self._kids[node]

    def effective_scores(self) -> list[float]:
        """Scores made monotone along every path (a node can't be likelier than its parent)."""
        eff = list(self.scores)
        eff[0] = float("inf")
        for i in range(1, len(eff)):
            eff[i] = min(eff[i], eff[self.parents[i]])
        return eff

    def exclusive_children(self) -> TokenTree:
        """Scores with each node's children competing for one acceptance: the target takes exactly one token after
        an accepted node, so the children's conditional estimates (score / parent's score) may sum to at most 1.
        Taken best first, each child keeps its estimate up to what its better siblings left. Merged sources need
        this: an n-gram child at 0.9 and a head child at 0.4 under one parent cannot both be that likely.
        Returns a new tree with the same nodes; scores only go down, so they stay monotone along every path."""
        eff = self.effective_scores()
        eff[0] = 1.0
        capped = [1.0] * len(self)
        for node in range(len(self)):
            left = 1.0
            conditional = [(eff[kid] / eff[node] if eff[node] > 0 else 0.0, kid) for kid in self._kids[node]]
            for estimate, kid in sorted(conditional, key=lambda pair: (-pair[0], pair[1])):
                share = min(estimate, left)
                left -= share
                capped[kid] = capped[node] * share
        out = TokenTree.root(self.tokens[0])
        for i in range(1, len(self)):
            out.add(self.parents[i], self.tokens[i], capped[i], self.sources[i])
        return out

    def truncate(self, budget: int) -> TokenTree:
        """Keep the `budget` best drafts and all their ancestors (a subtree), re-indexed in topological order.

        With monotone scores every ancestor ranks at least as high as its descendants (ties go to the
        shallower node), so the top-`budget` set is closed under ancestors and exactly `budget` drafts remain.
        """
        if budget < 0:
            raise ValueError(f"budget must be >= 0, got {budget}")
        if self.num_drafts <= budget:
            return self
        eff = self.effective_scores()
        order = sorted(range(1, len(self)), key=lambda i: (-eff[i], self.depths[i], i))
        keep = sorted([0, *order[:budget]])
        return self.subtree(keep)

    def subtree(self, keep: Iterable[int]) -> TokenTree:
        """The tree restricted to `keep` (ancestor-closed, ascending node ids)."""
        keep = list(keep)
        new_id = {old: new for new, old in enumerate(keep)}
        out = TokenTree.root(self.tokens[0])
        for old in keep[1:]:
            parent = self.parents[old]
            if parent not in new_id:
                raise ValueError(f"node {old} kept without its parent {parent}")
            out.add(new_id[parent], self.tokens[old], self.scores[old], self.sources[old])
        return out

    def path_to(self, node: int) -> list[int]:
        """Node ids from the root to `node`, inclusive."""
        path = []
        while node >= 0:
            path.append(node)
            node = self.parents[node]
        return path[::-1]

    def leaves(self) -> list[int]:
        return [i for i in range(len(self)) if not self._kids[i]]

    def paths(self) -> list[list[int]]:
        """Root-to-leaf node-id paths."""
        return [self.path_to(leaf) for leaf in self.leaves()]

    # ---- tensors for the verification forward -------------------------------------------------------------

    def ancestor_matrix(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Bool [n, n]: entry (i, j) is True when node j is node i or one of its ancestors."""
        n = len(self)
        rows = [[False] * n for _ in range(n)]
        for i in range(n):
            rows[i][i] = True
            parent = self.parents[i]
            if parent >= 0:
                rows[i][: i] = [a or b for a, b in zip(rows[i][:i], rows[parent][:i], strict=True)]
        return torch.tensor(rows, dtype=torch.bool, device=device)

    def attention_mask(
        self,
        past_length: int,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
        window: int | None = None,
        cached_rows: int | None = None,
    ):
        """Additive float mask [1, 1, n, rows + n]: every node sees the cache and its own ancestors.

        `cached_rows` (default `past_length`): the cache holds the newest `rows` positions before `past_length`.
        `window`: a sliding-window layer's rule, a node at position p sees only keys at positions > p - window.
        """
        rows = past_length if cached_rows is None else cached_rows
        visible = self.ancestor_matrix(device)
        n = len(self)
        mask = torch.full((1, 1, n, rows + n), torch.finfo(dtype).min, dtype=dtype, device=device)
        if window is None:
            mask[..., :rows] = 0
            mask[0, 0, :, rows:].masked_fill_(visible, 0)
            return mask
        query = self.position_ids(past_length, device)[0]  # [n]
        keys = torch.cat((torch.arange(past_length - rows, past_length, device=device), query))  # [rows + n]
        seen = torch.cat((torch.ones(n, rows, dtype=torch.bool, device=device), visible), dim=1)
        seen &= keys[None, :] > query[:, None] - window
        mask[0, 0].masked_fill_(seen, 0)
        return mask

    def position_ids(self, past_length: int, device: torch.device | str | None = None) -> torch.Tensor:
        """[1, n]: a node's position is the cache length plus its depth."""
        return torch.tensor([self.depths], dtype=torch.long, device=device) + past_length

    def input_ids(self, device: torch.device | str | None = None) -> torch.Tensor:
        """[1, n] token ids of all nodes, root first."""
        return torch.tensor([self.tokens], dtype=torch.long, device=device)
