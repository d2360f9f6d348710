"""Decoding settings, validated once so bad values fail early with the offending value named."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from hsd_rag.constrain.formats import ResponseFormatSetting

Method = Literal["vanilla", "ngram", "eagle", "hybrid", "hybrid-fixed"]
METHODS: tuple[str, ...] = ("vanilla", "ngram", "eagle", "hybrid", "hybrid-fixed")


class DecodeConfig(BaseModel):
    """Per-call generation settings (the same names as the public `generate` keyword arguments).

    Sampling settings left as None take the model's `generation_config` value and then HF's global default,
    exactly as `model.generate` does (`hsd_rag.generation_defaults.resolve` fills them in per call).
    """

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(128, gt=0)
    """Upper bound on generated tokens (the answer stops earlier at end-of-turn or a stop string). Not read from
    generation_config (HF's own default there is max_length=20, prompt included)."""
    do_sample: bool | None = None
    """Sample (True) or decode greedily (False); None: `temperature > 0` if given, else generation_config."""
    temperature: float | None = Field(None, ge=0.0)
    """0 means greedy (token-identical to `generate(do_sample=False)`); > 0 samples losslessly (and implies
    do_sample=True). None: generation_config's (HF default 1.0 when sampling)."""
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    """Nucleus sampling mass, as HF's TopPLogitsWarper (sampling only). None: generation_config's (HF: 1.0)."""
    top_k: int | None = Field(None, ge=0)
    """Keep the k most likely tokens, as HF's TopKLogitsWarper; 0 disables (sampling only). None:
    generation_config's (HF default 50)."""
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    """Drop tokens below min_p x the top token's probability, as HF's MinPLogitsWarper (sampling only)."""
    repetition_penalty: float | None = Field(None, gt=0.0)
    """HF's RepetitionPenaltyLogitsProcessor over prompt + output, greedy and sampled (1.0 disables)."""
    method: Method = "ngram"
    """Draft source(s): "vanilla" (no drafts), "ngram", "eagle", "hybrid" (adaptive fusion), "hybrid-fixed"."""
    budget: int | Literal["auto"] = "auto"
    """Draft tokens verified per target forward (tree nodes besides the root). "auto" sizes every tree by
    expected tokens per second on this device (`hsd-rag tune` measures it; hsd_rag.budget explains the rule)."""
    stop: list[str] | None = None
    """Stop strings: generation ends when one appears; the returned text ends before it."""
    seed: int | None = None
    """Seed for sampling (None draws from torch's global generator state)."""
    answer_history: bool = True
    """Draft from this decoder's earlier answers too (never other requests' prompts or documents), and remember
    this answer for later requests. False keeps the request fully isolated."""
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
        """True for greedy decoding (a resolved config has temperature 0 exactly then)."""
        return self.do_sample is False or self.temperature == 0.0
