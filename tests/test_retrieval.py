"""Folder loading, chunking and the FAISS folder index with its LangChain / LlamaIndex retrievers.

Uses the real offline MiniLM, faiss, langchain-core and llama-index-core objects, on a handful of one-line
documents so that embedding stays fast on a small CPU.
"""

import importlib.util
import subprocess
import sys
import textwrap
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from langchain_tests.integration_tests import RetrieversIntegrationTests

from hsd_rag.retrieval import (
    FolderIndex,
    IndexMismatchError,
    LoadedDocument,
    NoDocumentsError,
    SkippedFileWarning,
    chunk_documents,
    default_embedder,
    load_folder,
)

DOCS = {
    "eiffel.txt": "The Eiffel Tower in Paris was designed by the company of the engineer Gustave Eiffel.",
    "notes/curie.md": "# Marie Curie\n\nMarie Curie won two Nobel Prizes, in physics and in chemistry.",
    "reef.html": (
        "<html><head><title>Reef</title><style>p {color: red}</style><script>var x = 1;</script></head>"
        "<body><p>The Great Barrier Reef lies off Queensland &amp; is the largest coral reef.</p></body></html>"
    ),
}
EVEREST = "Mount Everest is the highest mountain above sea level, in the Himalayas."
SMALL_K = 2
CONCURRENT_SEARCHES = 8


class CountingEmbedder:
    """The real embedder, counting how many texts it was asked to embed."""

    def __init__(self, inner):
        self.inner, self.name, self.dimension = inner, inner.name, inner.dimension
        self.texts = 0
        self._lock = threading.Lock()

    def embed(self, texts):
        with self._lock:
            self.texts += len(texts)
        return self.inner.embed(texts)


class PrefixEmbedder:
    """A genuinely different (smaller) embedder: the first dimensions of MiniLM, renormalised."""

    DIMENSION = 8

    def __init__(self, inner):
        self.inner, self.name, self.dimension = inner, "minilm-prefix", self.DIMENSION

    def embed(self, texts):
        vectors = self.inner.embed(texts)[:, : self.DIMENSION]
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def minilm():
    return default_embedder()


@pytest.fixture
def embedder(minilm):
    return CountingEmbedder(minilm)


def write_docs(folder, docs=DOCS):
    for name, text in docs.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return folder


@pytest.fixture
def docs(tmp_path):
    return write_docs(tmp_path / "docs")


@pytest.fixture(scope="module")
def shared_index(tmp_path_factory, minilm):
    """One index for the read-only tests (retrievers), built once."""
    folder = write_docs(tmp_path_factory.mktemp("shared") / "docs")
    return FolderIndex.build(folder, index_dir=folder.parent / "index", embedder=minilm)


# ------------------------------------------------------------------------------------------------ loading


def test_folder_with_txt_md_html_loads(docs):
    (docs / ".hidden").mkdir()
    (docs / ".hidden" / "secret.txt").write_text("not a document", encoding="utf-8")
    report = load_folder(docs)
    texts = {d.source: d.text for d in report.documents}
    assert sorted(texts) == ["eiffel.txt", "notes/curie.md", "reef.html"]
    assert (
        texts["reef.html"]
        == "Reef\n\nThe Great Barrier Reef lies off Queensland & is the largest coral reef."
    )
    assert not report.skipped


def test_binary_and_undecodable_files_are_skipped_with_a_warning(docs):
    (docs / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (docs / "dump.txt").write_bytes(b"text\x00\x01\x02")
    (docs / "latin1.md").write_bytes("café".encode("latin-1"))
    with pytest.warns(SkippedFileWarning, match="Skipped 3 file"):
        report = load_folder(docs)
    reasons = {s.source: s.reason for s in report.skipped}
    assert reasons["photo.png"].startswith("unsupported extension")
    assert reasons["dump.txt"] == "binary content"
    assert reasons["latin1.md"].startswith("not UTF-8")
    assert len(report.documents) == len(DOCS)


@pytest.mark.skipif(importlib.util.find_spec("pypdf") is not None, reason="pypdf is installed here")
def test_pdf_without_pypdf_names_the_install_command(docs):
    (docs / "paper.pdf").write_bytes(b"%PDF-1.4\n")
    with pytest.warns(SkippedFileWarning, match="pip install pypdf"):
        load_folder(docs)


def test_empty_and_missing_folders_fail_clearly(tmp_path):
    with pytest.raises(NoDocumentsError, match=r"supported extensions: \.htm, \.html, \.md, \.pdf, \.txt"):
        load_folder(tmp_path)
    (tmp_path / "blob.bin").write_bytes(b"\x00")
    with pytest.warns(SkippedFileWarning), pytest.raises(ValueError, match="No readable documents"):
        load_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="Document folder not found"):
        load_folder(tmp_path / "nope")


def test_chunks_carry_source_index_and_offset():
    text = " ".join(f"Sentence number {i} is about chunking." for i in range(40))
    chunks = chunk_documents([LoadedDocument("long.txt", text, "hash")], chunk_size=200, chunk_overlap=40)
    assert len(chunks) > 1
    for index, chunk in enumerate(chunks):
        assert len(chunk.text) <= 200
        assert chunk.metadata["source"] == "long.txt" and chunk.metadata["chunk_index"] == index
        start = chunk.metadata["start_index"]
        assert text[start : start + len(chunk.text)] == chunk.text


# -------------------------------------------------------------------------------------------------- index


def test_search_finds_the_matching_document(shared_index):
    (best, *_) = shared_index.search("Who designed the tower in Paris?", k=SMALL_K)
    assert best.metadata["source"] == "eiffel.txt" and 0 < best.score <= 1
    assert len(shared_index.search("coral", k=100)) == len(DOCS)  # k larger than the index
    with pytest.raises(ValueError):
        shared_index.search("x", k=0)


def test_incremental_update_embeds_only_new_or_changed_files(docs, tmp_path, embedder):
    index = FolderIndex.build(docs, index_dir=tmp_path / "index", embedder=embedder)
    assert embedder.texts == len(DOCS) == len(index)

    (docs / "everest.txt").write_text(EVEREST, encoding="utf-8")
    report = index.update()
    assert report.added == ["everest.txt"] and report.chunks_embedded == 1 and embedder.texts == len(DOCS) + 1
    assert index.search("highest mountain", k=1)[0].metadata["source"] == "everest.txt"

    (docs / "eiffel.txt").write_text("The Eiffel Tower is 330 metres tall.", encoding="utf-8")
    (docs / "reef.html").unlink()
    report = index.update()
    assert report.changed == ["eiffel.txt"] and report.removed == ["reef.html"]
    assert report.unchanged == ["everest.txt", "notes/curie.md"] and report.chunks_embedded == 1
    assert sorted(c.metadata["source"] for c in index.search("anything", k=10)) == [
        "eiffel.txt",
        "everest.txt",
        "notes/curie.md",
    ]
    assert "330 metres" in index.search("How tall is the Eiffel Tower?", k=1)[0].text

    assert index.update().chunks_embedded == 0  # nothing changed, nothing embedded


def test_persistence_round_trip(docs, tmp_path, embedder, minilm):
    index_dir = tmp_path / "index"
    built = FolderIndex.build(docs, index_dir=index_dir, embedder=embedder)
    query = "Nobel Prize in chemistry"
    loaded = FolderIndex.load(index_dir)  # the embedder is reloaded from the stored name
    assert loaded.embedder is minilm and loaded.folder == built.folder
    assert loaded.search(query, k=3) == built.search(query, k=3)

    embedder.texts = 0
    reopened = FolderIndex.open(docs, index_dir=index_dir, embedder=embedder)
    assert embedder.texts == 0 and len(reopened) == len(DOCS)  # an unchanged folder embeds nothing
    assert len(reopened.last_report.unchanged) == len(DOCS)

    smaller = PrefixEmbedder(minilm)
    with pytest.raises(IndexMismatchError, match="dimensions"):
        FolderIndex.load(index_dir, embedder=smaller)
    rebuilt = FolderIndex.open(docs, index_dir=index_dir, embedder=smaller)  # vectors of two models never mix
    assert rebuilt.last_report.chunks_embedded == len(DOCS)
    assert FolderIndex.load(index_dir, embedder=smaller).embedder is smaller


def test_empty_index_returns_no_results(docs, tmp_path, embedder):
    index = FolderIndex.build(docs, index_dir=tmp_path / "index", embedder=embedder)
    for name in DOCS:
        (docs / name).unlink()
    assert index.update().removed == sorted(DOCS)
    assert len(index) == 0 and index.search("Eiffel Tower") == []
    assert FolderIndex.load(tmp_path / "index", embedder=embedder).search("Eiffel Tower") == []
    assert FolderIndex(docs, embedder).search("anything") == []


def test_concurrent_searches_agree(shared_index):
    queries = ["Paris tower", "Nobel Prize", "coral reef", "Queensland"] * (CONCURRENT_SEARCHES // 4)
    expected = [shared_index.search(q, k=1)[0].metadata["source"] for q in queries]
    with ThreadPoolExecutor(max_workers=CONCURRENT_SEARCHES) as pool:
        found = list(pool.map(lambda q: shared_index.search(q, k=1)[0].metadata["source"], queries))
    assert found == expected


# ------------------------------------------------------------------------------------------- integrations


def test_langchain_retriever_returns_documents(shared_index):
    from langchain_core.documents import Document

    from hsd_rag.retrieval.langchain_retriever import FolderRetriever

    retriever = FolderRetriever(index=shared_index, k=SMALL_K)
    documents = retriever.invoke("Marie Curie Nobel Prizes")
    assert len(documents) == SMALL_K and all(isinstance(d, Document) for d in documents)
    assert documents[0].metadata["source"] == "notes/curie.md"
    assert documents[0].metadata["score"] >= documents[1].metadata["score"]
    assert "Nobel" in documents[0].page_content


async def test_langchain_retriever_async(shared_index):
    from hsd_rag.retrieval.langchain_retriever import FolderRetriever

    documents = await FolderRetriever(index=shared_index, k=1).ainvoke("coral reef")
    assert documents[0].metadata["source"] == "reef.html"


class TestFolderRetrieverStandard(RetrieversIntegrationTests):
    """LangChain's own retriever contract (k in the constructor and per call, sync and async invoke)."""

    @pytest.fixture(autouse=True)
    def _index(self, shared_index):
        self.index = shared_index

    @property
    def retriever_constructor(self):
        from hsd_rag.retrieval.langchain_retriever import FolderRetriever

        return FolderRetriever

    @property
    def retriever_constructor_params(self):
        return {"index": self.index}

    @property
    def retriever_query_example(self):
        return "Who designed the Eiffel Tower?"


def test_langchain_retriever_on_empty_index(tmp_path, minilm):
    from hsd_rag.retrieval.langchain_retriever import FolderRetriever

    assert FolderRetriever(index=FolderIndex(tmp_path, minilm)).invoke("anything") == []


def test_llama_index_retriever_returns_nodes_with_scores(shared_index):
    from llama_index.core.schema import MetadataMode, NodeWithScore, TextNode

    from hsd_rag.retrieval.llama_index_retriever import FolderNodeRetriever

    nodes = FolderNodeRetriever(shared_index, k=SMALL_K).retrieve("coral reef off Queensland")
    assert len(nodes) == SMALL_K and all(isinstance(n, NodeWithScore) for n in nodes)
    best = nodes[0]
    assert isinstance(best.node, TextNode) and best.node.metadata["source"] == "reef.html"
    assert best.node.node_id == "reef.html#0" and best.score >= nodes[1].score
    assert "start_index" not in best.node.get_content(metadata_mode=MetadataMode.LLM)


def test_llama_index_query_engine_with_any_llm(shared_index):
    from llama_index.core.llms import MockLLM

    from hsd_rag.retrieval.llama_index_retriever import build_query_engine

    engine = build_query_engine(shared_index, llm=MockLLM(), k=1)
    response = engine.query("Who designed the Eiffel Tower?")
    assert [n.node.metadata["source"] for n in response.source_nodes] == ["eiffel.txt"]


def test_build_on_an_empty_folder_fails_and_clean_folders_warn_nothing(docs, tmp_path, embedder):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NoDocumentsError):
        FolderIndex.build(empty, embedder=embedder, save=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SkippedFileWarning)
        FolderIndex.build(docs, embedder=embedder, save=False)


def test_imports_work_without_the_optional_packages():
    """Blocked optional packages: importing works, using them names the pip command."""
    script = textwrap.dedent(
        """
        import sys
        for name in ("faiss", "sentence_transformers", "langchain_core", "langchain_text_splitters", "llama_index"):
            sys.modules[name] = None  # makes `import name` raise ImportError
        import hsd_rag.data, hsd_rag.retrieval
        from hsd_rag.retrieval import FolderIndex, chunk_documents
        for call, hint in ((lambda: FolderIndex(".", None), "pip install faiss-cpu"),
                           (lambda: chunk_documents([]), "pip install langchain-text-splitters")):
            try:
                call()
            except ImportError as error:
                assert hint in str(error), error
            else:
                raise AssertionError("no ImportError")
        try:
            import hsd_rag.retrieval.langchain_retriever
        except ImportError as error:
            assert "pip install langchain-core" in str(error), error
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert result.stdout.strip() == "ok", result.stderr
