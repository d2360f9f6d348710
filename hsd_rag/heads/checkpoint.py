"""Load and save EAGLE heads in the official layout: `config.json` + `model.safetensors` or `pytorch_model.bin`.

The generation is detected from the weight names (`midlayer.*` is EAGLE-3, `layers.*` EAGLE-1/2), and every
mismatch with the target (hidden size, vocabulary, missing / unexpected / mis-shaped tensors) is refused with a
`HeadCheckpointError` naming it, because a head trained for another model loads silently into garbage drafts.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from hsd_rag.heads.acceptance_priors import AcceptancePriors
from hsd_rag.heads.base import DraftHead
from hsd_rag.heads.eagle1 import Eagle1Head
from hsd_rag.heads.eagle3 import Eagle3Head
from hsd_rag.kernels import (
    fuse_projections,
    fuse_rms_norms,
    fused_rms_norm_count,
    pack_linears,
    packed_linear_count,
)
from hsd_rag.kernels.int8_linear import int8_linears

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
BIN_NAME = "pytorch_model.bin"
EAGLE3_PREFIX = "midlayer."
EAGLE1_PREFIX = "layers."
EAGLE3_ARCHITECTURE = "LlamaForCausalLMEagle3"
EAGLE1_ARCHITECTURE = "LlamaForCausalLM"
# Some checkpoints carry a copy of the target embedding; heads borrow the target's own, so it is skipped.
IGNORED_KEYS = frozenset({"embed_tokens.weight"})
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
MAX_LISTED = 8  # keys named per problem in an error message


class HeadCheckpointError(ValueError):
    """An EAGLE head checkpoint that cannot be used with this target (the message says why and what to do)."""


# ---- locating and reading --------------------------------------------------------------------------------


def resolve_checkpoint_dir(path_or_hub_id: str | Path) -> Path:
    """A local folder as is; otherwise a Hugging Face Hub repository id, downloaded (config and weights only)."""
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise HeadCheckpointError(f"{path} is a file: pass the folder that holds {CONFIG_NAME} and the weights.")
    name = str(path_or_hub_id)
    if not HUB_ID.match(name):
        raise HeadCheckpointError(f"No EAGLE head folder at {path} (and {name!r} is not a Hub repository id).")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=[CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME]))
    except Exception as err:  # network, auth, missing repo: all end the same way for the caller
        raise HeadCheckpointError(
            f"There is no local folder {name!r} and downloading it from the Hugging Face Hub failed "
            f"({type(err).__name__}: {err}). On an offline machine, download the repository elsewhere "
            f"({CONFIG_NAME} and {SAFETENSORS_NAME} or {BIN_NAME}) and pass its local folder."
        ) from err


def read_checkpoint(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, state dict on the CPU) of a head folder."""
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise HeadCheckpointError(f"{directory} has no {CONFIG_NAME}; an EAGLE head folder needs one.")
    config = json.loads(config_path.read_text())
    if (directory / SAFETENSORS_NAME).is_file():
        from safetensors.torch import load_file

        state = load_file(str(directory / SAFETENSORS_NAME), device="cpu")
    elif (directory / BIN_NAME).is_file():
        state = torch.load(directory / BIN_NAME, map_location="cpu", weights_only=True)
    else:
        raise HeadCheckpointError(f"{directory} has neither {SAFETENSORS_NAME} nor {BIN_NAME}.")
    return config, state


def detect_kind(state: dict[str, torch.Tensor]) -> str:
    """The head generation, "eagle3" or "eagle1", from the parameter names."""
    if any(key.startswith(EAGLE3_PREFIX) for key in state):
        return "eagle3"
    if any(key.startswith(EAGLE1_PREFIX) for key in state):
        return "eagle1"
    listed = ", ".join(sorted(state)[:MAX_LISTED])
    raise HeadCheckpointError(
        f"Not an EAGLE head: expected `{EAGLE3_PREFIX}*` (EAGLE-3) or `{EAGLE1_PREFIX}*` (EAGLE-1/2) weights, "
        f"found {listed}."
    )


# ---- loading -----------------------------------------------------------------------------------------------


def load_head(
    path_or_hub_id: str | Path,
    target_model: nn.Module,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> DraftHead:
    """Load an EAGLE-3 or EAGLE-1/2 head for `target_model`, checked against it, bound to its embedding.

    device defaults to the target's input embedding's device, dtype to the target's dtype, except that an EAGLE-3
    head of a float32 target on a CPU with native bf16 matmuls runs in bfloat16: a head's precision only changes
    which drafts it proposes, never the output (the target verifies every draft), and its drafting costs ~30 %
    less time there (SmolLM2 head, 18.6 -> 13.4 ms per step, τ unchanged). On a CPU without them, a head left
    in float32 multiplies with int8 weights when the target runs on the fast CPU kernels (hsd_rag.kernels).
    """
    directory = resolve_checkpoint_dir(path_or_hub_id)
    config_dict, state = read_checkpoint(directory)
    kind = detect_kind(state)
    state = {key: value for key, value in state.items() if key not in IGNORED_KEYS}
    config = _config_from_dict(config_dict, state, kind)
    _check_target(config, target_model, directory)

    with torch.device("meta"):  # shapes only: the real tensors come from the checkpoint
        head = Eagle3Head(config) if kind == "eagle3" else Eagle1Head(config, fc_bias="fc.bias" in state)
    _check_keys(head, state, directory)
    head.load_state_dict(state, strict=True, assign=True)
    head.rotary_emb = LlamaRotaryEmbedding(config)  # built on meta above; RoPE has no saved state
    if kind == "eagle3":
        _check_vocab_map(head, directory)
    embedding = target_model.get_input_embeddings()
    device = torch.device(device or embedding.weight.device)
    if dtype is None:
        cpu_fp32 = kind == "eagle3" and device.type == "cpu" and embedding.weight.dtype == torch.float32
        dtype = (_cpu_draft_dtype() if cpu_fp32 else None) or embedding.weight.dtype
    head = head.to(device=device, dtype=dtype)
    head.acceptance_priors = AcceptancePriors.load(directory)  # None when the head ships no priors
    if packed_linear_count(target_model):  # the head runs on fast kernels when the target does
        # an fp32 head on a CPU: int8 weights (hsd_rag.kernels.int8_linear); a bf16 one: packed weights
        if not int8_linears(head) and pack_linears(head):
            fuse_projections(head)
    if fused_rms_norm_count(target_model):
        fuse_rms_norms(head)
    return head.bind_target(target_model).eval()


def _cpu_draft_dtype() -> torch.dtype | None:
    """bfloat16 where this CPU multiplies it natively (oneDNN with AVX512-BF16/AMX), else None (keep the target's)."""
    try:
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else None
    except (AttributeError, RuntimeError):
        return None


def _config_from_dict(config_dict: dict, state: dict[str, torch.Tensor], kind: str) -> LlamaConfig:
    fields = dict(config_dict)
    if kind == "eagle3" and not fields.get("draft_vocab_size") and "d2t" in state:
        fields["draft_vocab_size"] = state["d2t"].shape[0]
    target_hidden = fields.get("target_hidden_size")
    if target_hidden is not None and target_hidden != fields.get("hidden_size"):
        raise HeadCheckpointError(
            f"This head reads {target_hidden}-wide target features into a {fields.get('hidden_size')}-wide layer "
            "(`target_hidden_size`); heads narrower than their target are not supported."
        )
    return LlamaConfig(**fields)


def _check_target(config: LlamaConfig, target: nn.Module, directory: Path) -> None:
    target_config = target.config.get_text_config() if hasattr(target.config, "get_text_config") else target.config
    name = getattr(target_config, "_name_or_path", "") or type(target).__name__
    problems = []
    if config.hidden_size != target_config.hidden_size:
        problems.append(f"hidden size {config.hidden_size} vs the target's {target_config.hidden_size}")
    if config.vocab_size != target_config.vocab_size:
        problems.append(f"vocabulary size {config.vocab_size} vs the target's {target_config.vocab_size}")
    if problems:
        raise HeadCheckpointError(
            f"The EAGLE head in {directory} was trained for a different target model than {name}: "
            + "; ".join(problems)
            + ". Use a head trained for this target (or train one with hsd_rag.training)."
        )


def _check_keys(head: DraftHead, state: dict[str, torch.Tensor], directory: Path) -> None:
    expected = {key: tuple(value.shape) for key, value in head.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mis_shaped = [
        f"{key} {tuple(state[key].shape)} (expected {expected[key]})"
        for key in sorted(set(expected) & set(state))
        if tuple(state[key].shape) != expected[key]
    ]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mis_shaped)):
        if items:
            more = f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
            problems.append(f"{label}: " + ", ".join(items[:MAX_LISTED]) + more)
    if problems:
        raise HeadCheckpointError(
            f"The {head.kind} head in {directory} does not match its {CONFIG_NAME}: "
            + "; ".join(problems)
            + f". Check that {CONFIG_NAME} belongs to these weights (an official EAGLE checkpoint, or one written "
            "by hsd_rag.heads.save_head) and that the head was trained for this target."
        )


def _check_vocab_map(head: Eagle3Head, directory: Path) -> None:
    target_ids = torch.arange(head.d2t.shape[0]) + head.d2t
    if target_ids.numel() and (target_ids.min() < 0 or target_ids.max() >= head.vocab_size):
        raise HeadCheckpointError(
            f"The d2t map in {directory} points outside the target vocabulary (size {head.vocab_size})."
        )


# ---- saving ------------------------------------------------------------------------------------------------


def save_head(head: DraftHead, directory: str | Path, safe_serialization: bool = True) -> Path:
    """Write `config.json` plus `model.safetensors` (or `pytorch_model.bin`) in the official layout."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu().contiguous() for key, value in head.state_dict().items()}
    (directory / CONFIG_NAME).write_text(json.dumps(config_dict(head), indent=2) + "\n")
    if safe_serialization:
        from safetensors.torch import save_file

        save_file(state, str(directory / SAFETENSORS_NAME), metadata={"format": "pt"})
    else:
        torch.save(state, directory / BIN_NAME)
    return directory


def config_dict(head: DraftHead) -> dict:
    """LlamaConfig-style fields as in the official head configs (legacy `rope_theta` / `rope_scaling`)."""
    config = head.config
    rope = dict(config.rope_parameters or {})
    rope_theta = rope.pop("rope_theta", None)
    rope_scaling = None if rope.get("rope_type", "default") == "default" else rope
    out = {
        "architectures": [EAGLE3_ARCHITECTURE if head.kind == "eagle3" else EAGLE1_ARCHITECTURE],
        "model_type": "llama",
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "num_hidden_layers": config.num_hidden_layers,
        "hidden_act": config.hidden_act,
        "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_position_embeddings,
        "rope_theta": rope_theta,
        "rope_scaling": rope_scaling,
        "attention_bias": config.attention_bias,
        "vocab_size": config.vocab_size,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "tie_word_embeddings": False,
        "torch_dtype": str(next(head.parameters()).dtype).removeprefix("torch."),
    }
    if head.kind == "eagle3":
        out["draft_vocab_size"] = head.draft_vocab_size
    else:
        out["bias"] = head.fc.bias is not None
    return out
