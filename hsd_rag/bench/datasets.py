"""Benchmark prompt sets: the built-in offline RAG sets (held-out split only) and any jsonl file."""

from __future__ import annotations

from pathlib import Path

from hsd_rag.bench.runner import BenchCase

# Prompts whose id hashes below this fraction are reserved for benchmarks; EAGLE head training uses the rest.
HELDOUT_FRACTION = 0.25
BUILTIN_PREFIX = "builtin-"


def load_cases(name: str, limit: int | None = None) -> list[BenchCase]:
    """`builtin-en` / `builtin-fr` / `builtin-es` (held-out prompts only) or a path to a jsonl file."""
    from hsd_rag.data import format_messages, load_builtin, load_jsonl, split

    if name.startswith(BUILTIN_PREFIX):
        lang = name[len(BUILTIN_PREFIX) :]
        _, examples = split(load_builtin(lang), HELDOUT_FRACTION)
    elif Path(name).suffix == ".jsonl":
        examples = load_jsonl(name)
    else:
        raise ValueError(f"Unknown dataset {name!r}: use builtin-en, builtin-fr, builtin-es or a .jsonl file.")
    if limit is not None:
        examples = examples[:limit]
    return [BenchCase(e.id, name, format_messages(e), list(e.documents)) for e in examples]
