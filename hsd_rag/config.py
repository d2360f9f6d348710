"""Decoding settings, validated once so bad values fail early with the offending value named."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from hsd_rag.constrain.formats import ResponseFormatSetting

Method = Literal["vanilla", "ngram", "eagle", "hybrid", "hybrid-fixed"]
METHODS: tuple[str, ...] = ("vanilla", "ngram", "eagle", "hybrid", "hybrid-fixed")


class DecodeConfig(BaseModel):
    """Per-call generation settings (the same names as the public `generate` keyword arguments)."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(128, gt=0)
    """Upper bound on generated tokens (the answer stops earlier at end-of-turn or a stop string)."""
    temperature: float = Field(0.0, ge=0.0)
    """0 means greedy (token-identical to `generate(do_sample=False)`); > 0 samples losslessly."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling mass, applied as HF's TopPLogitsWarper (only when sampling)."""
    top_k: int = Field(0, ge=0)
    """Keep the k most likely tokens, as HF's TopKLogitsWarper; 0 disables (only when sampling)."""
    method: Method = "ngram"
    """Draft source(s): "vanilla" (no drafts), "ngram", "eagle", "hybrid" (adaptive fusion), "hybrid-fixed"."""
    budget: int | Literal["auto"] = "auto"
    """Draft tokens verified per target forward (tree nodes besides the root). "auto" sizes every tree by
    expected tokens per second on this device (`hsd-rag tune` measures it; hsd_rag.budget explains the rule)."""
    stop: list[str] | None = None
    """Stop strings: generation ends when one appears; the returned text ends before it."""
    seed: int | None = None
    """Seed for sampling (None draws from torch's global generator state)."""
    response_format: ResponseFormatSetting = None
    """Constrain the output (hsd_rag.constrain): a JSON schema / pydantic model / TypedDict, "json_object", or
    {"type": "regex" | "grammar" | "structural_tag", ...}. Still lossless: the same as the target decoding alone
    under the same constraint. None: free text."""

    @field_validator("budget")
    @classmethod
    def _budget_non_negative(cls, value):
        if isinstance(value, int) and value < 0:
            raise ValueError(f"budget must be >= 0 or 'auto', got {value}")
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value):
        if isinstance(value, str):
            return [value]
        return value

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
