"""A dense index over a document folder, kept on disk and updated incrementally.

Vectors live in a FAISS `IndexFlatIP` (exact inner product; on normalised vectors that is cosine similarity), one
row per chunk, in the same order as the chunk list of the JSON metadata beside it. Embedding is the slow part
(~20 passages/s on a laptop CPU), so `update()` re-embeds only files whose content hash changed.

The index lives under the user cache dir, `<cache_dir>/indexes/<folder name>-<hash of its absolute path>`, not
inside the document folder: that folder may be read-only or under version control. Pass `index_dir` to choose.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hsd_rag.retrieval.chunking import DEFAULT_CHUNK_OVERLAP, DEFAULT_CHUNK_SIZE, chunk_documents
from hsd_rag.retrieval.embedder import Embedder, load_embedder
from hsd_rag.retrieval.loaders import SkippedFile, load_folder
from hsd_rag.retrieval.optional import require

INDEX_FORMAT = 1  # bump when the files' layout changes
VECTORS_FILE = "index.faiss"
METADATA_FILE = "index.json"
INDEX_ROOT = "indexes"
FOLDER_HASH_CHARS = 12
DEFAULT_K = 4


class IndexMismatchError(ValueError):
    """A stored index cannot be used as asked (other embedder dimension, corrupt or foreign files)."""


@dataclass(frozen=True)
class RetrievedChunk:
    text: str
    score: float  # cosine similarity to the query
    metadata: dict  # source, chunk_index, start_index


@dataclass
class UpdateReport:
    """What one `build()` / `update()` changed."""

    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)  # deleted, or no longer readable
    unchanged: list[str] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)
    chunks_embedded: int = 0


def default_index_dir(folder: str | Path) -> Path:
    from hsd_rag.loading import cache_dir  # imported here: hsd_rag.loading imports torch

    folder = Path(folder).expanduser().resolve()
    digest = hashlib.sha256(str(folder).encode()).hexdigest()[:FOLDER_HASH_CHARS]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", folder.name) or "root"
    return cache_dir() / INDEX_ROOT / f"{name}-{digest}"


def _faiss():
    return require("faiss", "faiss-cpu", "The folder index")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _read_metadata(index_dir: Path) -> dict:
    if not (index_dir / METADATA_FILE).exists() or not (index_dir / VECTORS_FILE).exists():
        raise FileNotFoundError(
            f"No saved index in {index_dir} (expected {METADATA_FILE} and {VECTORS_FILE})"
        )
    meta = json.loads((index_dir / METADATA_FILE).read_text(encoding="utf-8"))
    if meta.get("format") != INDEX_FORMAT:
        raise IndexMismatchError(
            f"{index_dir} holds index format {meta.get('format')}, expected {INDEX_FORMAT}"
        )
    return meta


class FolderIndex:
    """Chunks of a folder's documents and their vectors; `search` is safe to call from several threads."""

    def __init__(
        self,
        folder: str | Path,
        embedder: Embedder,
        index_dir: str | Path | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        chunk_overlap: int = DEFAULT_CHUNK_OVERLAP,
    ):
        """An empty index; use `build`, `load` or `open` to get a filled one."""
        self.folder = Path(folder).expanduser().resolve()
        self.embedder = embedder
        self.index_dir = Path(index_dir) if index_dir is not None else None
        self.chunk_size = chunk_size
        self.chunk_overlap = chunk_overlap
        self._vectors = _faiss().IndexFlatIP(embedder.dimension)
        self._chunks: list[dict] = []  # row i of _vectors is _chunks[i] = {"text", "metadata"}
        self._files: dict[str, str] = {}  # source -> sha256 of the indexed version
        self._lock = threading.Lock()  # guards _vectors / _chunks / _files
        self._update_lock = threading.Lock()  # one update at a time; searches continue while it embeds
        self.last_report: UpdateReport | None = None  # what the latest build / open changed

    # ----------------------------------------------------------------------------------------- construction

    @classmethod
    def build(
        cls,
        folder: str | Path,
        index_dir: str | Path | None = None,
        embedder: Embedder | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        chunk_overlap: int = DEFAULT_CHUNK_OVERLAP,
        save: bool = True,
    ) -> FolderIndex:
        """Index `folder` from scratch (and write it to `index_dir`, default under the cache dir, if `save`)."""
        index = cls(
            folder,
            embedder or load_embedder(),
            index_dir=(index_dir or default_index_dir(folder)) if save else index_dir,
            chunk_size=chunk_size,
            chunk_overlap=chunk_overlap,
        )
        index.last_report = index._refresh(allow_empty=False, save=save)
        return index

    @classmethod
    def load(
        cls, index_dir: str | Path, embedder: Embedder | None = None, folder: str | Path | None = None
    ) -> FolderIndex:
        """An index saved by `build`/`update`; `folder` overrides the stored folder (e.g. after moving it)."""
        index_dir = Path(index_dir)
        meta = _read_metadata(index_dir)
        embedder = embedder or load_embedder(meta["embedder"])
        if embedder.dimension != meta["dimension"]:
            raise IndexMismatchError(
                f"{index_dir} was built with {meta['embedder']!r} ({meta['dimension']} dimensions); the given "
                f"embedder {embedder.name!r} has {embedder.dimension}. Rebuild the index with FolderIndex.build."
            )
        if embedder.name != meta["embedder"]:
            warnings.warn(
                f"{index_dir} was built with embedder {meta['embedder']!r}, searching with {embedder.name!r}",
                stacklevel=2,
            )
        index = cls(folder or meta["folder"], embedder, index_dir, meta["chunk_size"], meta["chunk_overlap"])
        vectors = _faiss().deserialize_index(np.fromfile(index_dir / VECTORS_FILE, dtype=np.uint8))
        if vectors.ntotal != len(meta["chunks"]) or vectors.d != embedder.dimension:
            raise IndexMismatchError(
                f"{index_dir} is inconsistent ({vectors.ntotal} vectors, "
                f"{len(meta['chunks'])} chunks); rebuild it with FolderIndex.build."
            )
        index._vectors, index._chunks, index._files = vectors, meta["chunks"], meta["files"]
        return index

    @classmethod
    def open(
        cls,
        folder: str | Path,
        index_dir: str | Path | None = None,
        embedder: Embedder | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        chunk_overlap: int = DEFAULT_CHUNK_OVERLAP,
    ) -> FolderIndex:
        """The saved index of `folder` brought up to date, or a fresh build when none has these settings.

        Vectors of two embedders never mix: a saved index built with another embedder is rebuilt.
        """
        index_dir = Path(index_dir) if index_dir is not None else default_index_dir(folder)
        embedder = embedder or load_embedder()
        try:
            meta = _read_metadata(index_dir)
        except (FileNotFoundError, IndexMismatchError):
            meta = None
        settings = {
            "embedder": embedder.name,
            "dimension": embedder.dimension,
            "chunk_size": chunk_size,
            "chunk_overlap": chunk_overlap,
        }
        if meta is not None and all(meta[key] == value for key, value in settings.items()):
            index = cls.load(index_dir, embedder, folder=folder)
            index.last_report = index.update()
            return index
        return cls.build(folder, index_dir, embedder, chunk_size, chunk_overlap)

    # --------------------------------------------------------------------------------------------- updates

    def update(self, save: bool = True) -> UpdateReport:
        """Re-read the folder: embed new and changed files only, drop deleted ones; save if there is an index_dir."""
        return self._refresh(allow_empty=True, save=save)

    def _refresh(self, allow_empty: bool, save: bool) -> UpdateReport:
        with self._update_lock:
            with self._lock:
                known = dict(self._files)
            loaded = load_folder(self.folder, known=known, allow_empty=allow_empty)
            fresh = {document.source for document in loaded.documents}
            stale = set(known) - set(loaded.unchanged)  # changed, deleted or now unreadable
            chunks = chunk_documents(loaded.documents, self.chunk_size, self.chunk_overlap)
            vectors = self.embedder.embed([chunk.text for chunk in chunks])  # the slow part, outside the lock
            with self._lock:
                drop = [row for row, chunk in enumerate(self._chunks) if chunk["metadata"]["source"] in stale]
                if drop:
                    self._vectors.remove_ids(np.array(drop, dtype=np.int64))  # keeps the other rows in order
                    dropped = set(drop)
                    self._chunks = [c for row, c in enumerate(self._chunks) if row not in dropped]
                if chunks:
                    self._vectors.add(vectors)
                    self._chunks += [{"text": chunk.text, "metadata": chunk.metadata} for chunk in chunks]
                self._files = {source: known[source] for source in loaded.unchanged}
                self._files.update({document.source: document.sha256 for document in loaded.documents})
            if save and self.index_dir is not None:
                self.save()
        return UpdateReport(
            added=sorted(fresh - set(known)),
            changed=sorted(fresh & set(known)),
            removed=sorted(stale - fresh),
            unchanged=sorted(loaded.unchanged),
            skipped=loaded.skipped,
            chunks_embedded=len(chunks),
        )

    def save(self, index_dir: str | Path | None = None) -> Path:
        """Write the vectors and the metadata JSON (vectors first: a crash in between is caught at load)."""
        target = Path(index_dir) if index_dir is not None else self.index_dir
        if target is None:
            raise ValueError("This index has no index_dir; pass one to save().")
        target.mkdir(parents=True, exist_ok=True)
        with self._lock:
            vectors = _faiss().serialize_index(self._vectors)
            meta = {
                "format": INDEX_FORMAT,
                "folder": str(self.folder),
                "embedder": self.embedder.name,
                "dimension": self.embedder.dimension,
                "chunk_size": self.chunk_size,
                "chunk_overlap": self.chunk_overlap,
                "files": self._files,
                "chunks": self._chunks,
            }
            _write_atomic(target / VECTORS_FILE, vectors.tobytes())
            _write_atomic(target / METADATA_FILE, json.dumps(meta, ensure_ascii=False).encode("utf-8"))
        self.index_dir = target
        return target

    # ---------------------------------------------------------------------------------------------- search

    def __len__(self) -> int:
        """Number of chunks."""
        with self._lock:
            return len(self._chunks)

    @property
    def sources(self) -> list[str]:
        with self._lock:
            return sorted(self._files)

    def search(self, query: str, k: int = DEFAULT_K) -> list[RetrievedChunk]:
        """The `k` chunks most similar to `query`, best first; [] when the index is empty."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if not len(self):
            return []
        vector = self.embedder.embed([query])
        with self._lock:
            count = self._vectors.ntotal
            if count == 0:  # emptied by a concurrent update
                return []
            scores, rows = self._vectors.search(vector, min(k, count))
            return [
                RetrievedChunk(self._chunks[row]["text"], float(score), dict(self._chunks[row]["metadata"]))
                for score, row in zip(scores[0], rows[0], strict=True)
                if row >= 0
            ]
