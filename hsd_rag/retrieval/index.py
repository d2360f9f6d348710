"""`FolderIndex`: the one-call dense index over a document folder, built from the ecosystem's parts.

    index = FolderIndex.open("docs/")        # build, or load and bring up to date
    index.search("question", k=3)           # RetrievedChunk(text, score, metadata), best first
    index.vectorstore                       # a LangChain VectorStore (FaissStore): MMR, filters, as_retriever
    index.as_llama_index()                  # a LlamaIndex VectorStoreIndex over FaissVectorStore

The parts: `FolderLoader` (a LangChain `BaseLoader`) reads the files, LangChain's
`RecursiveCharacterTextSplitter` cuts chunks, any LangChain `Embeddings` or LlamaIndex `BaseEmbedding` embeds
them (the offline MiniLM by default), `FaissStore` holds them, and LangChain's indexing API
(`langchain_core.indexing.index`) keeps the store equal to the folder: a chunk whose text and metadata are
unchanged is never embedded again, chunks of deleted or changed files are removed. Embedding is the slow part
(~20 passages/s on a laptop CPU); a file whose bytes did not change is not even parsed again.

The index lives under the user cache dir, `<cache_dir>/indexes/<folder name>-<hash of its absolute path>`, not
inside the document folder: that folder may be read-only or under version control. Pass `index_dir` to choose.
On disk: the store's `index.faiss` + `index.json`, then `folder.json` (settings and file hashes). No pickle.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import threading
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hsd_rag.paths import cache_dir
from hsd_rag.retrieval.optional import missing_message

try:
    from langchain_core.indexing import InMemoryRecordManager, index
except ImportError as error:
    raise ImportError(missing_message("langchain-core", "FolderIndex")) from error

from hsd_rag.retrieval.chunking import DEFAULT_CHUNK_OVERLAP, DEFAULT_CHUNK_SIZE, split_documents
from hsd_rag.retrieval.embeddings import (
    as_langchain_embeddings,
    default_embedding,
    embedding_dimension,
    embedding_name,
    load_embedding,
)
from hsd_rag.retrieval.loaders import (
    SUPPORTED_EXTENSIONS,
    FolderLoader,
    NoDocumentsError,
    SkippedFile,
    UnreadableFileError,
    supported_extensions_message,
    warn_skipped,
)
from hsd_rag.retrieval.vectorstore import DEFAULT_K, FaissStore, Filter, StoreFileError

INDEX_FORMAT = 2  # bump when the files' layout changes
MANIFEST_FILE = "folder.json"
INDEX_ROOT = "indexes"
FOLDER_HASH_CHARS = 12
KEY_ENCODER = "sha256"  # how the indexing API turns a chunk (text + metadata) into its id
SOURCE_KEY = "source"


class IndexMismatchError(ValueError):
    """A stored index cannot be used as asked (other embedding dimension, corrupt or foreign files)."""


@dataclass(frozen=True)
class RetrievedChunk:
    text: str
    score: float  # cosine similarity to the query
    metadata: dict  # source, chunk_index, start_index (and page, total_pages for a PDF)
    id: str | None = None  # the chunk's id in the vector store


@dataclass
class UpdateReport:
    """What one `build()` / `update()` changed."""

    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)  # deleted, or no longer readable
    unchanged: list[str] = field(default_factory=list)  # same bytes: not parsed, not embedded
    skipped: list[SkippedFile] = field(default_factory=list)
    chunks_embedded: int = 0


def default_index_dir(folder: str | Path) -> Path:
    folder = Path(folder).expanduser().resolve()
    digest = hashlib.sha256(str(folder).encode()).hexdigest()[:FOLDER_HASH_CHARS]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", folder.name) or "root"
    return cache_dir() / INDEX_ROOT / f"{name}-{digest}"


class StoreRecordManager(InMemoryRecordManager):
    """The indexing API's record of what is indexed, read from the store itself (one source of truth).

    Its clock is a counter, not wall time: the records seeded from the store are then strictly older than the
    indexing run that follows, so `cleanup="full"` removes exactly the chunks that run did not see, however
    close together the two happen.
    """

    def __init__(self, store: FaissStore):
        super().__init__(namespace="hsd_rag.folder_index")
        self._clock = itertools.count(1)
        documents = store.documents()
        self.update([d.id for d in documents], group_ids=[d.metadata.get(SOURCE_KEY) for d in documents])

    def get_time(self) -> float:
        return float(next(self._clock))


def _read_manifest(index_dir: Path) -> dict:
    path = index_dir / MANIFEST_FILE
    if not path.exists():
        raise FileNotFoundError(f"No saved folder index in {index_dir} (expected {MANIFEST_FILE})")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise IndexMismatchError(f"{path} is not a folder index manifest ({error})") from error
    if not isinstance(manifest, dict) or manifest.get("format") != INDEX_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise IndexMismatchError(f"{index_dir} holds index format {found}, expected {INDEX_FORMAT}")
    return manifest


class FolderIndex:
    """Chunks of a folder's documents in a `FaissStore`; `search` is safe to call from several threads.

    During an update, a concurrent search may briefly see a changed file's old and new chunks together.
    """

    def __init__(
        self,
        folder: str | Path,
        embedding: Any = None,
        index_dir: str | Path | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        chunk_overlap: int = DEFAULT_CHUNK_OVERLAP,
    ):
        """An empty index; use `build`, `load` or `open` to get a filled one.

        `embedding`: LangChain `Embeddings` or a LlamaIndex `BaseEmbedding`; None = the offline MiniLM.
        """
        self.folder = Path(folder).expanduser().resolve()
        self.embedding = as_langchain_embeddings(embedding) if embedding is not None else default_embedding()
        self.vectorstore = FaissStore(self.embedding)
        self.index_dir = Path(index_dir) if index_dir is not None else None
        self.chunk_size = chunk_size
        self.chunk_overlap = chunk_overlap
        self._files: dict[str, str] = {}  # source -> sha256 of the indexed version
        self._update_lock = threading.Lock()  # one update at a time; searches continue while it embeds
        self._llama_index: tuple[int, Any] | None = None  # (store version, VectorStoreIndex) of the last view
        self.last_report: UpdateReport | None = None  # what the latest build / open changed

    # ----------------------------------------------------------------------------------------- construction

    @classmethod
    def build(
        cls,
        folder: str | Path,
        index_dir: str | Path | None = None,
        embedding: Any = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        chunk_overlap: int = DEFAULT_CHUNK_OVERLAP,
        save: bool = True,
    ) -> FolderIndex:
        """Index `folder` from scratch (and write it to `index_dir`, default under the cache dir, if `save`)."""
        index_dir = (index_dir or default_index_dir(folder)) if save else index_dir
        folder_index = cls(folder, embedding, index_dir, chunk_size, chunk_overlap)
        folder_index.last_report = folder_index._refresh(allow_empty=False, save=save)
        return folder_index

    @classmethod
    def load(
        cls, index_dir: str | Path, embedding: Any = None, folder: str | Path | None = None
    ) -> FolderIndex:
        """An index saved by `build`/`update`; `folder` overrides the stored folder (e.g. after moving it).

        Without `embedding`, the model recorded in the index is loaded again (the default MiniLM, or a
        sentence-transformers model by name); any other model must be passed.
        """
        index_dir = Path(index_dir)
        manifest = _read_manifest(index_dir)
        embedding = (
            as_langchain_embeddings(embedding)
            if embedding is not None
            else load_embedding(manifest["embedding"])
        )
        name = embedding_name(embedding)
        stored = manifest["dimension"]
        given = embedding_dimension(embedding) if stored is not None else None
        if given != stored:
            raise IndexMismatchError(
                f"{index_dir} was built with {manifest['embedding']!r} ({stored} dimensions); the given "
                f"embedding {name!r} has {given}. Rebuild the index with FolderIndex.build."
            )
        if name != manifest["embedding"]:
            warnings.warn(
                f"{index_dir} was built with embedding {manifest['embedding']!r}, searching with {name!r}",
                stacklevel=2,
            )
        folder_index = cls(
            folder or manifest["folder"],
            embedding,
            index_dir,
            manifest["chunk_size"],
            manifest["chunk_overlap"],
        )
        try:
            folder_index.vectorstore = FaissStore.load_local(index_dir, embedding)
        except (FileNotFoundError, StoreFileError) as error:
            raise IndexMismatchError(f"{error}; rebuild the index with FolderIndex.build.") from error
        folder_index._files = dict(manifest["files"])
        return folder_index

    @classmethod
    def open(
        cls,
        folder: str | Path,
        index_dir: str | Path | None = None,
        embedding: Any = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        chunk_overlap: int = DEFAULT_CHUNK_OVERLAP,
    ) -> FolderIndex:
        """The saved index of `folder` brought up to date, or a fresh build when none has these settings.

        Vectors of two embedding models never mix: a saved index built with another model is rebuilt.
        """
        index_dir = Path(index_dir) if index_dir is not None else default_index_dir(folder)
        embedding = as_langchain_embeddings(embedding) if embedding is not None else default_embedding()
        settings = {
            "embedding": embedding_name(embedding),
            "chunk_size": chunk_size,
            "chunk_overlap": chunk_overlap,
        }
        try:
            manifest = _read_manifest(index_dir)
            if all(manifest[key] == value for key, value in settings.items()):
                folder_index = cls.load(index_dir, embedding, folder=folder)
                folder_index.last_report = folder_index.update()
                return folder_index
        except (FileNotFoundError, IndexMismatchError):
            pass
        return cls.build(folder, index_dir, embedding, chunk_size, chunk_overlap)

    # --------------------------------------------------------------------------------------------- updates

    def update(self, save: bool = True) -> UpdateReport:
        """Re-read the folder: embed new and changed chunks only, drop stale ones; save if it has an index_dir."""
        return self._refresh(allow_empty=True, save=save)

    def _refresh(self, allow_empty: bool, save: bool) -> UpdateReport:
        with self._update_lock:
            loader = FolderLoader(self.folder)
            stored = defaultdict(list)  # source -> its chunks in the store, in order
            for chunk in self.vectorstore.documents():
                stored[chunk.metadata.get(SOURCE_KEY)].append(chunk)
            chunks, files, report = [], {}, UpdateReport()
            for source, path in loader.files():
                try:
                    if path.suffix.lower() not in SUPPORTED_EXTENSIONS:
                        raise UnreadableFileError(f"unsupported extension {path.suffix.lower() or '(none)'}")
                    raw = path.read_bytes()
                    digest = hashlib.sha256(raw).hexdigest()
                    if self._files.get(source) == digest and stored.get(source):
                        chunks += stored[source]  # same bytes: the same chunks, known to the indexing API
                        report.unchanged.append(source)
                    else:
                        chunks += split_documents(
                            loader.load_file(source, raw), self.chunk_size, self.chunk_overlap
                        )
                        (report.changed if source in self._files else report.added).append(source)
                    files[source] = digest
                except UnreadableFileError as reason:
                    report.skipped.append(SkippedFile(source, str(reason)))
                except OSError as error:
                    report.skipped.append(
                        SkippedFile(source, f"could not be read ({error.strerror or error})")
                    )
            if report.skipped:
                warn_skipped(report.skipped, self.folder, stacklevel=4)
            if not allow_empty and not chunks:
                raise NoDocumentsError(
                    f"No readable documents in {self.folder}; {supported_extensions_message()}."
                )
            result = index(
                chunks,
                StoreRecordManager(self.vectorstore),
                self.vectorstore,
                cleanup="full",
                source_id_key=SOURCE_KEY,
                key_encoder=KEY_ENCODER,
            )
            report.removed = sorted(set(self._files) - set(files))
            report.chunks_embedded = result["num_added"]
            self._files = files
            if save and self.index_dir is not None:
                self.save()
        return report

    def save(self, index_dir: str | Path | None = None) -> Path:
        """Write the store's files, then `folder.json` (a crash in between is repaired by the next update)."""
        target = Path(index_dir) if index_dir is not None else self.index_dir
        if target is None:
            raise ValueError("This index has no index_dir; pass one to save().")
        self.vectorstore.save_local(target)
        manifest = {
            "format": INDEX_FORMAT,
            "folder": str(self.folder),
            "embedding": embedding_name(self.embedding),
            "dimension": self.vectorstore.dimension,
            "chunk_size": self.chunk_size,
            "chunk_overlap": self.chunk_overlap,
            "files": self._files,
        }
        tmp = target / f"{MANIFEST_FILE}.tmp"
        tmp.write_text(json.dumps(manifest, ensure_ascii=False), encoding="utf-8")
        tmp.replace(target / MANIFEST_FILE)
        self.index_dir = target
        return target

    # ---------------------------------------------------------------------------------------------- search

    def __len__(self) -> int:
        """Number of chunks."""
        return len(self.vectorstore)

    @property
    def sources(self) -> list[str]:
        return sorted(self._files)

    def search(self, query: str, k: int = DEFAULT_K, filter: Filter | None = None) -> list[RetrievedChunk]:
        """The `k` chunks most similar to `query`, best first; [] when the index is empty.

        `filter`: metadata that must match, e.g. `{"source": "notes/a.md"}`, or a predicate on the Document.
        """
        hits = self.vectorstore.similarity_search_with_score(query, k, filter=filter)
        return [RetrievedChunk(doc.page_content, score, doc.metadata, doc.id) for doc, score in hits]

    async def asearch(
        self, query: str, k: int = DEFAULT_K, filter: Filter | None = None
    ) -> list[RetrievedChunk]:
        hits = await self.vectorstore.asimilarity_search_with_score(query, k, filter=filter)
        return [RetrievedChunk(doc.page_content, score, doc.metadata, doc.id) for doc, score in hits]

    def as_retriever(self, **kwargs: Any):
        """LangChain's own `VectorStoreRetriever` over the store (`search_type="mmr"`, `search_kwargs`...)."""
        return self.vectorstore.as_retriever(**kwargs)

    def as_llama_index(self):
        """The chunks as a LlamaIndex `VectorStoreIndex` over `FaissVectorStore` (same vectors, not embedded
        again). Rebuilt only when the folder index changed since the last call; `.as_retriever()`,
        `.as_query_engine(llm=...)` and `storage_context.persist()` work as for any VectorStoreIndex.
        """
        from hsd_rag.retrieval.llama_index_retriever import vector_store_index

        version = self.vectorstore.version
        if self._llama_index is None or self._llama_index[0] != version:
            self._llama_index = (version, vector_store_index(self.vectorstore))
        return self._llama_index[1]
