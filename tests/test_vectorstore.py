"""FaissStore as a LangChain VectorStore: langchain-tests' own contract, then what the contract does not cover
(scores, MMR, metadata filters, persistence without pickle, the indexing API, retrievers).

Deterministic fake embeddings keep it fast: no sentence model is loaded here.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from langchain_core.documents import Document
from langchain_core.embeddings import DeterministicFakeEmbedding, Embeddings
from langchain_core.indexing import InMemoryRecordManager, index
from langchain_tests.integration_tests import VectorStoreIntegrationTests

from hsd_rag.retrieval.vectorstore import FaissStore, StoreFileError

FAKE_SIZE = 6  # the standard tests' embedding size


class TestFaissStoreStandard(VectorStoreIntegrationTests):
    """All of LangChain's sync and async vector store tests, get_by_ids included (no xfails)."""

    @pytest.fixture
    def vectorstore(self) -> FaissStore:
        return FaissStore(embedding=self.get_embeddings())


class AxisEmbeddings(Embeddings):
    """Each known word is one axis; a text is the sum of its words' axes (cosine = shared words)."""

    WORDS = ("red", "green", "blue", "fruit", "car", "sky")

    def _vector(self, text: str) -> list[float]:
        words = text.lower().split()
        return [float(words.count(w)) for w in self.WORDS]

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return [self._vector(t) for t in texts]

    def embed_query(self, text: str) -> list[float]:
        return self._vector(text)


DOCS = [
    Document("red fruit", metadata={"colour": "red", "kind": "fruit"}),
    Document("red red fruit", metadata={"colour": "red", "kind": "fruit"}),
    Document("green fruit", metadata={"colour": "green", "kind": "fruit"}),
    Document("red car", metadata={"colour": "red", "kind": "car"}),
    Document("blue sky", metadata={"colour": "blue", "kind": "sky"}),
]


@pytest.fixture
def store() -> FaissStore:
    store = FaissStore(AxisEmbeddings())
    store.add_documents(DOCS, ids=[f"d{i}" for i in range(len(DOCS))])
    return store


def test_scores_are_cosine_similarities_best_first(store):
    hits = store.similarity_search_with_score("red fruit", k=3)
    assert [d.id for d, _ in hits] == ["d0", "d1", "d2"]
    assert hits[0][1] == pytest.approx(1.0)
    assert hits[1][1] == pytest.approx(3 / np.sqrt(2 * 5))  # (2,0,0,1)·(1,0,0,1)
    assert hits[2][1] == pytest.approx(0.5)
    relevance = store.similarity_search_with_relevance_scores("red fruit", k=1)
    assert relevance[0][1] == pytest.approx(1.0)
    assert len(store.similarity_search("red", k=100)) == len(DOCS)  # k larger than the store
    with pytest.raises(ValueError, match="k must be at least 1"):
        store.similarity_search("red", k=0)


def test_metadata_filters_search_only_matching_documents(store):
    cars = store.similarity_search("red fruit", k=3, filter={"kind": "car"})
    assert [d.id for d in cars] == ["d3"]
    not_red = store.similarity_search("red fruit", k=2, filter={"colour": ["green", "blue"]})
    assert [d.id for d in not_red] == ["d2", "d4"]
    predicate = store.similarity_search("red", k=5, filter=lambda d: "sky" in d.page_content)
    assert [d.id for d in predicate] == ["d4"]
    assert store.similarity_search("red", filter={"kind": "boat"}) == []


def test_mmr_trades_relevance_for_diversity(store):
    by_similarity = store.similarity_search("red fruit", k=2)
    assert [d.id for d in by_similarity] == ["d0", "d1"]  # near duplicates
    diverse = store.max_marginal_relevance_search("red fruit", k=2, fetch_k=5, lambda_mult=0.3)
    assert diverse[0].id == "d0" and diverse[1].id != "d1"
    only_fruit = store.max_marginal_relevance_search("red fruit", k=2, fetch_k=5, filter={"kind": "fruit"})
    assert {d.metadata["kind"] for d in only_fruit} == {"fruit"}
    retriever = store.as_retriever(
        search_type="mmr", search_kwargs={"k": 2, "fetch_k": 5, "lambda_mult": 0.3}
    )
    assert [d.id for d in retriever.invoke("red fruit")] == [d.id for d in diverse]


async def test_async_search_matches_sync(store):
    assert await store.asimilarity_search("green", k=2) == store.similarity_search("green", k=2)
    assert await store.amax_marginal_relevance_search("red", k=2) == store.max_marginal_relevance_search(
        "red", k=2
    )


def test_save_and_load_round_trip_is_json_and_faiss_only(store, tmp_path):
    store.delete(["d1"])  # rows after a deletion keep their order
    folder = store.save_local(tmp_path / "store")
    payload = json.loads((folder / "index.json").read_text(encoding="utf-8"))
    assert payload["ids"] == ["d0", "d2", "d3", "d4"]
    loaded = FaissStore.load_local(folder, AxisEmbeddings())
    assert loaded.similarity_search_with_score("red car", k=4) == store.similarity_search_with_score(
        "red car", k=4
    )
    assert loaded.get_by_ids(["d4", "d1"]) == [Document("blue sky", metadata=DOCS[4].metadata, id="d4")]
    np.testing.assert_array_equal(loaded.vectors(), store.vectors())


def test_load_rejects_bad_files(store, tmp_path):
    with pytest.raises(FileNotFoundError, match="No saved FaissStore"):
        FaissStore.load_local(tmp_path, AxisEmbeddings())
    folder = store.save_local(tmp_path / "store")
    payload = json.loads((folder / "index.json").read_text(encoding="utf-8"))
    (folder / "index.json").write_text(json.dumps({**payload, "ids": payload["ids"][:-1]}), encoding="utf-8")
    with pytest.raises(StoreFileError, match="inconsistent"):
        FaissStore.load_local(folder, AxisEmbeddings())
    (folder / "index.json").write_bytes(b"\x80pickle?")
    with pytest.raises(StoreFileError, match="not a FaissStore file"):
        FaissStore.load_local(folder, AxisEmbeddings())
    bad = FaissStore(AxisEmbeddings())
    bad.add_documents([Document("red", metadata={"when": object()})])
    with pytest.raises(TypeError, match="JSON-serialisable"):
        bad.save_local(tmp_path / "bad")


def test_an_empty_store_saves_and_loads(tmp_path):
    folder = FaissStore(AxisEmbeddings()).save_local(tmp_path / "empty")
    loaded = FaissStore.load_local(folder, AxisEmbeddings())
    assert len(loaded) == 0 and loaded.similarity_search("red") == [] and loaded.dimension is None


def test_vectors_of_another_model_are_refused(store):
    store.embedding = DeterministicFakeEmbedding(size=2)
    with pytest.raises(ValueError, match="2-dimensional vectors; this store holds 6-dimensional"):
        store.add_texts(["x"])
    with pytest.raises(ValueError, match="query vector has 2 dimensions"):
        store.similarity_search_by_vector([1.0, 0.0])


def test_duplicate_ids_in_one_call_fail_clearly():
    with pytest.raises(ValueError, match="same id"):
        FaissStore(AxisEmbeddings()).add_texts(["red", "blue"], ids=["a", "a"])


def test_langchain_indexing_api_updates_incrementally():
    """LangChain's own incremental indexing runs on the store: unchanged documents are not embedded again."""

    class Counting(DeterministicFakeEmbedding):
        calls: int = 0

        def embed_documents(self, texts):
            self.calls += len(texts)
            return super().embed_documents(texts)

    embedding = Counting(size=FAKE_SIZE)
    store = FaissStore(embedding)
    records = InMemoryRecordManager("test")
    first = [Document("alpha", metadata={"source": "a"}), Document("beta", metadata={"source": "b"})]
    result = index(first, records, store, cleanup="full", source_id_key="source", key_encoder="sha256")
    assert result["num_added"] == 2 and embedding.calls == 2
    second = [Document("alpha", metadata={"source": "a"}), Document("gamma", metadata={"source": "c"})]
    result = index(second, records, store, cleanup="full", source_id_key="source", key_encoder="sha256")
    assert (result["num_added"], result["num_skipped"], result["num_deleted"]) == (1, 1, 1)
    assert embedding.calls == 3  # only "gamma" was embedded
    assert sorted(d.page_content for d in store.documents()) == ["alpha", "gamma"]
