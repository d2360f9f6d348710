"""Folder loading, chunking and the folder index with its LangChain / LlamaIndex faces.

Uses the real offline MiniLM (through llama-index-embeddings-huggingface), faiss, langchain-core and
llama-index-core objects, on a handful of one-line documents so that embedding stays fast on a small CPU.
"""

import importlib.util
import subprocess
import sys
import textwrap
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.vectorstores import VectorStore
from langchain_tests.integration_tests import RetrieversIntegrationTests

from hsd_rag.retrieval import (
    FolderIndex,
    FolderLoader,
    IndexMismatchError,
    LlamaIndexEmbeddings,
    NoDocumentsError,
    SkippedFileWarning,
    default_embedding,
    split_documents,
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


class CountingEmbeddings(LlamaIndexEmbeddings):
    """The default MiniLM (same name, so indexes take it for the default), counting the texts it embeds."""

    def __init__(self, inner: LlamaIndexEmbeddings):
        super().__init__(inner.model, name=inner.name)
        self.texts = 0
        self._lock = threading.Lock()

    def embed_documents(self, texts):
        with self._lock:
            self.texts += len(texts)
        return super().embed_documents(texts)


class PrefixEmbeddings(Embeddings):
    """A genuinely different (smaller) model: the first dimensions of MiniLM."""

    DIMENSION = 8

    def __init__(self, inner: Embeddings):
        self.inner = inner

    def embed_documents(self, texts):
        return [v[: self.DIMENSION] for v in self.inner.embed_documents(texts)]

    def embed_query(self, text):
        return self.inner.embed_query(text)[: self.DIMENSION]


def pdf_bytes(pages: list[str]) -> bytes:
    """A minimal valid PDF with one line of Helvetica text per page (what pypdf reads back as the page text)."""
    count = len(pages)
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>"]
    kids = " ".join(f"{3 + 2 * i} 0 R" for i in range(count))
    objects.append(f"<< /Type /Pages /Kids [{kids}] /Count {count} >>".encode())
    font = 3 + 2 * count
    for i, text in enumerate(pages):
        stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
        objects.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 {font} 0 R >> >> "
            f"/Contents {4 + 2 * i} 0 R >>".encode()
        )
        objects.append(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream))
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


@pytest.fixture(scope="module")
def minilm():
    return default_embedding()


@pytest.fixture
def embedder(minilm):
    return CountingEmbeddings(minilm)


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
    return FolderIndex.build(folder, index_dir=folder.parent / "index", embedding=minilm)


# ------------------------------------------------------------------------------------------------ loading


def test_folder_with_txt_md_html_loads(docs):
    (docs / ".hidden").mkdir()
    (docs / ".hidden" / "secret.txt").write_text("not a document", encoding="utf-8")
    loader = FolderLoader(docs)
    texts = {d.metadata["source"]: d.page_content for d in loader.load()}
    assert sorted(texts) == ["eiffel.txt", "notes/curie.md", "reef.html"]
    assert (
        texts["reef.html"]
        == "Reef\n\nThe Great Barrier Reef lies off Queensland & is the largest coral reef."
    )
    assert not loader.skipped


def test_binary_and_undecodable_files_are_skipped_with_a_warning(docs):
    (docs / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (docs / "dump.txt").write_bytes(b"text\x00\x01\x02")
    (docs / "latin1.md").write_bytes("café".encode("latin-1"))
    loader = FolderLoader(docs)
    with pytest.warns(SkippedFileWarning, match="Skipped 3 file"):
        documents = loader.load()
    reasons = {s.source: s.reason for s in loader.skipped}
    assert reasons["photo.png"].startswith("unsupported extension")
    assert reasons["dump.txt"] == "binary content"
    assert reasons["latin1.md"].startswith("not UTF-8")
    assert len(documents) == len(DOCS)


def test_pdf_without_pypdf_names_the_install_command(docs, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(  # pypdf is part of the dev extra: pretend it is not installed
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "pypdf" else real_find_spec(name, *args),
    )
    (docs / "paper.pdf").write_bytes(pdf_bytes(["Some text."]))
    loader = FolderLoader(docs)
    with pytest.warns(SkippedFileWarning, match="pip install pypdf"):
        assert len(loader.load()) == len(DOCS)
    assert [s.source for s in loader.skipped] == ["paper.pdf"]


@pytest.mark.skipif(importlib.util.find_spec("pypdf") is None, reason="needs pypdf (the pdf extra)")
def test_pdf_pages_become_documents_with_page_metadata(tmp_path, embedder):
    folder = tmp_path / "pdfs"
    folder.mkdir()
    (folder / "paper.pdf").write_bytes(
        pdf_bytes(["Penguins live in Antarctica.", "Camels cross the Sahara."])
    )
    pages = FolderLoader(folder).load()
    assert [(d.page_content.strip(), d.metadata) for d in pages] == [
        ("Penguins live in Antarctica.", {"source": "paper.pdf", "page": 0, "total_pages": 2}),
        ("Camels cross the Sahara.", {"source": "paper.pdf", "page": 1, "total_pages": 2}),
    ]
    index = FolderIndex.build(folder, embedding=embedder, save=False)
    (best,) = index.search("Which animal crosses the desert?", k=1)
    assert best.metadata["page"] == 1 and best.metadata["chunk_index"] == 1  # chunks count across pages
    from llama_index.core.schema import MetadataMode

    from hsd_rag.retrieval.llama_index_retriever import FolderNodeRetriever

    (node,) = FolderNodeRetriever(index, k=1).retrieve("Which animal crosses the desert?")
    shown = node.node.get_content(metadata_mode=MetadataMode.LLM)
    assert "page: 1" in shown and "total_pages" not in shown and "start_index" not in shown


def test_empty_and_missing_folders_fail_clearly(tmp_path, embedder):
    with pytest.raises(NoDocumentsError, match=r"supported extensions: \.htm, \.html, \.md, \.pdf, \.txt"):
        FolderIndex.build(tmp_path, embedding=embedder, save=False)
    (tmp_path / "blob.bin").write_bytes(b"\x00")
    with pytest.warns(SkippedFileWarning), pytest.raises(ValueError, match="No readable documents"):
        FolderIndex.build(tmp_path, embedding=embedder, save=False)
    with pytest.raises(FileNotFoundError, match="Document folder not found"):
        FolderLoader(tmp_path / "nope").load()
    assert embedder.texts == 0


def test_chunks_carry_source_index_and_offset():
    text = " ".join(f"Sentence number {i} is about chunking." for i in range(40))
    chunks = split_documents(
        [Document(text, metadata={"source": "long.txt"})], chunk_size=200, chunk_overlap=40
    )
    assert len(chunks) > 1
    for index, chunk in enumerate(chunks):
        assert len(chunk.page_content) <= 200
        assert chunk.metadata["source"] == "long.txt" and chunk.metadata["chunk_index"] == index
        start = chunk.metadata["start_index"]
        assert text[start : start + len(chunk.page_content)] == chunk.page_content


# -------------------------------------------------------------------------------------------------- index


def test_search_finds_the_matching_document(shared_index):
    (best, *_) = shared_index.search("Who designed the tower in Paris?", k=SMALL_K)
    assert best.metadata["source"] == "eiffel.txt" and 0 < best.score <= 1
    assert len(shared_index.search("coral", k=100)) == len(DOCS)  # k larger than the index
    with pytest.raises(ValueError):
        shared_index.search("x", k=0)


def test_incremental_update_embeds_only_new_or_changed_files(docs, tmp_path, embedder):
    index = FolderIndex.build(docs, index_dir=tmp_path / "index", embedding=embedder)
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
    built = FolderIndex.build(docs, index_dir=index_dir, embedding=embedder)
    query = "Nobel Prize in chemistry"
    loaded = FolderIndex.load(index_dir)  # the embedding model is reloaded from the stored name
    assert loaded.embedding is minilm and loaded.folder == built.folder
    assert loaded.search(query, k=3) == built.search(query, k=3)

    embedder.texts = 0
    reopened = FolderIndex.open(docs, index_dir=index_dir, embedding=embedder)
    assert embedder.texts == 0 and len(reopened) == len(DOCS)  # an unchanged folder embeds nothing
    assert len(reopened.last_report.unchanged) == len(DOCS)

    smaller = PrefixEmbeddings(minilm)
    with pytest.raises(IndexMismatchError, match="dimensions"):
        FolderIndex.load(index_dir, embedding=smaller)
    rebuilt = FolderIndex.open(
        docs, index_dir=index_dir, embedding=smaller
    )  # vectors of two models never mix
    assert rebuilt.last_report.chunks_embedded == len(DOCS)
    assert FolderIndex.load(index_dir, embedding=smaller).embedding is smaller
    with pytest.raises(ValueError, match="pass the same model as `embedding=`"):
        FolderIndex.load(index_dir)  # a model of the user's own cannot be recreated by name


def test_empty_index_returns_no_results(docs, tmp_path, embedder):
    index = FolderIndex.build(docs, index_dir=tmp_path / "index", embedding=embedder)
    for name in DOCS:
        (docs / name).unlink()
    assert index.update().removed == sorted(DOCS)
    assert len(index) == 0 and index.search("Eiffel Tower") == []
    assert FolderIndex.load(tmp_path / "index", embedding=embedder).search("Eiffel Tower") == []
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
        FolderIndex.build(empty, embedding=embedder, save=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SkippedFileWarning)
        FolderIndex.build(docs, embedding=embedder, save=False)


def test_retrieval_needs_no_model_loader_and_names_missing_packages():
    """Retrieval never imports the model loader; without the optional packages, using it names the pip command."""
    script = textwrap.dedent(
        """
        import sys, tempfile, pathlib
        from langchain_core.embeddings import DeterministicFakeEmbedding
        from hsd_rag.retrieval import FolderIndex
        folder = pathlib.Path(tempfile.mkdtemp())
        (folder / "a.txt").write_text("alpha beta", encoding="utf-8")
        index = FolderIndex.build(folder, folder / ".index", embedding=DeterministicFakeEmbedding(size=8))
        assert FolderIndex.load(folder / ".index", embedding=DeterministicFakeEmbedding(size=8)).search("alpha")
        assert "hsd_rag.loading" not in sys.modules, "retrieval imported the model loader"
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert result.stdout.strip() == "ok", result.stderr

    blocked = textwrap.dedent(
        """
        import sys
        blocked = ("faiss", "sentence_transformers", "langchain_core", "langchain_text_splitters", "llama_index")
        for name in blocked:
            sys.modules[name] = None  # makes `import name` raise ImportError
        import hsd_rag.data, hsd_rag.retrieval
        for name in ("FolderIndex", "FaissStore", "FolderLoader"):
            try:
                getattr(hsd_rag.retrieval, name)
            except ImportError as error:
                assert "pip install langchain-core" in str(error), error
            else:
                raise AssertionError("no ImportError")
        try:
            import hsd_rag.retrieval.llama_index_retriever
        except ImportError as error:
            assert "pip install" in str(error), error
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, check=False)
    assert result.stdout.strip() == "ok", result.stderr


# ------------------------------------------------------------------------------- the ecosystem's own faces


def test_index_is_a_langchain_vectorstore(shared_index):
    store = shared_index.vectorstore
    assert isinstance(store, VectorStore) and len(store) == len(DOCS)
    docs_and_scores = store.similarity_search_with_score("Who designed the tower in Paris?", k=1)
    best = shared_index.search("Who designed the tower in Paris?", k=1)[0]
    assert docs_and_scores[0][0].page_content == best.text and docs_and_scores[0][1] == pytest.approx(
        best.score
    )
    only_curie = shared_index.search("tower", k=3, filter={"source": "notes/curie.md"})
    assert [c.metadata["source"] for c in only_curie] == ["notes/curie.md"]
    mmr = shared_index.as_retriever(search_type="mmr", search_kwargs={"k": 2, "fetch_k": 3})
    assert len(mmr.invoke("coral reef")) == 2


def test_index_accepts_a_llama_index_embedding(docs, minilm):
    """A LlamaIndex BaseEmbedding (here LlamaIndex's own HuggingFaceEmbedding) is accepted as it is."""
    from llama_index.core.base.embeddings.base import BaseEmbedding

    assert isinstance(minilm.model, BaseEmbedding)
    index = FolderIndex.build(docs, embedding=minilm.model, save=False)
    assert index.search("coral reef", k=1)[0].metadata["source"] == "reef.html"


def test_llama_index_view_is_a_vector_store_index_over_faiss(docs, tmp_path, embedder):
    from llama_index.core import VectorStoreIndex
    from llama_index.vector_stores.faiss import FaissVectorStore

    index = FolderIndex.build(docs, index_dir=tmp_path / "index", embedding=embedder)
    view = index.as_llama_index()
    assert isinstance(view, VectorStoreIndex) and isinstance(view.vector_store, FaissVectorStore)
    assert index.as_llama_index() is view  # cached while nothing changes
    query = "coral reef off Queensland"
    (hit,) = view.as_retriever(similarity_top_k=1).retrieve(query)
    best = index.search(query, k=1)[0]
    assert hit.node.node_id == "reef.html#0" and hit.score == pytest.approx(best.score, abs=1e-5)
    embedded = embedder.texts
    (docs / "everest.txt").write_text(EVEREST, encoding="utf-8")
    index.update()
    fresh = index.as_llama_index()
    assert fresh is not view and embedder.texts == embedded + 1  # the view reuses the stored vectors
    (hit,) = fresh.as_retriever(similarity_top_k=1).retrieve("highest mountain")
    assert hit.node.metadata["source"] == "everest.txt"


async def test_llama_index_retriever_async(shared_index):
    from hsd_rag.retrieval.llama_index_retriever import FolderNodeRetriever

    retriever = FolderNodeRetriever(shared_index, k=SMALL_K)
    sync = retriever.retrieve("Marie Curie")
    nodes = await retriever.aretrieve("Marie Curie")
    assert [n.node.node_id for n in nodes] == [n.node.node_id for n in sync]
    assert [n.score for n in nodes] == pytest.approx([n.score for n in sync])
