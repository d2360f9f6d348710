"""`hsd-rag train-head`: train an EAGLE-3 head for a target (the embedded default model unless told otherwise).

Wired into `hsd_rag/cli.py` with `add_parser(subparsers)`; `run(args)` returns the exit status. Every
`TrainConfig` / `RecipeConfig` field is a flag (`--steps`, `--lr`, `--draft-vocab-size`, ...).
"""

from __future__ import annotations

import argparse
import json
import time
import types
import typing
from pathlib import Path

from hsd_rag.training.config import RecipeConfig, TrainConfig

RECIPE_PREFIX = "recipe_"  # recipe flags are spelled --recipe-<field> to keep the two configs apart


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train-head",
        help="train an EAGLE-3 draft head for a target model",
        description=(
            "Train an EAGLE-3 head with the training-time test. Without --data the built-in offline recipe is "
            "used (RAG prompts of the benchmark train split + general instructions, answered by the target)."
        ),
    )
    p.add_argument(
        "--target", default=None, help="hub id, local dir or .gguf (default: embedded SmolLM2-135M)"
    )
    p.add_argument("--target-dtype", default=None, help="dtype of the target model (default: per device)")
    p.add_argument("--data", default=None, help="jsonl of conversations {messages: [...]} (default: recipe)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    _add_config_flags(p, TrainConfig, "")
    _add_config_flags(p, RecipeConfig, RECIPE_PREFIX)
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    import torch

    from hsd_rag import HybridSpecDecoder
    from hsd_rag.training import train_head

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    config = TrainConfig(**_collect(args, TrainConfig, ""))
    decoder = HybridSpecDecoder.from_pretrained(
        args.target, head=None, device=config.device, dtype=args.target_dtype
    )
    recipe = RecipeConfig(**_collect(args, RecipeConfig, RECIPE_PREFIX))
    train_head(decoder, config=config, conversations=args.data, recipe=recipe)
    report_path = Path(config.output_dir) / "train_report.json"
    if report_path.exists():
        report = json.loads(report_path.read_text())
        last = report["history"][-1] if report["history"] else {}
        print(
            f"head: {config.output_dir}  conversations: {report['train_conversations']} train / "
            f"{report['eval_conversations']} eval  steps: {report['steps']}  "
            f"draft vocab: {report['draft_vocab_size']} (eval answer coverage {report['eval_answer_coverage']})"
        )
        if last:
            print("eval top-1 by depth: " + " ".join(f"{a:.3f}" for a in last["eval_top1_by_depth"]))
    print(f"wall time: {time.perf_counter() - started:.0f} s")
    return 0


# ---- pydantic fields as flags --------------------------------------------------------------------------------


def _add_config_flags(parser: argparse.ArgumentParser, model, prefix: str) -> None:
    group = parser.add_argument_group(model.__name__)
    for name, field in model.model_fields.items():
        flag = "--" + (prefix + name).replace("_", "-")
        doc = (field.description or "").split(". ")[0]
        help_text = f"{doc} (default: {field.default})".replace("%", "%%")
        dest = prefix + name
        kind = _base_type(field.annotation)
        if kind is bool:
            group.add_argument(
                flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        elif kind in (list, tuple):
            group.add_argument(flag, dest=dest, nargs="+", default=None, help=help_text)
        else:
            group.add_argument(flag, dest=dest, type=_parser(kind), default=None, help=help_text)


def _base_type(annotation):
    """The one non-None type of `X | None`, or the annotation's origin (list, tuple, Literal -> str)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return str
    return origin or annotation


def _parser(kind):
    if kind in (int, float, str):
        return kind
    return str  # Path and other types are validated by pydantic from the string


def _collect(args, model, prefix: str) -> dict:
    """The flags the user gave (None = keep the config's default)."""
    return {
        name: value
        for name in model.model_fields
        if (value := getattr(args, prefix + name, None)) is not None
    }


def main(argv: list[str] | None = None) -> int:
    """`python -m hsd_rag.training.cli train-head ...` (the same as `hsd-rag train-head ...`)."""
    parser = argparse.ArgumentParser(prog="hsd-rag")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
