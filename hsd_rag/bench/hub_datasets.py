"""Public benchmark sets read through the optional `datasets` library: RAGBench, Spec-Bench RAG and MT-bench.

`datasets` is imported only here, inside the loader, so the package and its tests never need it; a missing
install raises ImportError with the pip command, and a hub that cannot be reached raises
`HubDatasetUnavailable` naming the dataset and the underlying error. `datasets` caches what it downloads, so a
set loaded once can be loaded offline later (HF_DATASETS_OFFLINE=1 skips the network attempt).

Schemas, as checked against public copies of the data (not against a live download, which this project's
build machine cannot make):

- RAGBench, hub `rungalileo/ragbench`, 12 subsets (configs) with train / validation / test parquet splits.
  Verified: the subset names and split names (hub file tree and dataset viewer) and the fields `id`,
  `question`, `documents` (list of passage strings) and `response` (the dataset card and public loaders).
  The `test` split is used: it is what RAGBench reports on and what no training here ever reads.
- Spec-Bench, `data/spec_bench/question.jsonl` of the GitHub repository hemingkx/Spec-Bench (it is not on the
  hub; read with the generic `json` builder from its raw URL). Verified: one JSON object per line with
  `question_id`, `category` and `turns` (list of user turns), and `reference` on some lines; the category names
  (`rag`, and MT-bench's eight for its first 80 questions). Not verified: the exact wording of the RAG
  prompts; they embed their retrieved passages in the turn text, which is therefore sent as is, with no separate
  documents (the n-gram drafter indexes the prompt anyway).
- MT-bench, hub `HuggingFaceH4/mt_bench_prompts`, split `train`, 80 rows. Verified: fields `prompt` (list of two
  user turns), `prompt_id`, `category`, `reference`. Only the first turn is benchmarked: the second turn's
  prompt depends on the model's first answer. It has no documents: a non-RAG control where n-gram drafts should
  help little.

`limit=n` keeps the first n examples in a fixed pseudo-random order of their ids (as the built-in sets do), so
a small limit samples the whole set rather than its first category, and is a prefix of any larger limit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from hsd_rag.bench.context_cap import PROTOTYPE_CONTEXT_TOKENS, cap_documents
from hsd_rag.data.rag_prompts import RagExample
from hsd_rag.data.split import unit_hash

DATASETS_INSTALL = "pip install datasets"

RAGBENCH_REPO = "rungalileo/ragbench"
RAGBENCH_SUBSETS = (
    "covidqa", "cuad", "delucionqa", "emanual", "expertqa", "finqa",
    "hagrid", "hotpotqa", "msmarco", "pubmedqa", "tatqa", "techqa",
)
RAGBENCH_SPLIT = "test"

SPEC_BENCH_URL = "https://raw.githubusercontent.com/hemingkx/Spec-Bench/main/data/spec_bench/question.jsonl"
SPEC_BENCH_RAG_CATEGORY = "rag"

MTBENCH_REPO = "HuggingFaceH4/mt_bench_prompts"
MTBENCH_SPLIT = "train"


class HubDatasetUnavailable(ConnectionError):
    """A benchmark set could not be fetched (offline, hub down, not in the local cache)."""


def unavailable_message(what: str, err: BaseException) -> str:
    return (
        f"Could not load {what}: {type(err).__name__}: {err}. Public benchmark sets are downloaded on first use "
        "and need network access then; offline, only a copy already in the local cache can be used "
        "(HF_DATASETS_OFFLINE=1 / HF_HUB_OFFLINE=1 use it without trying the network). The built-in sets "
        "(builtin-en, builtin-fr, builtin-es) and .jsonl files always work offline."
    )


def load_hub_rows(path: str, name: str | None = None, *, split: str, data_files: str | None = None,
                  what: str) -> list[dict]:
    """All rows of one split through `datasets.load_dataset`, with the two failure modes made explicit."""
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            f"{what} is read with the optional `datasets` package, which is not installed: `{DATASETS_INSTALL}`."
        ) from err
    try:
        rows = datasets.load_dataset(path, name, split=split, data_files=data_files)
    except Exception as err:  # network, hub, cache: whatever it is, the set is not available here
        raise HubDatasetUnavailable(unavailable_message(what, err)) from err
    return [dict(row) for row in rows]


def required_field(row: dict, name: str, what: str):
    """`row[name]`, or a ValueError saying the upstream schema changed (with the fields it has now)."""
    if name not in row:
        raise ValueError(
            f"{what}: rows have no field {name!r} (fields: {sorted(row)}); the upstream schema changed."
        )
    return row[name]


def stable_sample(items: Iterable, key: Callable[[object], str], limit: int | None) -> list:
    """The first `limit` items in a fixed pseudo-random order of `key` (a prefix of any larger limit)."""
    ordered = sorted(items, key=lambda item: unit_hash(key(item)))
    return ordered if limit is None else ordered[:limit]


def load_ragbench(subset: str, limit: int | None = None, tokenizer=None,
                  max_context_tokens: int = PROTOTYPE_CONTEXT_TOKENS) -> list[RagExample]:
    """RAGBench `subset` (test split), documents capped to `max_context_tokens` together (context_cap)."""
    if subset not in RAGBENCH_SUBSETS:
        raise ValueError(f"Unknown RAGBench subset {subset!r}; choose one of: {', '.join(RAGBENCH_SUBSETS)}.")
    what = f"RAGBench subset {subset!r} ({RAGBENCH_REPO}, {RAGBENCH_SPLIT} split)"
    rows = load_hub_rows(RAGBENCH_REPO, subset, split=RAGBENCH_SPLIT, what=what)
    rows = stable_sample(rows, lambda row: str(required_field(row, "id", what)), limit)
    return [
        RagExample(
            id=f"{subset}-{required_field(row, 'id', what)}",
            question=required_field(row, "question", what),
            documents=cap_documents(
                list(required_field(row, "documents", what)), max_context_tokens, tokenizer
            ),
            answer=row.get("response"),
            lang="en",
        )
        for row in rows
    ]


def _first_turn_example(example_id: str, turn: str) -> RagExample:
    """A prompt sent as one user turn, as is, with no separate documents."""
    return RagExample(id=example_id, question=turn, documents=[], lang="en",
                      messages=[{"role": "user", "content": turn}])


def load_specbench_rag(limit: int | None = None) -> list[RagExample]:
    """Spec-Bench's RAG category (80 prompts with their passages inside the turn)."""
    what = f"Spec-Bench ({SPEC_BENCH_URL})"
    rows = load_hub_rows("json", split="train", data_files=SPEC_BENCH_URL, what=what)
    rows = [row for row in rows if required_field(row, "category", what) == SPEC_BENCH_RAG_CATEGORY]
    if not rows:
        raise ValueError(f"{what}: no prompt has category {SPEC_BENCH_RAG_CATEGORY!r}; the file changed.")
    rows = stable_sample(rows, lambda row: str(required_field(row, "question_id", what)), limit)
    return [
        _first_turn_example(f"specbench-{row['question_id']}", required_field(row, "turns", what)[0])
        for row in rows
    ]


def load_mtbench(limit: int | None = None) -> list[RagExample]:
    """MT-bench first turns: the non-RAG control (no documents)."""
    what = f"MT-bench ({MTBENCH_REPO})"
    rows = load_hub_rows(MTBENCH_REPO, split=MTBENCH_SPLIT, what=what)
    rows = stable_sample(rows, lambda row: str(required_field(row, "prompt_id", what)), limit)
    return [
        _first_turn_example(f"mtbench-{row['prompt_id']}", required_field(row, "prompt", what)[0])
        for row in rows
    ]
