"""EagleDrafter: a draft tree from an EAGLE-3 (or EAGLE-1/2) head reading the target's own features.

How it follows the decode loop (docs/ARCHITECTURE.md):
- `start` attaches feature hooks *before* the prefill, whose forward over prompt[:-1] leaves features
  f_0..f_{P-2}.
- The head consumes pairs (f_t, token_{t+1}) at head position t; the pair's output predicts token_{t+2}. A pair
  whose feature came from the target is *accepted*: it is run once and stays in the head's KV cache. After the
  prefill or a step the new pairs are pending; `propose` runs them in one head forward whose last output predicts
  the depth-1 drafts. Only the last `prompt_window` prompt pairs are run (the target features already carry the
  whole prompt); the head keeps true positions. Invariant: skipped prompt pairs + head cache length + pending
  pairs == target cache length == len(token_ids) - 1.
- Deeper levels feed back the head's own hidden (EAGLE-2 dynamic tree): each level keeps the `top_k` frontier
  nodes with the best path score, all at position (target cache length + depth - 1), under a tree mask;
  their KV entries are cropped off afterwards, so only accepted pairs ever stay in the head cache.
- Scores are calibrated (eagle_calibration): a node's score is the product along its path of
  P(accepted | parent accepted) for its (depth, head probability) bucket, learned during the request from priors
  shipped with the head, so fusion can rank EAGLE and n-gram nodes on one scale.
- Early exit (CPU): a level is drafted only if its best frontier node could still enter the kept tree, i.e.
  beats `context.min_score` and either the `budget`-th best candidate so far or, under budget="auto", the
  entry floor of the candidates so far (`_EntryFloor`; path scores only fall with depth, so no deeper node can
  do better). The check reads the scores back once per level; that is free on a CPU, where
  each head level costs a real share of a step, but would stall a GPU's queue, so there it is off by default.
- `observe` takes the verified tree's features from the hooks and queues (feature of accepted node i, next
  accepted token) pairs, the last one pairing with the bonus token, and records which of its verified drafts
  were accepted in the calibrator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from hsd_rag.drafters.base import DraftContext, StepOutcome, record_outcomes
from hsd_rag.drafters.eagle_calibration import EagleCalibrator
from hsd_rag.heads.base import DraftHead
from hsd_rag.heads.features import FeatureCapture
from hsd_rag.tree import SOURCE_EAGLE, TokenTree

DEFAULT_DEPTH = 6  # draft levels (the reference's depth 5 loop plus its first level)
DEFAULT_TOP_K = 8  # frontier width and children per node (the reference's default)
# Trailing prompt pairs the head reads (None: all). The target's features already carry the whole prompt, so
# the head's own attention over a long RAG prompt buys little, while running it over every prompt pair costs
# the first head call of a request tens of milliseconds on a CPU (measured in docs/ARCHITECTURE.md).
DEFAULT_PROMPT_WINDOW = 128
NO_PARENT = -1  # parent index of depth-1 candidates: the root


class EagleDrafter:
    """Tree drafts from an EAGLE head; `depth` levels, `top_k` frontier nodes per level, best `budget` kept."""

    name = "eagle"

    def __init__(
        self,
        model,
        head: DraftHead,
        depth: int = DEFAULT_DEPTH,
        top_k: int = DEFAULT_TOP_K,
        early_exit: bool | None = None,
        calibrator_factory=None,
        prompt_window: int | None = DEFAULT_PROMPT_WINDOW,
    ):
        if depth < 1 or top_k < 1:
            raise ValueError(f"depth and top_k must be >= 1, got depth={depth}, top_k={top_k}")
        if prompt_window is not None and prompt_window < 1:
            raise ValueError(f"prompt_window must be >= 1 or None (the whole prompt), got {prompt_window}")
        self.prompt_window = prompt_window
        self.model = model
        self.head = head
        self.depth = depth
        self.top_k = top_k
        self.early_exit = head.device.type == "cpu" if early_exit is None else early_exit
        self.levels_drafted = 0  # head levels run by `propose` over this drafter's life (for tests and profiling)
        # a fresh calibrator per request, warm-started from the priors shipped with the head (if any)
        self.calibrator_factory = calibrator_factory or (
            lambda: EagleCalibrator(getattr(head, "acceptance_priors", None), device=head.device)
        )
        self.calibrator: EagleCalibrator | None = None
        self.capture = FeatureCapture.for_head(model, head)
        self._reset()

    def _reset(self) -> None:
        self._cache = None  # HeadKVCache of accepted pairs
        self._pending_features: list[torch.Tensor] = []  # [T_i, F] target features of pairs not yet run
        self._pending_tokens: list[int] = []  # the token paired with each pending feature
        self._awaiting_prefill = False
        self._skipped = 0  # leading prompt pairs the head never runs (outside `prompt_window`, or not prefilled)
        self._not_prefilled = 0  # leading prompt tokens whose features no prefill computed (a reused KV prefix)
        self._last = None  # (hidden [H], log-probs [Vd]) of the newest accepted pair, until the next step
        self._proposed: dict[tuple[int, ...], int] = {}  # draft token path below the root -> calibrator bucket
        self._proposed_root = -1

    # ---- protocol ----------------------------------------------------------------------------------------

    def start(self, prompt_ids: Sequence[int], documents: Sequence[Sequence[int]]) -> None:
        self.capture.detach()
        self._reset()
        self._cache = self.head.new_cache()
        self.calibrator = self.calibrator_factory()
        self._pending_tokens = [int(t) for t in prompt_ids[1:]]  # pairs (f_t, prompt[t + 1]), t < P - 1
        self._awaiting_prefill = True
        self.capture.attach()

    @torch.inference_mode()
    def propose(self, context: DraftContext) -> TokenTree:
        if self._cache is None:
            raise RuntimeError("EagleDrafter.propose called before start().")
        if self._awaiting_prefill:
            self._take_prefill_features()
        self._check_in_sync(context)
        tree = TokenTree.root(context.token_ids[-1])
        self._proposed, self._proposed_root = {}, tree.tokens[0]
        budget = context.budget
        if budget <= 0:
            return tree  # pending pairs wait for the next step; nothing to draft
        if self._pending_tokens:
            self._run_pending()
        if self._last is None:
            return tree  # a one-token prompt: no target feature yet
        top_k = min(self.top_k, budget, self.head.draft_vocab_size)
        depth = min(self.depth, budget)
        floor = _EntryFloor(context, self.name)
        tokens, parents, scores, buckets = self._expand(top_k, depth, budget, floor)
        return self._assemble(tree, tokens, parents, scores, buckets, budget)

    @torch.inference_mode()
    def observe(self, outcome: StepOutcome) -> None:
        if self._awaiting_prefill:  # not asked since the prefill (a gate skipped it): its rows come first
            features = self._take_prefill_features(then_rows=len(outcome.tree))
        else:
            features = self.capture.pop()  # [1, n, F] from the tree forward
        rows = 0 if features is None else features.shape[1]
        if rows != len(outcome.tree):
            raise RuntimeError(
                f"EagleDrafter expected features of one target forward over the {len(outcome.tree)}-node tree "
                f"but the hooks captured {rows} positions since propose(): observe() must follow exactly one "
                "tree forward of the target."
            )
        if len(outcome.new_tokens) != len(outcome.accepted_nodes):
            raise ValueError("new_tokens must hold the accepted drafts then the bonus token (one per node).")
        index = torch.tensor(outcome.accepted_nodes, device=features.device)
        self._pending_features.append(features[0].index_select(0, index))  # [m, F]
        self._pending_tokens.extend(int(t) for t in outcome.new_tokens)
        self._last = None
        if self._proposed and outcome.tree.tokens[0] == self._proposed_root:
            record_outcomes(outcome, SOURCE_EAGLE, self._proposed, self.calibrator.record)
        self._proposed = {}

    def skip_prefix_features(self, count: int) -> None:
        """The prefill skips the first `count` prompt tokens (hsd_rag.prefix_cache): the head reads at most the
        prompt pairs after them."""
        if not self._awaiting_prefill:
            raise RuntimeError("skip_prefix_features must come between start() and the prefill.")
        self._not_prefilled = max(0, min(int(count), len(self._pending_tokens)))

    def close(self) -> None:
        self.capture.detach()
        self._reset()

    # ---- accepted pairs ----------------------------------------------------------------------------------

    @property
    def cache_length(self) -> int:
        """Accepted pairs in the head's KV cache (draft entries never remain)."""
        return 0 if self._cache is None else len(self._cache)

    @property
    def skipped(self) -> int:
        """Leading prompt pairs the head never reads (outside `prompt_window`)."""
        return self._skipped

    @property
    def pending(self) -> int:
        """Accepted pairs queued for the next head forward."""
        return len(self._pending_tokens)

    def _take_prefill_features(self, then_rows: int = 0) -> torch.Tensor | None:
        """Queue the prefill's features ([1, P - 1, F], none for a one-token prompt); when observe() comes first,
        the tree forward's `then_rows` rows follow them in the capture and are returned."""
        features = self.capture.pop()
        pairs = len(self._pending_tokens)  # prompt pairs, one per prompt[:-1] token
        prefill_rows = pairs - self._not_prefilled  # the first ones may come from a reused KV prefix
        rows = 0 if features is None else features.shape[1]
        if rows < prefill_rows or (not then_rows and rows != prefill_rows):
            raise RuntimeError(
                f"EagleDrafter expected prefill features for {prefill_rows} prompt tokens "
                f"(prompt[:-1]) but captured {rows}: start() must precede the prefill forward."
            )
        window_skip = 0 if self.prompt_window is None else pairs - self.prompt_window
        skip = max(self._not_prefilled, window_skip)
        if pairs > skip:
            self._pending_features.append(features[0, skip - self._not_prefilled : prefill_rows])
        self._pending_tokens = self._pending_tokens[skip:]
        self._skipped = skip
        self._awaiting_prefill = False
        return features[:, prefill_rows:] if features is not None and then_rows else None

    def _check_in_sync(self, context: DraftContext) -> None:
        expected = len(context.token_ids) - 1  # the target's cache length
        if self.skipped + self.cache_length + self.pending != expected:
            raise RuntimeError(
                f"EagleDrafter is out of sync: {self.skipped} skipped + {self.cache_length} cached + "
                f"{self.pending} pending head pairs but {expected} tokens in the target cache."
            )

    def catch_up(self, features: torch.Tensor, tokens: list[int]) -> None:
        """Run the head now over accepted pairs (features [k, F] of the target, the tokens that followed them):
        what `propose` does first each step with the pairs accepted since the head last ran (timed by tune)."""
        self._pending_features.append(features)
        self._pending_tokens.extend(int(t) for t in tokens)
        self._run_pending()

    def _run_pending(self) -> None:
        """One head forward over the queued accepted pairs, appended to the cache for good."""
        device = self.head.device
        features = torch.cat(self._pending_features, dim=0).to(device)[None]  # [1, k, F]
        tokens = torch.tensor([self._pending_tokens], device=device)  # [1, k]
        start = self._skipped + len(self._cache)  # true target positions, also after a skipped prompt head
        positions = torch.arange(start, start + tokens.shape[1], device=device)[None]
        out = self.head(features, tokens, positions, cache=self._cache, logits_to_keep=1)
        self._last = (out.hidden[0, -1], F.log_softmax(out.logits[0, -1].float(), dim=-1))  # [H], [Vd]
        self._pending_features, self._pending_tokens = [], []

    # ---- drafting ----------------------------------------------------------------------------------------

    def _expand(self, top_k: int, depth: int, budget: int, floor: _EntryFloor):
        """Candidates of all levels (target ids, parent candidate index, calibrated log path score, calibration
        bucket), on device."""
        head, cache, calibrator = self.head, self._cache, self.calibrator
        hidden, log_probs = self._last
        stable = len(cache)  # + skipped == target cache length; depth-d nodes sit at position that + d - 1
        device, dtype = hidden.device, hidden.dtype
        eye = torch.eye(top_k, dtype=torch.bool, device=device)

        best = log_probs.topk(top_k)
        frontier_scores, frontier_buckets = calibrator.score(1, best.values)  # [K] log path scores, buckets
        frontier_scores, order = frontier_scores.sort(descending=True, stable=True)
        frontier_buckets = frontier_buckets[order]
        frontier_tokens = head.to_target_ids(best.indices[order])  # [K]
        frontier_hidden = hidden.expand(top_k, -1)  # [K, H] every depth-1 node continues the root's pair
        frontier_index = torch.arange(top_k, device=device)  # candidate index of each frontier node
        all_tokens, all_scores, all_buckets = [frontier_tokens], [frontier_scores], [frontier_buckets]
        all_parents = [torch.full((top_k,), NO_PARENT, device=device)]
        visible = eye  # [K, drafted entries] which draft cache entries each frontier node may attend to
        offset = top_k
        self.levels_drafted += 1
        try:
            for level in range(1, depth):
                if self.early_exit and floor.cannot_improve(frontier_scores, all_scores, budget, level):
                    break
                self.levels_drafted += 1
                positions = torch.full((1, top_k), self._skipped + stable + level - 1, device=device)
                mask = torch.zeros(1, 1, top_k, stable + visible.shape[1], dtype=dtype, device=device)
                mask[0, 0, :, stable:].masked_fill_(~visible, torch.finfo(dtype).min)
                out = head(frontier_hidden[None], frontier_tokens[None], positions, mask, cache)
                children = F.log_softmax(out.logits[0].float(), dim=-1).topk(top_k, dim=-1)  # [K, K]
                child_scores, child_buckets = calibrator.score(level + 1, children.values.flatten())  # [K * K]
                cumulative = frontier_scores.repeat_interleave(top_k) + child_scores
                child_tokens = head.to_target_ids(children.indices).flatten()  # [K * K]
                all_tokens.append(child_tokens)
                all_scores.append(cumulative)
                all_buckets.append(child_buckets)
                all_parents.append(frontier_index.repeat_interleave(top_k))
                chosen = cumulative.topk(top_k).indices  # [K] next frontier, best path score first
                rows = chosen // top_k  # the frontier node each one extends
                frontier_scores = cumulative[chosen]
                frontier_tokens = child_tokens[chosen]
                frontier_hidden = out.hidden[0, rows]
                frontier_index = offset + chosen
                offset += top_k * top_k
                visible = torch.cat((visible[rows], eye), dim=1)
        finally:
            cache.crop(stable)  # drop every draft-only entry
        return torch.cat(all_tokens), torch.cat(all_parents), torch.cat(all_scores), torch.cat(all_buckets)

    def _assemble(self, tree: TokenTree, tokens, parents, scores, buckets, budget: int) -> TokenTree:
        """Keep the `budget` best candidates and build the TokenTree (the one host sync of a step).

        Path scores never increase along a path and parents have smaller indices, so a stable descending sort
        ranks every parent before its children: the kept prefix is closed under ancestors.
        """
        order = torch.sort(scores, descending=True, stable=True).indices[:budget]
        keep = order.sort().values  # topological (ascending candidate index)
        payload = torch.stack((keep.double(), tokens[keep].double(), parents[keep].double(),
                               scores[keep].double().exp(), buckets[keep].double()))
        ids, toks, pars, probs, bucket_ids = payload.tolist()
        node_of: dict[int, int] = {}
        path_of: dict[int, tuple[int, ...]] = {NO_PARENT: ()}
        for cand, token, parent, prob, bucket in zip(ids, toks, pars, probs, bucket_ids, strict=True):
            parent, token = int(parent), int(token)
            parent_node = 0 if parent == NO_PARENT else node_of[parent]
            node_of[int(cand)] = tree.add(parent_node, token, prob, SOURCE_EAGLE)
            path = path_of[parent] + (token,)
            path_of[int(cand)] = path
            self._proposed[path] = int(bucket)
        return tree


class _EntryFloor:
    """Whether any descendant of the frontier could still be kept: the early-exit test of `_expand`.

    Path scores only fall with depth, so once the best frontier node could not enter the tree no deeper node
    can. A node must clear the caller's floor (`context.min_score`, e.g. the free sources' entry floor in a
    hybrid) and rank among the `budget` best candidates; under budget="auto" also the entry floor of the
    candidates drafted so far (`CostProfile.entry_floor`: the budget is only a cap there, so ranking alone never
    prunes and a CPU would pay for levels that fit_tree drops).
    """

    def __init__(self, context: DraftContext, source: str):
        self.min_score = context.min_score
        self.profile = context.profile if context.auto_budget else None
        self.source = source

    def cannot_improve(self, frontier_scores, all_scores, budget: int, levels: int) -> bool:
        best = math.exp(float(frontier_scores[0]))  # topk sorts: the best frontier node comes first
        if best < self.min_score:
            return True
        scores = torch.cat(all_scores)
        if self.profile is not None:
            drafted = sorted(scores.exp().tolist(), reverse=True)
            cost = self.profile.draft_cost(self.source, levels)
            return best < self.profile.entry_floor(drafted, budget, cost)
        if scores.numel() < budget:
            return False
        # ties go to the earlier (shallower) candidate in `_assemble`'s stable sort, hence <=
        return best <= math.exp(float(scores.topk(budget).values[-1]))
