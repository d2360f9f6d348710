"""mMARCO prompts: a dev query, its relevant passage and 9 BM25-ranked non-relevant passages, in 14 languages.

Why not `datasets.load_dataset("unicamp-dl/mmarco", ...)`: that hub repository is a loading-script dataset
(`mmarco.py`), which `datasets` 4 no longer runs, and its training-triples configs hold one positive and one
negative per row in a shuffled order, so gathering 9 negatives per query would mean reading millions of rows
after downloading the whole ~3 GB collection. Instead the repository's raw TSV files are streamed with
`huggingface_hub` (a dependency of transformers, always installed), reading only what is needed:

- `data/qrels.dev.small.tsv`: `qid 0 pid 1` lines, the relevant passage(s) of the 6,980 "dev small" queries;
- `data/google/runs/run.bm25_<language>-msmarco.txt`: `qid pid rank` lines, BM25's top passages for those
  queries, grouped by query in rank order. Negatives are the best-ranked non-relevant ones: the hard distractors a
  real retriever returns next to the answer;
- `data/google/queries/dev/<language>_queries.dev.small.tsv`: `qid text`;
- `data/google/collections/<language>_collection.tsv`: `pid text`, read until every needed passage is found
  (possibly the whole file once); the assembled prompts are then cached as a jsonl file, so later runs are
  instant and work offline.

Verified against public copies: the language names, the file paths and the line layouts of the queries,
collection and run files (the repository's loading script reads them with these paths and tab splits), and the
existence of `qrels.dev.small.tsv` (its file tree). Not verified: the qrels layout, assumed to be MS MARCO's
standard TREC `qid 0 pid relevance`; the run files' grouping by query, assumed as in every Anserini run file.
"""

from __future__ import annotations

import io
import random
from collections.abc import Iterable, Iterator
from pathlib import Path

from hsd_rag.bench.hub_datasets import HubDatasetUnavailable, unavailable_message
from hsd_rag.data.rag_prompts import RagExample

MMARCO_REPO = "unicamp-dl/mmarco"
MMARCO_NEGATIVES = 9  # 1 positive + 9 negatives per prompt, as in the research prototype
# ISO 639-1 code -> the repository's language name; both spellings are accepted.
MMARCO_LANGUAGES = {
    "ar": "arabic", "zh": "chinese", "nl": "dutch", "en": "english", "fr": "french", "de": "german",
    "hi": "hindi", "id": "indonesian", "it": "italian", "ja": "japanese", "pt": "portuguese", "ru": "russian",
    "es": "spanish", "vi": "vietnamese",
}
QRELS_FILE = "data/qrels.dev.small.tsv"
CACHE_SUBDIR = "bench"
ALL = "all"  # cache file suffix when every query was assembled


def _queries_file(language: str) -> str:
    return f"data/google/queries/dev/{language}_queries.dev.small.tsv"


def _run_file(language: str) -> str:
    return f"data/google/runs/run.bm25_{language}-msmarco.txt"


def _collection_file(language: str) -> str:
    return f"data/google/collections/{language}_collection.tsv"


def language_name(lang: str) -> str:
    """The repository's language name for an ISO code or a name; ValueError listing the valid ones."""
    lang = lang.lower()
    if lang in MMARCO_LANGUAGES.values():
        return lang
    if lang in MMARCO_LANGUAGES:
        return MMARCO_LANGUAGES[lang]
    valid = ", ".join(f"{code} ({name})" for code, name in MMARCO_LANGUAGES.items())
    raise ValueError(f"Unknown mMARCO language {lang!r}; choose one of: {valid}.")


# ---- pure assembly (testable without the hub) ---------------------------------------------------------------


def read_qrels(lines: Iterable[str]) -> dict[str, list[str]]:
    """qid -> relevant pids, in file order."""
    positives: dict[str, list[str]] = {}
    for line in lines:
        parts = line.split()
        if len(parts) >= 4 and int(parts[3]) > 0:
            positives.setdefault(parts[0], []).append(parts[2])
    return positives


def select_negatives(run_lines: Iterable[str], positives: dict[str, list[str]], limit: int | None,
                     negatives: int = MMARCO_NEGATIVES) -> dict[str, list[str]]:
    """qid -> its `negatives` best-ranked non-relevant pids, for the first `limit` judged queries of the run.

    Reading stops as soon as `limit` queries have all their negatives, so a small limit reads a few lines only.
    """
    chosen: dict[str, list[str]] = {}
    full = 0
    for line in run_lines:
        parts = line.split()
        if len(parts) < 2:
            continue
        qid, pid = parts[0], parts[1]
        relevant = positives.get(qid)
        if relevant is None or pid in relevant:
            continue
        if qid not in chosen:
            if limit is not None and len(chosen) >= limit:
                continue
            chosen[qid] = []
        picked = chosen[qid]
        if len(picked) < negatives:
            picked.append(pid)
            full += len(picked) == negatives
            if limit is not None and full >= limit:
                break
    return {qid: pids for qid, pids in chosen.items() if len(pids) == negatives}


def read_texts(lines: Iterable[str], wanted: set[str]) -> dict[str, str]:
    """id -> text for the `wanted` ids of an `id<TAB>text` file; stops once all are found."""
    found: dict[str, str] = {}
    for line in lines:
        key, _, text = line.partition("\t")
        if key in wanted:
            found[key] = text.strip()
            if len(found) == len(wanted):
                break
    return found


def assemble(lang: str, chosen: dict[str, list[str]], positives: dict[str, list[str]], queries: dict[str, str],
             passages: dict[str, str], seed: int = 0) -> list[RagExample]:
    """One RagExample per chosen query: the positive and the negatives, shuffled per query (gold_index kept)."""
    examples = []
    for qid, negative_ids in chosen.items():
        gold = positives[qid][0]
        ids = [gold, *negative_ids]
        if qid not in queries or any(pid not in passages for pid in ids):
            continue  # a file was cut short: skip rather than build a prompt with a hole
        order = list(range(len(ids)))
        random.Random(f"{seed}:{qid}").shuffle(order)  # the gold passage moves around, as in the built-in sets
        examples.append(RagExample(
            id=f"mmarco-{lang}-{qid}",
            question=queries[qid],
            documents=[passages[ids[i]] for i in order],
            lang=lang,
            gold_index=order.index(0),
        ))
    return examples


# ---- hub IO and the local cache ------------------------------------------------------------------------------


def hub_lines(path: str) -> Iterator[str]:
    """Stream the lines of one file of the mMARCO repository; network failures become HubDatasetUnavailable."""
    what = f"{MMARCO_REPO}/{path}"
    try:
        from huggingface_hub import HfFileSystem

        handle = HfFileSystem().open(f"datasets/{MMARCO_REPO}/{path}", "rb", block_size=0)  # 0: stream
    except Exception as err:  # network, hub, auth: the file is not available here
        raise HubDatasetUnavailable(unavailable_message(what, err)) from err
    with handle:
        text = io.TextIOWrapper(handle, encoding="utf-8", newline="\n")
        while True:
            try:
                line = text.readline()
            except Exception as err:
                raise HubDatasetUnavailable(unavailable_message(what, err)) from err
            if not line:
                return
            yield line.rstrip("\n")


def _cache_folder() -> Path:
    from hsd_rag.paths import cache_dir

    return cache_dir() / CACHE_SUBDIR


def _cached(language: str, limit: int | None) -> list[RagExample] | None:
    from hsd_rag.data import load_jsonl

    folder = _cache_folder()
    for path in sorted(folder.glob(f"mmarco-{language}-*.jsonl")):
        size = path.stem.rsplit("-", 1)[-1]
        if size == ALL or (limit is not None and size.isdigit() and int(size) >= limit):
            examples = load_jsonl(path)
            return examples if limit is None else examples[:limit]
    return None


def load_mmarco(lang: str, limit: int | None = None, seed: int = 0) -> list[RagExample]:
    """`limit` mMARCO dev-small prompts in `lang` (ISO code or name), from the local cache or the hub."""
    from hsd_rag.data import dump_jsonl

    language = language_name(lang)
    cached = _cached(language, limit)
    if cached is not None:
        return cached
    positives = read_qrels(hub_lines(QRELS_FILE))
    chosen = select_negatives(hub_lines(_run_file(language)), positives, limit)
    queries = read_texts(hub_lines(_queries_file(language)), set(chosen))
    wanted = {pid for qid, negs in chosen.items() for pid in (positives[qid][0], *negs)}
    passages = read_texts(hub_lines(_collection_file(language)), wanted)
    code = next(code for code, name in MMARCO_LANGUAGES.items() if name == language)
    examples = assemble(code, chosen, positives, queries, passages, seed)
    folder = _cache_folder()
    folder.mkdir(parents=True, exist_ok=True)
    dump_jsonl(examples, folder / f"mmarco-{language}-{ALL if limit is None else len(examples)}.jsonl")
    return examples
