"""`FaissStore`: a LangChain `VectorStore` over an exact FAISS index, saved as FAISS bytes + JSON (no pickle).

Why not langchain-community's `FAISS`: its `save_local` pickles the documents, so `load_local` must be told
`allow_dangerous_deserialization=True` and runs whatever code the file holds. Here the vectors are FAISS's own
binary format and the documents plain JSON, so loading an index from anywhere is safe.

Vectors are scaled to unit length, so the inner product of FAISS's `IndexFlatIP` is the cosine similarity:
every score this store returns is a cosine similarity (higher is closer), and so is the relevance score.
Row i of the FAISS index is document `_ids[i]`; deleting rows keeps the others in order.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hsd_rag.retrieval.optional import missing_message, require

try:
    from langchain_core.documents import Document
    from langchain_core.embeddings import Embeddings
    from langchain_core.vectorstores import VectorStore
    from langchain_core.vectorstores.utils import maximal_marginal_relevance
except ImportError as error:
    raise ImportError(missing_message("langchain-core", "FaissStore")) from error

STORE_FORMAT = 1  # bump when the files' layout changes
VECTORS_FILE = "index.faiss"
DOCUMENTS_FILE = "index.json"
DEFAULT_K = 4
DEFAULT_FETCH_K = 20  # MMR candidates, LangChain's default
DEFAULT_LAMBDA_MULT = 0.5  # MMR trade-off between relevance (1) and diversity (0), LangChain's default

# A metadata filter: {"key": value, ...} (all must be equal; a list or set value means "any of these"),
# or a predicate over the Document.
Filter = dict[str, Any] | Callable[[Document], bool]


class StoreFileError(ValueError):
    """Files given to `FaissStore.load_local` are missing, of another format, or inconsistent."""


def _faiss():
    return require("faiss", "faiss-cpu", "FaissStore")


def _unit_rows(vectors: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    """float32 [n, d] with every non-zero row scaled to length 1."""
    array = np.array(vectors, dtype=np.float32, ndmin=2)
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    return np.ascontiguousarray(array / np.where(norms > 0, norms, 1), dtype=np.float32)


def _matches(document: Document, filter: Filter | None) -> bool:
    if filter is None:
        return True
    if callable(filter):
        return bool(filter(document))
    for key, wanted in filter.items():
        value = document.metadata.get(key)
        if isinstance(wanted, list | tuple | set | frozenset):
            if value not in wanted:
                return False
        elif value != wanted:
            return False
    return True


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class FaissStore(VectorStore):
    """Documents and their vectors in an exact FAISS index: similarity (with scores), MMR, metadata filters,
    ids (add with ids upserts), `get_by_ids`, `delete`, and `save_local` / `load_local` without pickle.

    Thread-safe: searches and updates may run from several threads; embedding happens outside the lock.
    """

    def __init__(self, embedding: Embeddings):
        self.embedding = embedding
        self._index = (
            None  # faiss.IndexFlatIP, made when the first vectors arrive (their length is unknown before)
        )
        self._ids: list[str] = []  # row -> id
        self._rows: dict[str, int] = {}  # id -> row
        self._documents: list[Document] = []  # row -> document (its id set)
        self._lock = threading.RLock()
        self.version = 0  # bumped by every change, so views built from the store know when to rebuild

    # ---- what LangChain asks of a vector store -----------------------------------------------------------

    @property
    def embeddings(self) -> Embeddings:
        return self.embedding

    @classmethod
    def from_texts(
        cls,
        texts: list[str],
        embedding: Embeddings,
        metadatas: list[dict] | None = None,
        *,
        ids: list[str] | None = None,
        **kwargs: Any,
    ) -> FaissStore:
        store = cls(embedding)
        store.add_texts(texts, metadatas, ids=ids)
        return store

    def add_documents(
        self, documents: list[Document], ids: list[str] | None = None, **kwargs: Any
    ) -> list[str]:
        """Embed and add `documents`; an id already in the store replaces that document (upsert)."""
        ids = self._resolve_ids(documents, ids)
        vectors = self.embedding.embed_documents([d.page_content for d in documents]) if documents else []
        return self._add(documents, ids, vectors)

    async def aadd_documents(
        self, documents: list[Document], ids: list[str] | None = None, **kwargs: Any
    ) -> list[str]:
        ids = self._resolve_ids(documents, ids)
        vectors = (
            await self.embedding.aembed_documents([d.page_content for d in documents]) if documents else []
        )
        return self._add(documents, ids, vectors)

    def delete(self, ids: list[str] | None = None, **kwargs: Any) -> bool:
        """Remove the documents with these ids (unknown ids are ignored); `None` empties the store."""
        with self._lock:
            if ids is None:
                ids = list(self._ids)
            self._remove([self._rows[i] for i in dict.fromkeys(ids) if i in self._rows])
        return True

    def get_by_ids(self, ids: Sequence[str], /) -> list[Document]:
        """The stored documents with these ids, in the order asked; unknown ids are skipped."""
        with self._lock:
            return [self._copy(self._rows[i]) for i in ids if i in self._rows]

    def similarity_search(
        self, query: str, k: int = DEFAULT_K, filter: Filter | None = None, **kwargs: Any
    ) -> list[Document]:
        return [doc for doc, _ in self.similarity_search_with_score(query, k, filter=filter)]

    def similarity_search_with_score(
        self, query: str, k: int = DEFAULT_K, filter: Filter | None = None, **kwargs: Any
    ) -> list[tuple[Document, float]]:
        """The `k` documents closest to `query`, best first, each with its cosine similarity."""
        if not len(self):
            return []  # nothing to compare with: do not embed
        return self.similarity_search_with_score_by_vector(
            self.embedding.embed_query(query), k, filter=filter
        )

    async def asimilarity_search_with_score(
        self, query: str, k: int = DEFAULT_K, filter: Filter | None = None, **kwargs: Any
    ) -> list[tuple[Document, float]]:
        if not len(self):
            return []
        vector = await self.embedding.aembed_query(query)
        return self.similarity_search_with_score_by_vector(vector, k, filter=filter)

    async def asimilarity_search(
        self, query: str, k: int = DEFAULT_K, filter: Filter | None = None, **kwargs: Any
    ) -> list[Document]:
        return [doc for doc, _ in await self.asimilarity_search_with_score(query, k, filter=filter)]

    def similarity_search_by_vector(
        self, embedding: list[float], k: int = DEFAULT_K, filter: Filter | None = None, **kwargs: Any
    ) -> list[Document]:
        return [doc for doc, _ in self.similarity_search_with_score_by_vector(embedding, k, filter=filter)]

    def similarity_search_with_score_by_vector(
        self, embedding: list[float], k: int = DEFAULT_K, filter: Filter | None = None
    ) -> list[tuple[Document, float]]:
        """Exact search; with a filter, only the matching rows are searched (a FAISS id selector)."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        with self._lock:
            scores, rows = self._search(embedding, k, filter)
            return [(self._copy(row), score) for score, row in zip(scores, rows, strict=True)]

    def max_marginal_relevance_search(
        self,
        query: str,
        k: int = DEFAULT_K,
        fetch_k: int = DEFAULT_FETCH_K,
        lambda_mult: float = DEFAULT_LAMBDA_MULT,
        filter: Filter | None = None,
        **kwargs: Any,
    ) -> list[Document]:
        if not len(self):
            return []
        vector = self.embedding.embed_query(query)
        return self.max_marginal_relevance_search_by_vector(vector, k, fetch_k, lambda_mult, filter=filter)

    async def amax_marginal_relevance_search(
        self,
        query: str,
        k: int = DEFAULT_K,
        fetch_k: int = DEFAULT_FETCH_K,
        lambda_mult: float = DEFAULT_LAMBDA_MULT,
        filter: Filter | None = None,
        **kwargs: Any,
    ) -> list[Document]:
        if not len(self):
            return []
        vector = await self.embedding.aembed_query(query)
        return self.max_marginal_relevance_search_by_vector(vector, k, fetch_k, lambda_mult, filter=filter)

    def max_marginal_relevance_search_by_vector(
        self,
        embedding: list[float],
        k: int = DEFAULT_K,
        fetch_k: int = DEFAULT_FETCH_K,
        lambda_mult: float = DEFAULT_LAMBDA_MULT,
        filter: Filter | None = None,
        **kwargs: Any,
    ) -> list[Document]:
        """`k` of the `fetch_k` closest documents, chosen one by one for relevance minus redundancy."""
        if k < 1 or fetch_k < k:
            raise ValueError(f"need 1 <= k <= fetch_k, got k={k}, fetch_k={fetch_k}")
        with self._lock:
            _, rows = self._search(embedding, fetch_k, filter)
            if not rows:
                return []
            candidates = self._index.reconstruct_batch(np.array(rows, dtype=np.int64))
            query = _unit_rows(embedding)[0]
            chosen = maximal_marginal_relevance(query, list(candidates), lambda_mult=lambda_mult, k=k)
            return [self._copy(rows[i]) for i in chosen]

    def _select_relevance_score_fn(self) -> Callable[[float], float]:
        return lambda similarity: similarity  # already a cosine similarity

    # ---- beyond the VectorStore interface -----------------------------------------------------------------

    def __len__(self) -> int:
        with self._lock:
            return len(self._ids)

    @property
    def dimension(self) -> int | None:
        """Length of the stored vectors; None until the first document arrives."""
        return None if self._index is None else self._index.d

    def documents(self, filter: Filter | None = None) -> list[Document]:
        """Every stored document (matching `filter`), in the order they were added."""
        with self._lock:
            return [self._copy(row) for row, doc in enumerate(self._documents) if _matches(doc, filter)]

    def vectors(self) -> np.ndarray:
        """[len(self), dimension] unit vectors, row i for `documents()[i]`."""
        with self._lock:
            if self._index is None or not self._ids:
                return np.zeros((0, self.dimension or 0), dtype=np.float32)
            return self._index.reconstruct_n(0, len(self._ids))

    def snapshot(self) -> tuple[list[Document], np.ndarray]:
        """`documents()` and `vectors()` taken together, consistent even while another thread updates."""
        with self._lock:
            return self.documents(), self.vectors()

    def save_local(self, folder_path: str | Path) -> Path:
        """Write `index.faiss` (vectors, FAISS's binary format) then `index.json` (ids, texts, metadata).

        Metadata must be JSON-serialisable. `load_local` checks that the two files agree.
        """
        folder = Path(folder_path)
        folder.mkdir(parents=True, exist_ok=True)
        with self._lock:
            payload = {
                "format": STORE_FORMAT,
                "dimension": self.dimension,
                "ids": self._ids,
                "documents": [
                    {"page_content": d.page_content, "metadata": d.metadata} for d in self._documents
                ],
            }
            try:
                text = json.dumps(payload, ensure_ascii=False)
            except TypeError as error:
                raise TypeError(f"FaissStore.save_local needs JSON-serialisable metadata: {error}") from error
            vectors = (
                _faiss().serialize_index(self._index) if self._index is not None else np.zeros(0, np.uint8)
            )
            _write_atomic(folder / VECTORS_FILE, vectors.tobytes())
            _write_atomic(folder / DOCUMENTS_FILE, text.encode("utf-8"))
        return folder

    @classmethod
    def load_local(cls, folder_path: str | Path, embeddings: Embeddings, **kwargs: Any) -> FaissStore:
        """A store written by `save_local`. Nothing is unpickled, so no `allow_dangerous_deserialization`."""
        folder = Path(folder_path)
        if not (folder / DOCUMENTS_FILE).exists() or not (folder / VECTORS_FILE).exists():
            raise FileNotFoundError(
                f"No saved FaissStore in {folder} (expected {DOCUMENTS_FILE} and {VECTORS_FILE})"
            )
        try:
            payload = json.loads((folder / DOCUMENTS_FILE).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise StoreFileError(f"{folder / DOCUMENTS_FILE} is not a FaissStore file ({error})") from error
        if not isinstance(payload, dict) or payload.get("format") != STORE_FORMAT:
            found = payload.get("format") if isinstance(payload, dict) else None
            raise StoreFileError(f"{folder} holds store format {found}, expected {STORE_FORMAT}")
        store = cls(embeddings)
        raw = np.fromfile(folder / VECTORS_FILE, dtype=np.uint8)
        ids = payload["ids"]
        if raw.size:
            store._index = _faiss().deserialize_index(raw)
        count = 0 if store._index is None else store._index.ntotal
        if count != len(ids) or len(ids) != len(payload["documents"]) or len(set(ids)) != len(ids):
            raise StoreFileError(
                f"{folder} is inconsistent ({count} vectors, {len(ids)} ids, {len(payload['documents'])} "
                "documents); save it again."
            )
        store._ids = list(ids)
        store._rows = {i: row for row, i in enumerate(ids)}
        store._documents = [
            Document(page_content=d["page_content"], metadata=d["metadata"], id=i)
            for i, d in zip(ids, payload["documents"], strict=True)
        ]
        return store

    # ---- internals (callers hold the lock where it matters) ---------------------------------------------

    @staticmethod
    def _resolve_ids(documents: list[Document], ids: list[str] | None) -> list[str]:
        """Explicit ids first, then each Document's own id, else a fresh uuid4."""
        if ids is not None and len(ids) != len(documents):
            raise ValueError(f"got {len(ids)} ids for {len(documents)} documents")
        given: Iterable[str | None] = ids if ids is not None else (d.id for d in documents)
        resolved = [str(i) if i else str(uuid.uuid4()) for i in given]
        if len(set(resolved)) != len(resolved):
            raise ValueError("the same id was given to several documents of one call")
        return resolved

    def _add(self, documents: list[Document], ids: list[str], vectors: list[list[float]]) -> list[str]:
        if not documents:
            return []
        array = _unit_rows(vectors)
        with self._lock:
            if self._index is None:
                self._index = _faiss().IndexFlatIP(array.shape[1])
            elif array.shape[1] != self._index.d:
                raise ValueError(
                    f"the embedding model returned {array.shape[1]}-dimensional vectors; this store holds "
                    f"{self._index.d}-dimensional ones (was it built with another model?)"
                )
            self._remove([self._rows[i] for i in ids if i in self._rows])
            self._index.add(array)
            for doc_id, document in zip(ids, documents, strict=True):
                self._rows[doc_id] = len(self._ids)
                self._ids.append(doc_id)
                self._documents.append(
                    Document(page_content=document.page_content, metadata=dict(document.metadata), id=doc_id)
                )
            self.version += 1
        return ids

    def _remove(self, rows: list[int]) -> None:
        if not rows:
            return
        self._index.remove_ids(np.array(sorted(rows), dtype=np.int64))  # IndexFlat keeps the rest in order
        dropped = set(rows)
        self._ids = [i for row, i in enumerate(self._ids) if row not in dropped]
        self._documents = [d for row, d in enumerate(self._documents) if row not in dropped]
        self._rows = {i: row for row, i in enumerate(self._ids)}
        self.version += 1

    def _search(
        self, embedding: Sequence[float], k: int, filter: Filter | None
    ) -> tuple[list[float], list[int]]:
        """(cosine similarities, rows) of the best `k` rows passing `filter`, best first."""
        if self._index is None or not self._ids:
            return [], []
        query = _unit_rows(embedding)
        if query.shape[1] != self._index.d:
            raise ValueError(
                f"the query vector has {query.shape[1]} dimensions, the store {self._index.d}: "
                "search with the embedding model the store was built with"
            )
        params = None
        if filter is not None:
            allowed = [row for row, doc in enumerate(self._documents) if _matches(doc, filter)]
            if not allowed:
                return [], []
            faiss = _faiss()
            params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(np.array(allowed, dtype=np.int64)))
            k = min(k, len(allowed))
        scores, rows = self._index.search(query, min(k, len(self._ids)), params=params)
        kept = [(float(s), int(r)) for s, r in zip(scores[0], rows[0], strict=True) if r >= 0]
        return [s for s, _ in kept], [r for _, r in kept]

    def _copy(self, row: int) -> Document:
        """A copy, so callers can change what they get without changing the store."""
        document = self._documents[row]
        return Document(page_content=document.page_content, metadata=dict(document.metadata), id=document.id)
