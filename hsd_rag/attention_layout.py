"""Which past tokens each decoder layer attends to, and the KV cache that follows from it.

Full-attention layers see every earlier position; sliding-window layers (Mistral, Phi-3, Qwen2 with
`use_sliding_window`, the interleaved local layers of Gemma-2/3, ...) see only keys at positions
`> query position - window` (HF's rule, the query itself included). A token tree has queries at several depths,
so each node's mask row applies that rule at the node's own position, on top of the tree's ancestor rule.

The cache is a `DynamicCache` of plain layers (kv_cache.GrowingCache: appended in place, never re-copied), kept by us rather than by HF's sliding-window layers, which
drop rows on every update and so cannot be rolled back past a rejected draft. After every forward we roll each
layer back to the accepted path and then trim sliding layers to the `window - 1` newest rows: that is exactly
what any query of the next tree can still see (a node at depth d sits at position past + d and needs keys
> past + d - window). So a sliding layer holds the same rows as HF's own cache, and its attention costs O(window).

Models with a mix of layer types get one mask per type (a dict keyed by layer type, which HF models with
`config.layer_types` accept); models with one type get a plain tensor, which every HF model accepts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hsd_rag.tree import TokenTree

FULL = "full_attention"
SLIDING = "sliding_attention"


class UnsupportedAttentionError(ValueError):
    """The target has attention layers whose KV cache cannot be rolled back to a token tree's accepted path."""


@dataclass(frozen=True)
class AttentionLayout:
    """Per-layer attention kinds of a target (`layer_types[i]` is FULL or SLIDING) and the sliding window."""

    layer_types: tuple[str, ...]
    sliding_window: int | None = None  # keys a sliding-layer query sees, itself included

    @classmethod
    def of(cls, model) -> AttentionLayout:
        """Read the layout from an HF model's (text) config, the way HF's own DynamicCache reads it."""
        config = model.config
        get_text_config = getattr(config, "get_text_config", None)
        if callable(get_text_config):
            config = get_text_config(decoder=True)
        num_layers = config.num_hidden_layers
        window = getattr(config, "sliding_window", None)
        types = getattr(config, "layer_types", None)
        if types is None:
            if getattr(config, "attention_chunk_size", None) is not None:
                types = ["chunked_attention"] * num_layers
            else:
                types = [SLIDING if window is not None else FULL] * num_layers
        types = tuple(types[:num_layers])
        sharing = list(getattr(config, "kv_sharing_modes", None) or [])  # Gemma-3n/4: "reuse" = another's KV
        if "reuse" in sharing:
            types = tuple("kv_shared" if mode == "reuse" else kind for kind, mode in zip(types, sharing, strict=False))
        unsupported = sorted(set(types) - {FULL, SLIDING})
        if unsupported:
            raise UnsupportedAttentionError(
                f"{type(model).__name__} has {', '.join(unsupported)} layers; hsd_rag verifies token trees on "
                "full-attention and sliding-window layers only (their KV cache can be rolled back to the "
                "accepted path). Use plain `model.generate` for this model."
            )
        if SLIDING in types and (window is None or int(window) < 1):
            raise UnsupportedAttentionError(
                f"{type(model).__name__} has sliding-window layers but config.sliding_window is {window!r}."
            )
        return cls(types, int(window) if SLIDING in types else None)

    @property
    def kinds(self) -> tuple[str, ...]:
        """The distinct layer types, in order of first appearance."""
        return tuple(dict.fromkeys(self.layer_types))

    @property
    def keeps_every_row(self) -> bool:
        """True when no layer drops old rows (no sliding window): a prefilled prompt's cache can be reused."""
        return self.sliding_window is None

    def window_of(self, kind: str) -> int | None:
        return self.sliding_window if kind == SLIDING else None

    # ---- cache --------------------------------------------------------------------------------------------

    def new_cache(self):
        """An empty cache whose layers keep every row we give them (trimming and rollback are ours)."""
        from hsd_rag.kv_cache import GrowingCache

        return GrowingCache()  # plain layers, created lazily by the first forward, appending without copies

    def _rows(self, cache, kind: str) -> int:
        """Rows currently held by the layers of `kind` (all layers of one kind hold the same rows)."""
        index = self.layer_types.index(kind)
        layers = getattr(cache, "layers", None)
        if layers is None:
            raise TypeError(f"Unsupported cache type {type(cache).__name__}: expected a transformers DynamicCache.")
        if index >= len(layers) or getattr(layers[index], "keys", None) is None:
            return 0
        return layers[index].keys.shape[-2]

    def trim(self, cache) -> None:
        """Drop the sliding layers' rows that no later query can see (all but the `window - 1` newest)."""
        if self.sliding_window is None:
            return
        keep = self.sliding_window - 1
        for kind, layer in zip(self.layer_types, cache.layers, strict=False):
            if kind == SLIDING and layer.keys is not None and layer.keys.shape[-2] > keep:
                layer.keys = layer.keys[..., layer.keys.shape[-2] - keep :, :]
                layer.values = layer.values[..., layer.values.shape[-2] - keep :, :]

    def keep_accepted(self, cache, tree_size: int, accepted_nodes: list[int]) -> None:
        """Roll every layer back to the accepted path: the forward appended `tree_size` rows, one per node; the
        accepted ones move to the front of that block (in path order), the rest are dropped, then sliding layers
        are trimmed to their window."""
        kept = len(accepted_nodes)
        contiguous = accepted_nodes == list(range(kept))
        index = None
        for layer in cache.layers:
            keys, values = layer.keys, layer.values
            if keys is None:
                continue
            start = keys.shape[-2] - tree_size  # first row of this forward's tree block
            if not contiguous:
                if index is None or index.device != keys.device:
                    index = torch.tensor(accepted_nodes, device=keys.device)
                keys[..., start : start + kept, :] = keys.index_select(-2, index + start)
                values[..., start : start + kept, :] = values.index_select(-2, index + start)
            layer.keys = keys[..., : start + kept, :]
            layer.values = values[..., : start + kept, :]
        self.trim(cache)

    # ---- masks --------------------------------------------------------------------------------------------

    def tree_mask(self, tree: TokenTree, past_length: int, cache, dtype: torch.dtype, device):
        """The additive mask(s) for one forward of `tree` on top of `past_length` decided tokens.

        A tensor [1, 1, n, rows + n] when every layer has one kind, else {layer type: tensor}; `rows` is what
        that kind's layers hold (the newest `rows` positions before `past_length`).
        """
        masks = {
            kind: tree.attention_mask(
                past_length, dtype, device, window=self.window_of(kind), cached_rows=self._rows(cache, kind)
            )
            for kind in self.kinds
        }
        return masks[self.kinds[0]] if len(masks) == 1 else masks
