"""`hsd-rag train-head`: train an EAGLE-3 head for a target (the embedded default model unless told otherwise).

Wired into `hsd_rag/cli.py` with `add_parser(subparsers)`; `run(args)` returns the exit status. Every
`TrainConfig` / `RecipeConfig` field is a flag (`--steps`, `--lr`, `--draft-vocab-size`, ...).
`hsd-rag eval-head` (`add_eval_parser`) judges a head on the held-out benchmark prompts, the numbers the docs quote.
"""

from __future__ import annotations

import argparse
import json
import time
import types
import typing
from pathlib import Path

from hsd_rag.training.config import JUDGED_HELDOUT_PROMPTS, RecipeConfig, TrainConfig

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


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval-head",
        help="held-out τ of EAGLE decoding and teacher-forced top-1 per depth of a head",
        description=(
            "Greedy EAGLE decoding of held-out benchmark prompts (never used by the training recipe): τ = "
            "generated tokens / target forwards, how deep the accepted paths reach, and the head's "
            "teacher-forced top-1 agreement with the target per draft depth on those answers."
        ),
    )
    p.add_argument("--target", default=None, help="hub id, local dir or .gguf (default: embedded SmolLM2-135M)")
    p.add_argument("--head", default="auto", help="head dir or hub id ('auto' = the head shipped for the target)")
    p.add_argument("--lang", default="en", choices=["en", "fr", "es"], help="built-in held-out prompt set")
    p.add_argument(
        "--limit", type=int, default=JUDGED_HELDOUT_PROMPTS,
        help="number of held-out prompts (default: all those benchmarks draw from, which no training recipe and no "
             "acceptance prior uses; fewer judge a head on a small, noisy sample)",
    )
    p.add_argument("--budget", type=int, default=16, help="draft budget (tree size) of the EAGLE decoding")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--method", default="eagle", help="decoding method whose τ is measured")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="also write the numbers to this json file")
    p.add_argument(
        "--write-priors", type=int, default=0, metavar="N",
        help="instead: measure acceptance priors (per depth x head-probability bucket) on N held-out prompts per "
             "language of --priors-languages, taken after the first 50 that benchmarks use, and write "
             "acceptance_priors.json into the head directory",
    )
    p.add_argument("--priors-languages", nargs="+", default=["en", "fr", "es"], choices=["en", "fr", "es"])
    p.set_defaults(func=run_eval)
    return p


def run_eval(args) -> int:
    import torch

    from hsd_rag import HybridSpecDecoder
    from hsd_rag.training.evaluate import depth_accuracy, heldout_rag_conversations, measure_tau

    if args.head in (None, "none"):
        raise ValueError("eval-head judges an EAGLE head: pass --head DIR (or 'auto' for the shipped one).")
    if args.threads:
        torch.set_num_threads(args.threads)
    decoder = HybridSpecDecoder.from_pretrained(args.target, head=args.head)
    if decoder.head is None:
        raise ValueError(f"No EAGLE head to judge for {args.target or 'the default target'}: pass --head DIR.")
    if args.write_priors:
        return _write_priors(args, decoder)
    prompts = heldout_rag_conversations(args.limit, args.lang)
    report = measure_tau(decoder, prompts, args.budget, args.max_new_tokens, args.method)
    top1 = depth_accuracy(decoder, decoder.head, report.conversations).accuracy()
    numbers = {
        "head": str(args.head),
        "lang": args.lang,
        "prompts": report.prompts,
        "budget": args.budget,
        "method": args.method,
        "new_tokens": report.new_tokens,
        "forwards": report.steps,
        "tau": round(report.tau, 3),
        "reach_by_depth": [round(x, 3) for x in report.reach()],
        "top1_by_depth": [round(x, 3) for x in top1],
    }
    print(
        f"held-out {args.lang}: {report.prompts} prompts, {report.new_tokens} tokens, {report.steps} forwards, "
        f"τ({args.method}, budget {args.budget}) = {report.tau:.2f}"
    )
    print("steps accepting ≥ d drafts, d = 1..: " + " ".join(f"{x:.3f}" for x in numbers["reach_by_depth"]))
    print("teacher-forced top-1 by depth 1..: " + " ".join(f"{x:.3f}" for x in numbers["top1_by_depth"]))
    if args.json:
        Path(args.json).write_text(json.dumps(numbers, indent=2) + "\n")
    return 0


def _write_priors(args, decoder) -> int:
    from hsd_rag.heads.checkpoint import resolve_checkpoint_dir
    from hsd_rag.loading import shipped_head_dir
    from hsd_rag.training.evaluate import PRIORS_OFFSET, heldout_rag_conversations, measure_priors

    directory = shipped_head_dir() if args.head == "auto" else resolve_checkpoint_dir(args.head)
    prompts = [c for lang in args.priors_languages
               for c in heldout_rag_conversations(args.write_priors, lang, offset=PRIORS_OFFSET)]
    source = (f"hsd-rag eval-head --write-priors {args.write_priors} --priors-languages "
              f"{' '.join(args.priors_languages)} --budget {args.budget} (held-out prompts {PRIORS_OFFSET}+)")
    priors = measure_priors(decoder, prompts, args.budget, args.max_new_tokens, source)
    path = priors.save(directory)
    print(f"acceptance per depth (decided drafts, all head-probability buckets), from {len(prompts)} prompts:")
    for depth, (acc, ver) in enumerate(zip(priors.accepted, priors.verified, strict=True), start=1):
        if sum(ver):
            print(f"  depth {depth}: {sum(acc)}/{sum(ver)} = {sum(acc) / sum(ver):.3f}")
    print(f"written to {path}")
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
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_parser(subparsers)
    add_eval_parser(subparsers)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
