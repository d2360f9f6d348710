"""Okapi BM25 over a small corpus, in numpy: picks lexically similar distractor passages.

Distractors that share words with the question make a prompt realistic (a real retriever returns near misses),
and lexical similarity is cheap enough to rank all ~10k lead sections for every question without an embedder.
Written here instead of depending on scikit-learn or bm25s, neither of which hsd_rag otherwise needs.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

import numpy as np

TOKEN_PATTERN = re.compile(r"\w+")
DEFAULT_K1 = 1.5  # term-frequency saturation (the usual Okapi range is 1.2-2.0)
DEFAULT_B = 0.75  # document-length normalisation strength


def tokenize(text: str) -> list[str]:
    return TOKEN_PATTERN.findall(text.lower())


class Bm25Index:
    """Inverted index whose postings carry the finished BM25 term weight, so a query is a few array adds."""

    def __init__(self, texts: Sequence[str], k1: float = DEFAULT_K1, b: float = DEFAULT_B):
        self.n_docs = len(texts)
        counts = [Counter(tokenize(text)) for text in texts]
        lengths = np.array([sum(c.values()) for c in counts], dtype=np.float64)
        average_length = max(lengths.mean(), 1.0) if self.n_docs else 1.0
        doc_ids: dict[str, list[int]] = defaultdict(list)
        term_freqs: dict[str, list[int]] = defaultdict(list)
        for doc, counter in enumerate(counts):
            for term, tf in counter.items():
                doc_ids[term].append(doc)
                term_freqs[term].append(tf)
        self.postings: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for term, docs in doc_ids.items():
            docs_array = np.array(docs, dtype=np.int64)
            tf = np.array(term_freqs[term], dtype=np.float64)
            df = len(docs)
            idf = np.log1p((self.n_docs - df + 0.5) / (df + 0.5))  # Lucene's variant: never negative
            norm = k1 * (1.0 - b + b * lengths[docs_array] / average_length)
            self.postings[term] = (docs_array, (idf * tf * (k1 + 1.0) / (tf + norm)).astype(np.float32))

    def scores(self, query: str) -> np.ndarray:
        """[n_docs] BM25 score of every document for `query`."""
        scores = np.zeros(self.n_docs, dtype=np.float32)
        for term in set(tokenize(query)):
            if term in self.postings:
                docs, weights = self.postings[term]
                scores[docs] += weights  # docs are unique within one posting list
        return scores

    def top(self, query: str, k: int, exclude: Iterable[int] = ()) -> list[int]:
        """The `k` best document indices, best first; ties go to the lower index so results are reproducible."""
        scores = self.scores(query)
        excluded = np.fromiter(exclude, dtype=np.int64)
        scores[excluded] = -np.inf
        k = min(k, self.n_docs - len(set(excluded.tolist())))
        if k <= 0:
            return []
        kth_best = np.partition(scores, self.n_docs - k)[self.n_docs - k]
        above = np.flatnonzero(scores > kth_best)
        ties = np.flatnonzero(scores == kth_best)[: k - len(above)]
        chosen = np.concatenate([above, ties])
        order = np.lexsort((chosen, -scores[chosen]))
        return chosen[order].tolist()
