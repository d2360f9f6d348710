"""A call's sampling settings, filled in from the checkpoint's `generation_config` exactly where HF `generate` would.

Priority, as in `GenerationMixin._prepare_generation_config`: the call's argument, then `model.generation_config`,
then HF's global defaults (`do_sample=False`, `temperature=1.0`, `top_k=50`, `top_p=1.0`, no `min_p`,
`repetition_penalty=1.0`). One convenience of our API stays: an explicit `temperature > 0` implies
`do_sample=True` and an explicit `temperature=0` means greedy.

Any generation_config setting that would make `generate` decode differently and that hsd_rag does not implement
(beam search, n-gram blocking, typical-p, ...) raises a ValueError naming it: never a silent difference.
"""

from __future__ import annotations

from typing import Any

from hsd_rag.config import DecodeConfig

# HF's global defaults for the settings we honour (GenerationConfig._get_default_generation_params).
HF_DEFAULTS: dict[str, Any] = {
    "do_sample": False,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "min_p": None,
    "repetition_penalty": 1.0,
}

# generate() settings hsd_rag does not implement: name -> (what it does, is it active for this value?).
# `sampling_only` ones act only when sampling, as in HF's `_get_logits_processor`.
_ALWAYS: dict[str, tuple[str, Any]] = {
    "num_beams": ("beam search", lambda v: v > 1),
    "num_return_sequences": ("several sequences per prompt", lambda v: v > 1),
    "penalty_alpha": ("contrastive search", lambda v: v is not None and v > 0),
    "dola_layers": ("DoLa decoding", lambda v: v is not None),
    "guidance_scale": ("classifier-free guidance", lambda v: v != 1),
    "sequence_bias": ("sequence bias", lambda v: bool(v)),
    "no_repeat_ngram_size": ("n-gram blocking", lambda v: v > 0),
    "bad_words_ids": ("banned words", lambda v: bool(v)),
    "min_new_tokens": ("a minimum output length", lambda v: v > 0),
    "forced_eos_token_id": ("a forced end-of-sequence token", lambda v: v is not None),
    "exponential_decay_length_penalty": ("a length penalty", lambda v: v is not None),
    "suppress_tokens": ("suppressed tokens", lambda v: bool(v)),
    "begin_suppress_tokens": ("suppressed first tokens", lambda v: bool(v)),
    "watermarking_config": ("watermarking", lambda v: v is not None),
    "stop_strings": ("stop strings (pass stop=[...] to hsd_rag instead)", lambda v: bool(v)),
}
_SAMPLING_ONLY: dict[str, tuple[str, Any]] = {
    "top_h": ("top-H sampling", lambda v: v is not None),
    "typical_p": ("typical sampling", lambda v: v < 1.0),
    "epsilon_cutoff": ("epsilon sampling", lambda v: 0.0 < v < 1.0),
    "eta_cutoff": ("eta sampling", lambda v: 0.0 < v < 1.0),
}
UNSUPPORTED_GENERATE_SETTINGS = frozenset({*_ALWAYS, *_SAMPLING_ONLY, "min_length", "forced_bos_token_id"})


def _configured(generation_config, name: str):
    """The checkpoint's value, else HF's global default (None when neither sets it)."""
    value = getattr(generation_config, name, None) if generation_config is not None else None
    return HF_DEFAULTS.get(name) if value is None else value


def resolve(config: DecodeConfig, generation_config, prompt_length: int | None = None) -> DecodeConfig:
    """A copy of `config` with every sampling setting decided; raises ValueError for unsupported settings."""
    explicit = config.model_fields_set
    temperature = config.temperature if "temperature" in explicit else None
    do_sample = config.do_sample
    if do_sample is None:
        do_sample = temperature > 0 if temperature is not None else bool(_configured(generation_config, "do_sample"))
    if not do_sample:
        values = dict(do_sample=False, temperature=0.0)
    else:
        if temperature is None:
            temperature = _configured(generation_config, "temperature")
        if not temperature or temperature <= 0:
            source = "temperature" if "temperature" in explicit else "generation_config.temperature"
            raise ValueError(
                f"{source}={temperature!r} with do_sample=True: sampling needs a temperature > 0 "
                "(pass temperature=0 or do_sample=False for greedy decoding)."
            )
        values = dict(do_sample=True, temperature=float(temperature))
    for name in ("top_k", "top_p", "min_p", "repetition_penalty"):
        value = getattr(config, name)
        values[name] = _configured(generation_config, name) if value is None else value
    values["min_p"] = values["min_p"] or 0.0
    check_supported(generation_config, do_sample, prompt_length)
    return config.model_copy(update=values)


def check_supported(generation_config, do_sample: bool, prompt_length: int | None = None) -> None:
    """Raise ValueError if generation_config asks `generate` for something hsd_rag would not do the same
    (settings that act only for some prompt lengths are checked once `prompt_length` is known)."""
    if generation_config is None:
        return
    active = dict(_ALWAYS, **(_SAMPLING_ONLY if do_sample else {}))
    for name, (what, is_active) in active.items():
        value = getattr(generation_config, name, None)
        if value is not None and is_active(value):
            _refuse(name, value, what)
    if prompt_length is None:
        return
    eos = getattr(generation_config, "eos_token_id", None)
    min_length = getattr(generation_config, "min_length", None) or 0
    if eos is not None and min_length > prompt_length:  # HF suppresses EOS until the sequence is this long
        _refuse("min_length", min_length, "a minimum sequence length")
    forced_bos = getattr(generation_config, "forced_bos_token_id", None)
    if forced_bos is not None and prompt_length == 1:  # HF forces the first generated token after a 1-token input
        _refuse("forced_bos_token_id", forced_bos, "a forced first token")


def _refuse(name: str, value, what: str) -> None:
    raise ValueError(
        f"The model's generation_config sets {name}={value!r} ({what}), which hsd_rag does not implement: "
        f"`model.generate` would apply it, so the outputs would differ. Unset it "
        f"(`model.generation_config.{name} = None`) or use `model.generate` for this model."
    )
