"""Built-in offline RAG prompt sets: a question, its gold passage and lexically similar distractor passages.

English uses FanOutQA dev sub-questions (540 distinct questions whose article is in the corpus) and has reference
answers; French and Spanish questions are templated from article titles and have none (see `questions.py`).

Ranking distractors with BM25 over the ~10k lead sections takes a few seconds, so the ranked candidate lists are
cached as JSON under `<cache_dir>/data/` (keyed by the data packages' versions) and in memory; assembling the
examples from them is then a matter of milliseconds.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from hsd_rag.data.bm25 import Bm25Index
from hsd_rag.data.questions import QuestionSeed, fanoutqa_questions, templated_questions
from hsd_rag.data.sources import (
    CORPUS_PACKAGE,
    QUESTIONS_PACKAGE,
    Article,
    canonical_language,
    load_corpus,
    package_version,
)
from hsd_rag.data.split import unit_hash

CACHE_FORMAT = 1  # bump when the cached layout or the ranking changes
CACHE_SUBDIR = "data"
# Distractors ranked and cached per question: 9 matches the 1 positive + 9 negatives of the mMARCO benchmark.
CACHED_DISTRACTORS = 9
DEFAULT_N_DOCS = 3


@dataclass
class RagExample:
    """One RAG prompt: a question and the documents a retriever would have put in its context."""

    id: str
    question: str
    documents: list[str]
    answer: str | None = None
    gold_title: str | None = None  # the article that answers the question (built-in sets only)
    lang: str | None = None
    gold_index: int | None = None  # position of the gold passage in `documents`, when known
    messages: list[dict[str, str]] | None = None  # a ready-made chat prompt (jsonl input); used as is if set


_MEMORY: dict[str, tuple[int, list[dict]]] = {}  # cache file -> (depth, ranked rows)


def _cache_path(lang: str) -> Path:
    from hsd_rag.paths import cache_dir

    return cache_dir() / CACHE_SUBDIR / f"builtin-{lang}.json"


def _sources() -> dict[str, str]:
    return {p.distribution: package_version(p) for p in (CORPUS_PACKAGE, QUESTIONS_PACKAGE)}


def _rank(lang: str, corpus: tuple[Article, ...], depth: int) -> list[dict]:
    """Seeds with their `depth` best BM25 distractors, in a fixed pseudo-random order of ids.

    The order is a hash of the id so that `limit=n` takes a varied sample (not the first alphabetical articles or
    five sub-questions of one parent) and `limit=n` is always a prefix of `limit=m > n`.
    """
    seeds: list[QuestionSeed] = (
        fanoutqa_questions(corpus) if lang == "en" else templated_questions(corpus, lang)
    )
    index = Bm25Index([article.text for article in corpus])
    ranked = [
        {
            "id": seed.id,
            "question": seed.question,
            "answer": seed.answer,
            "gold": seed.gold,
            "distractors": index.top(seed.question, depth, exclude=[seed.gold]),
        }
        for seed in seeds
    ]
    ranked.sort(key=lambda row: unit_hash(row["id"]))
    return ranked


def _write_atomic(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def _ranked(lang: str, depth: int) -> list[dict]:
    """Ranked seeds from memory, then disk, else computed and cached (deeper rankings serve shallower asks)."""
    path = _cache_path(lang)
    cached_depth, rows = _MEMORY.get(str(path), (-1, []))
    if cached_depth >= depth:
        return rows
    sources = _sources()
    if path.exists():
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
            if (
                payload["format"] == CACHE_FORMAT
                and payload["sources"] == sources
                and payload["depth"] >= depth
            ):
                _MEMORY[str(path)] = (payload["depth"], payload["rows"])
                return payload["rows"]
        except (json.JSONDecodeError, KeyError, TypeError):
            pass  # a corrupt or foreign cache file is simply rebuilt
    depth = max(depth, CACHED_DISTRACTORS)
    rows = _rank(lang, load_corpus(lang), depth)
    _write_atomic(path, {"format": CACHE_FORMAT, "sources": sources, "depth": depth, "rows": rows})
    _MEMORY[str(path)] = (depth, rows)
    return rows


def _assemble(row: dict, corpus: tuple[Article, ...], lang: str, n_docs: int, seed: int) -> RagExample:
    gold = corpus[row["gold"]]
    documents = [gold.text] + [corpus[i].text for i in row["distractors"][: n_docs - 1]]
    order = list(range(len(documents)))
    random.Random(f"{seed}:{row['id']}").shuffle(order)  # per example, so the gold passage moves around
    return RagExample(
        id=row["id"],
        question=row["question"],
        documents=[documents[i] for i in order],
        answer=row["answer"],
        gold_title=gold.title,
        lang=lang,
        gold_index=order.index(0),
    )


def load_builtin(
    lang: str = "en", limit: int | None = None, n_docs: int = DEFAULT_N_DOCS, seed: int = 0
) -> list[RagExample]:
    """Offline RAG examples for `lang` ("en", "fr" or "es").

    Each has `n_docs` documents: the gold lead section plus the `n_docs - 1` BM25-nearest other sections, shuffled
    by `seed`. `limit` keeps the first examples of a fixed pseudo-random order. Raises `DataNotInstalledError`
    (with the pip command) when the data packages are missing.
    """
    if n_docs < 1:
        raise ValueError(f"n_docs must be at least 1 (the gold passage), got {n_docs}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be non-negative, got {limit}")
    lang = canonical_language(lang)
    corpus = load_corpus(lang)
    rows = _ranked(lang, n_docs - 1)
    return [_assemble(row, corpus, lang, n_docs, seed) for row in rows[:limit]]
