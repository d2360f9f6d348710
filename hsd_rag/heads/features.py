"""Capture the target features an EAGLE head consumes, with hooks on an unmodified HF model.

- EAGLE-3: the hidden states *entering* decoder layers 2, L//2 and L-3 (HF `hidden_states[2]`, `[L//2]`,
  `[L-3]`), concatenated in that order -> [B, T, 3H]. For L >= 8 that is ascending layer order, exactly how the
  reference's patched LlamaModel collects them.
- EAGLE-1/2: the final hidden state *after* the final norm (the lm_head input; the reference feeds the head
  `LlamaModel`'s output), captured at the norm's output because the lm_head may only see the last position.

Forward pre-hooks on three layers keep three tensors alive; `output_hidden_states=True` would keep L + 1 and
change what callers get back. Each forward while attached appends one chunk; `pop()` returns everything since
the last pop concatenated along time, so a prefill done in several chunks reads as one.

Several requests may share one model, each with its own capture attached. The hooks of every capture fire on
every forward, so each capture records only the forwards of the request that attached it: the one holding the
model's gate (hsd_rag.model_gate) at `attach()` time, which is the one holding it whenever its forwards run.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from torch import nn

from hsd_rag.model_gate import gate_for

MIN_EAGLE3_LAYERS = 3  # layer L-3 must exist
LOW_LAYER = 2  # the "low" EAGLE-3 feature enters this layer


def eagle3_feature_layers(num_layers: int) -> tuple[int, int, int]:
    """Indices of the decoder layers whose inputs EAGLE-3 concatenates (low, middle, high)."""
    if num_layers < MIN_EAGLE3_LAYERS:
        raise ValueError(f"EAGLE-3 needs a target with at least {MIN_EAGLE3_LAYERS} layers, got {num_layers}.")
    return (LOW_LAYER, num_layers // 2, num_layers - 3)


def _decoder(model: nn.Module) -> nn.Module:
    """The base transformer (`model.model` for *ForCausalLM) of any HF causal LM."""
    get_decoder = getattr(model, "get_decoder", None)
    base = get_decoder() if callable(get_decoder) else None
    if base is None or not hasattr(base, "layers"):
        base = getattr(model, "model", model)
    if not hasattr(base, "layers"):
        raise TypeError(f"Cannot find the decoder layers of {type(model).__name__} (expected `.model.layers`).")
    return base


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return _decoder(model).layers


def final_norm(model: nn.Module) -> nn.Module:
    base = _decoder(model)
    norm = getattr(base, "norm", None)
    if norm is None:
        raise TypeError(f"Cannot find the final norm of {type(model).__name__} (expected `.model.norm`).")
    return norm


class FeatureCapture:
    """Hooks that record head features during every forward of `model` while attached.

    `layers`: decoder-layer indices whose *input* hidden states are concatenated in that order; None captures
    the final hidden state after the final norm instead.
    """

    def __init__(self, model: nn.Module, layers: Sequence[int] | None = None):
        self.model = model
        self.layers = None if layers is None else tuple(int(i) for i in layers)
        self._last_layer = None if self.layers is None else max(self.layers)  # runs last in a forward
        num_layers = len(decoder_layers(model))
        if self.layers is not None and not all(0 <= i < num_layers for i in self.layers):
            raise ValueError(f"feature layers {self.layers} out of range for a {num_layers}-layer model")
        self._handles: list = []
        self._chunks: list[torch.Tensor] = []  # one [B, T, F] per forward
        self._current: dict[int, torch.Tensor] = {}  # layer -> input of the forward in progress
        self._gate = gate_for(model)
        self._owner: object | None = None  # the request whose forwards this capture records

    @classmethod
    def for_eagle3(cls, model: nn.Module) -> FeatureCapture:
        return cls(model, eagle3_feature_layers(len(decoder_layers(model))))

    @classmethod
    def for_final_hidden(cls, model: nn.Module) -> FeatureCapture:
        return cls(model, None)

    @classmethod
    def for_head(cls, model: nn.Module, head) -> FeatureCapture:
        """The capture matching a head's generation (`head.kind` "eagle3" or "eagle1")."""
        return cls.for_eagle3(model) if head.kind == "eagle3" else cls.for_final_hidden(model)

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def attach(self) -> FeatureCapture:
        if self.active:
            return self
        self.clear()
        self._owner = self._gate.holder  # None outside any generation: then only ungated forwards are recorded
        if self.layers is None:
            self._handles.append(final_norm(self.model).register_forward_hook(self._on_final))
        else:
            layers = decoder_layers(self.model)
            for index in sorted(set(self.layers)):
                hook = partial(self._on_layer_input, index)
                self._handles.append(layers[index].register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def detach(self) -> None:
        """Remove the hooks. Safe while another request's forward runs (an abandoned stream is closed from any
        thread, without the gate): torch snapshots a module's hooks before calling them, and our hooks ignore
        forwards that are not their owner's anyway."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._current.clear()

    def __enter__(self) -> FeatureCapture:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def pop(self) -> torch.Tensor | None:
        """Features [B, T, F] of all forwards since the last pop (concatenated along T), or None."""
        chunks, self._chunks = self._chunks, []
        if not chunks:
            return None
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=1)

    def clear(self) -> None:
        self._chunks.clear()
        self._current.clear()

    # ---- hooks ---------------------------------------------------------------------------------------------

    def _mine(self) -> bool:
        return self._gate.holder is self._owner

    def _on_layer_input(self, index: int, module, args, kwargs) -> None:
        if not self._mine():
            return
        hidden = args[0] if args else kwargs["hidden_states"]  # [B, T, H]
        self._current[index] = hidden.detach()
        if index == self._last_layer:  # layers run in order: every wanted input of this forward is in
            first = self._current[self.layers[0]]
            parts = [self._current[i].to(first.device) for i in self.layers]
            self._chunks.append(torch.cat(parts, dim=-1))  # [B, T, len(layers) * H]
            self._current.clear()

    def _on_final(self, module, args, output) -> None:
        if not self._mine():
            return
        self._chunks.append(output.detach())  # [B, T, H]
