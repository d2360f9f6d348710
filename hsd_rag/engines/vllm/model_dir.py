"""A model directory vLLM can load, for the same targets `HybridSpecDecoder.from_pretrained` accepts.

The de-quantised default model (hsd_rag.loading's cache) keeps the GGUF `quantization_config` in its
config.json, and vLLM refuses it ("Unknown quantization method: gguf") although the weights are plain floats.
Until hsd_rag.loading writes clean directories, this module serves vLLM a sibling directory of symlinks whose
config.json lacks that key. Once loading.py writes clean dirs, `_clean_copy` can go and `vllm_model_dir` only
resolves `None` to the default snapshot.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

CONFIG_FILE = "config.json"
STALE_KEY = "quantization_config"  # what vLLM must not see for weights that are already de-quantised
STALE_METHOD = "gguf"
CLEAN_SUBDIR = ("engines", "vllm")  # under hsd_rag.loading.cache_dir()


def vllm_model_dir(model: str | os.PathLike | None) -> str:
    """A path or hub id for vLLM's `--model`: None is the embedded default; dirs are cleaned when needed."""
    from hsd_rag.loading import ModelLoadError, cache_dir, default_snapshot

    if model is None:
        source = default_snapshot()
    else:
        source = Path(os.fspath(model)).expanduser()
        if source.suffix == ".gguf":
            raise ModelLoadError(
                f"{source} is a GGUF file; vLLM's engine needs a model directory. Load it once with "
                "HybridSpecDecoder.from_pretrained and save_pretrained a float copy, or pass the original "
                "directory / hub id."
            )
        if not source.exists():
            return os.fspath(model)  # a hub id: vLLM resolves it itself
        if not (source / CONFIG_FILE).is_file():
            raise ModelLoadError(f"{source} has no {CONFIG_FILE}: pass a Hugging Face model directory.")
    config = json.loads((source / CONFIG_FILE).read_text())
    quant = config.get(STALE_KEY)
    if not isinstance(quant, dict) or quant.get("quant_method") != STALE_METHOD:
        return str(source)
    return str(_clean_copy(source, config, cache_dir().joinpath(*CLEAN_SUBDIR)))


def _clean_copy(source: Path, config: dict, root: Path) -> Path:
    """Symlinks to every file of `source` except config.json, which is rewritten without the GGUF key.

    Keyed by the source's path and config so a re-created snapshot gets a fresh copy; written to a temporary
    name and renamed, so concurrent servers never see half a directory.
    """
    clean_config = {k: v for k, v in config.items() if k != STALE_KEY}
    key = hashlib.sha256((str(source.resolve()) + json.dumps(config, sort_keys=True)).encode()).hexdigest()[:12]
    target = root / f"{source.name}-{key}"
    if (target / CONFIG_FILE).is_file():
        return target
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for entry in source.iterdir():
        if entry.name != CONFIG_FILE:
            (tmp / entry.name).symlink_to(entry.resolve())
    (tmp / CONFIG_FILE).write_text(json.dumps(clean_config, indent=2))
    try:
        tmp.rename(target)
    except OSError:  # another process made it first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return target
