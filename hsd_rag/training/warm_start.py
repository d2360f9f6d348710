"""Start training from an existing EAGLE-3 head instead of a fresh one (e.g. to teach an English head new languages).

Everything but the vocabulary-specific tensors is copied as is. The new run chooses its own draft vocabulary from its
own data, so `lm_head` rows are copied only for the target tokens both vocabularies hold. A new token's row cannot
simply be the target's output embedding (`init_from_target`'s start): training moved the shared rows away from
theirs (the final `norm` changed too), and raw target rows then outscore every trained one. So the new rows are the
target's rows under the least-squares linear map that takes the shared tokens' target rows to their trained ones.
A saved head reads raw target features (training's feature scale is folded into `fc`), so the trainer multiplies
the scale back into `fc` once it has measured it (`UnrolledHead.unfold_feature_scale`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from hsd_rag.heads.checkpoint import HeadCheckpointError, detect_kind, read_checkpoint, resolve_checkpoint_dir
from hsd_rag.heads.eagle3 import Eagle3Head
from hsd_rag.loading import shipped_head_dir

VOCAB_KEYS = frozenset({"lm_head.weight", "d2t", "t2d"})  # tied to the draft vocabulary, copied row by row
SKIPPED_KEYS = frozenset({"embed_tokens.weight"})  # the target's embedding, never a head parameter here


@torch.no_grad()
def warm_start(head: Eagle3Head, source: str | Path, target_rows: torch.Tensor | None = None) -> int:
    """Copy the head saved at `source` (folder, hub id, or "auto" = the shipped head of the default target) into
    `head`; returns how many `lm_head` rows the two draft vocabularies share.

    `target_rows` [vocab, H]: the target's output embedding, from which rows of tokens the saved head lacks are
    mapped (None, or no shared row to fit the map on, leaves those rows as they are)."""
    directory = _shipped_head() if str(source) == "auto" else resolve_checkpoint_dir(source)
    _, state = read_checkpoint(directory)
    if detect_kind(state) != "eagle3":
        raise HeadCheckpointError(
            f"{directory} holds an EAGLE-1/2 head; training continues only from an EAGLE-3 head "
            "(drop init_head to train one from scratch)."
        )
    own = head.state_dict()
    copied = {key: value for key, value in state.items() if key not in VOCAB_KEYS | SKIPPED_KEYS}
    missing = sorted(set(own) - VOCAB_KEYS - set(copied))
    wrong = [
        f"{key} {tuple(value.shape)} (this target's head needs {tuple(own[key].shape)})"
        for key, value in copied.items()
        if key in own and value.shape != own[key].shape
    ]
    unknown = sorted(set(copied) - set(own))
    vocab = state["t2d"].numel() if "t2d" in state else None
    if vocab is not None and vocab != head.vocab_size:
        wrong.append(f"t2d ({vocab} target tokens; this target has {head.vocab_size})")
    if missing or wrong or unknown or "d2t" not in state:
        problems = [f"missing {', '.join(missing)}"] if missing else []
        problems += [f"wrong shape {', '.join(wrong)}"] if wrong else []
        problems += [f"unexpected {', '.join(unknown)}"] if unknown else []
        problems += ["no d2t vocabulary map"] if "d2t" not in state else []
        raise HeadCheckpointError(
            f"Cannot start training from the head in {directory}: {'; '.join(problems)}. "
            "init_head must be an EAGLE-3 head trained for this same target."
        )
    for key, value in copied.items():
        own[key].copy_(value.to(own[key].dtype))
    source_ids = torch.arange(state["d2t"].numel()) + state["d2t"]
    target_ids = (torch.arange(head.d2t.numel(), device=head.d2t.device) + head.d2t).cpu()
    row_of = torch.full((head.vocab_size,), -1, dtype=torch.long)
    row_of[source_ids] = torch.arange(source_ids.numel())
    source_rows = row_of[target_ids]
    shared = source_rows >= 0
    weight = head.lm_head.weight
    trained = state["lm_head.weight"][source_rows[shared]].double()
    weight[shared.nonzero().squeeze(1).to(weight.device)] = trained.to(weight.device, weight.dtype)
    new = (~shared).nonzero().squeeze(1)
    if target_rows is not None and new.numel() and shared.any():
        rows = target_rows.detach().double().cpu()
        mapping = torch.linalg.lstsq(rows[target_ids[shared]], trained).solution  # [H, H]
        weight[new.to(weight.device)] = (rows[target_ids[new]] @ mapping).to(weight.device, weight.dtype)
    return int(shared.sum())


def _shipped_head() -> Path:
    directory = shipped_head_dir()
    if directory is None:
        raise HeadCheckpointError(
            'init_head="auto" names the head shipped for the default target, and this install has none: '
            "pass the folder or hub id of the head to start from."
        )
    return directory
