"""Benchmark prompt sets by name: the built-in offline RAG sets, jsonl files, and public sets from the hub.

Names:
- `builtin-en` / `builtin-fr` / `builtin-es`: offline FanOutQA + Wikipedia prompts, held-out split only (EAGLE
  head training uses the rest);
- a path ending in `.jsonl` (format: hsd_rag.data.jsonl);
- `ragbench:<subset>`: one of RAGBench's 12 subsets, documents capped to 2,800 tokens (hub_datasets);
- `mmarco:<lang>`: mMARCO, 1 relevant + 9 BM25-ranked passages per query, 14 languages (mmarco);
- `specbench-rag`: Spec-Bench's RAG category; `mtbench`: MT-bench first turns, a non-RAG control (hub_datasets);
- `structured-en` / `-fr` / `-es`: the built-in prompts answered as JSON under a schema (bench.structured).
Several names separated by commas are loaded one after the other, `limit` prompts each.

The hub sets need the network on first use (and `datasets`, except mMARCO); their loaders raise ImportError or
`HubDatasetUnavailable` (a ConnectionError) with the fix in the message.
"""

from __future__ import annotations

from pathlib import Path

from hsd_rag.bench.context_cap import PROTOTYPE_CONTEXT_TOKENS
from hsd_rag.bench.runner import BenchCase
from hsd_rag.bench.structured import STRUCTURED_PREFIX, load_structured_cases

# Prompts whose id hashes below this fraction are reserved for benchmarks; EAGLE head training uses the rest.
HELDOUT_FRACTION = 0.25
BUILTIN_PREFIX = "builtin-"
RAGBENCH_PREFIX = "ragbench:"
MMARCO_PREFIX = "mmarco:"
SPECBENCH_RAG = "specbench-rag"
MTBENCH = "mtbench"
NAME_SEPARATOR = ","
DATASET_NAMES_HELP = (
    "builtin-en, builtin-fr, builtin-es, ragbench:<subset>, mmarco:<lang>, specbench-rag, mtbench, "
    "structured-en (-fr, -es) or a .jsonl file"
)


def _examples(name: str, limit: int | None, tokenizer, max_context_tokens: int):
    from hsd_rag.bench import hub_datasets
    from hsd_rag.bench.mmarco import load_mmarco
    from hsd_rag.data import load_builtin, load_jsonl, split

    if name.startswith(BUILTIN_PREFIX):
        _, examples = split(load_builtin(name[len(BUILTIN_PREFIX) :]), HELDOUT_FRACTION)
        return examples[:limit]
    if Path(name).suffix == ".jsonl":
        return load_jsonl(name)[:limit]
    if name.startswith(RAGBENCH_PREFIX):
        return hub_datasets.load_ragbench(name[len(RAGBENCH_PREFIX) :], limit, tokenizer, max_context_tokens)
    if name.startswith(MMARCO_PREFIX):
        return load_mmarco(name[len(MMARCO_PREFIX) :], limit)
    if name == SPECBENCH_RAG:
        return hub_datasets.load_specbench_rag(limit)
    if name == MTBENCH:
        return hub_datasets.load_mtbench(limit)
    raise ValueError(f"Unknown dataset {name!r}: use {DATASET_NAMES_HELP}.")


def load_cases(name: str, limit: int | None = None, tokenizer=None,
               max_context_tokens: int = PROTOTYPE_CONTEXT_TOKENS) -> list[BenchCase]:
    """Benchmark cases of one or several (comma-separated) named sets, at most `limit` per set.

    `tokenizer` (the target's) makes the RAGBench document cap count tokens; without it the cap counts
    characters (context_cap.CHARS_PER_TOKEN per token).
    """
    from hsd_rag.data import format_messages

    if limit is not None and limit < 0:
        raise ValueError(f"limit must be non-negative, got {limit}")
    cases = []
    for part in (p.strip() for p in name.split(NAME_SEPARATOR)):
        if not part:
            continue
        if part.startswith(STRUCTURED_PREFIX):
            cases.extend(load_structured_cases(part, limit))
            continue
        for e in _examples(part, limit, tokenizer, max_context_tokens):
            cases.append(BenchCase(e.id, part, format_messages(e), list(e.documents)))
    if not cases and limit != 0:
        raise ValueError(f"No prompts in {name!r}.")
    return cases


def load_warmup_case(name: str, limit: int | None, tokenizer=None,
                     max_context_tokens: int = PROTOTYPE_CONTEXT_TOKENS) -> BenchCase | None:
    """The first named set's prompt right after the `limit` measured ones, for warming engines up; None if none.

    A measured prompt must not be the warm-up: vLLM's prefix cache and its suffix decoder's cache of earlier
    answers would then get that prompt's prefill and part of its answer for free.
    """
    first = next((p.strip() for p in name.split(NAME_SEPARATOR) if p.strip()), "")
    if limit is None or not first:
        return None
    cases = load_cases(first, limit + 1, tokenizer, max_context_tokens)
    return cases[limit] if len(cases) > limit else None
