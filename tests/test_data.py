"""Offline RAG prompt sets: built-in examples, prompt formatting, jsonl files and the held-out split."""

import json

import pytest

from hsd_rag.data import (
    RAG_PROMPT_TEMPLATE,
    DataNotInstalledError,
    RagExample,
    dump_jsonl,
    format_messages,
    load_builtin,
    load_jsonl,
    rag_prompts,
    split,
)
from hsd_rag.data.bm25 import Bm25Index
from hsd_rag.data.make_sample_docs import ATTRIBUTION_FILE, write_sample_docs
from hsd_rag.data.rag_prompts import CACHED_DISTRACTORS
from hsd_rag.data.sources import DataPackage, load_corpus, package_file

ENGLISH_DISTINCT_QUESTIONS = (
    540  # 558 FanOutQA dev sub-questions with their article in the corpus, deduplicated
)
HELDOUT_FRACTION = 0.2
SAMPLE_LIMIT = 5


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    """Keep the derived-example cache of these tests out of the user's cache dir."""
    with pytest.MonkeyPatch.context() as patch:
        cache = tmp_path_factory.mktemp("cache")
        patch.setenv("HSD_RAG_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="module")
def english():
    return load_builtin("en")


def passages_by_title(lang):
    return {article.title: article.text for article in load_corpus(lang)}


def test_english_examples_hold_their_gold_passage(english):
    passages = passages_by_title("en")
    assert len(english) == ENGLISH_DISTINCT_QUESTIONS
    for example in english:
        assert len(example.documents) == 3
        assert len(set(example.documents)) == 3  # distractors are other articles
        assert example.documents[example.gold_index] == passages[example.gold_title]
        assert example.answer and example.lang == "en"
    assert {example.gold_index for example in english} == {0, 1, 2}  # the gold passage is not always first


def test_second_call_is_served_from_the_cache(english, private_cache):
    assert (private_cache / "data" / "builtin-en.json").exists()
    rag_prompts._MEMORY.clear()  # force the disk path, as in a new process
    again = load_builtin("en")
    assert [e.documents for e in again] == [e.documents for e in english]


def test_limit_takes_a_prefix_and_seed_only_reorders(english):
    sample = load_builtin("en", limit=SAMPLE_LIMIT, n_docs=1)
    assert [e.id for e in sample] == [e.id for e in english[:SAMPLE_LIMIT]]
    assert all(e.documents == [english[i].documents[english[i].gold_index]] for i, e in enumerate(sample))
    reseeded = load_builtin("en", limit=SAMPLE_LIMIT, seed=1)
    assert [sorted(e.documents) for e in reseeded] == [sorted(e.documents) for e in english[:SAMPLE_LIMIT]]


def test_more_documents_than_cached_rebuilds_deeper():
    n_docs = CACHED_DISTRACTORS + 2
    examples = load_builtin("en", limit=2, n_docs=n_docs)
    assert all(len(set(e.documents)) == n_docs for e in examples)


@pytest.mark.parametrize("lang", ["fr", "es"])
def test_templated_languages(lang):
    passages = passages_by_title(lang)
    examples = load_builtin(lang, limit=SAMPLE_LIMIT)
    assert len(examples) == SAMPLE_LIMIT
    for example in examples:
        assert example.lang == lang and example.answer is None
        assert example.gold_title in example.question  # templated from the title
        assert example.documents[example.gold_index] == passages[example.gold_title]


def test_bad_arguments():
    with pytest.raises(ValueError, match="Unsupported language"):
        load_builtin("de")
    with pytest.raises(ValueError, match="n_docs"):
        load_builtin("en", n_docs=0)


def test_missing_data_package_names_the_pip_command():
    with pytest.raises(DataNotInstalledError, match=r"pip install --no-deps no-such-data==1\.0"):
        package_file(DataPackage("no_such_data_pkg", "no-such-data==1.0"), "data.json")


def test_format_messages_uses_the_benchmark_prompt():
    example = RagExample(id="x", question="Who built it?", documents=["Doc one.", "Doc two."])
    (message,) = format_messages(example)
    assert message["role"] == "user"
    assert message["content"] == (
        "Use the following pieces of context to answer the question.\nDoc one.\n\nDoc two.\nQuestion: Who built it?"
    )
    assert format_messages(example, template="{query}|{passages}", separator="+")[0]["content"] == (
        "Who built it?|Doc one.+Doc two."
    )
    with pytest.raises(ValueError, match="fields"):
        format_messages(example, template="no fields")
    assert "{passages}" in RAG_PROMPT_TEMPLATE


def test_split_is_deterministic_and_disjoint(english):
    train, heldout = split(english, HELDOUT_FRACTION, seed=0)
    assert {e.id for e in train}.isdisjoint({e.id for e in heldout})
    assert len(train) + len(heldout) == len(english)
    assert abs(len(heldout) / len(english) - HELDOUT_FRACTION) < 0.05
    # membership depends on the id only: not on order, not on which other examples are present
    _, heldout_reversed = split(english[::-1], HELDOUT_FRACTION, seed=0)
    _, heldout_subset = split(english[::2], HELDOUT_FRACTION, seed=0)
    assert {e.id for e in heldout_reversed} == {e.id for e in heldout}
    assert {e.id for e in heldout_subset} == {e.id for e in heldout} & {e.id for e in english[::2]}
    _, heldout_other_seed = split(english, HELDOUT_FRACTION, seed=1)
    assert {e.id for e in heldout_other_seed} != {e.id for e in heldout}
    with pytest.raises(ValueError):
        split(english, 1.5)


def test_load_jsonl_reads_each_prompt_kind(tmp_path):
    path = tmp_path / "prompts.jsonl"
    records = [
        {
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"}],
            "documents": ["a"],
        },
        {"prompt": "Q2 with context", "documents": ["b"], "answer": 42},
        {"id": "mine", "question": "Q3", "documents": ["c", "d"]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    first, second, third = load_jsonl(path)
    assert first.question == "Q1" and format_messages(first) == records[0]["messages"]
    assert (
        format_messages(second) == [{"role": "user", "content": "Q2 with context"}] and second.answer == "42"
    )
    assert third.id == "mine" and format_messages(third)[0]["content"].endswith("Question: Q3")
    assert load_jsonl(path)[0].id == first.id  # content-derived ids are stable

    roundtrip = tmp_path / "roundtrip.jsonl"
    dump_jsonl([first, second, third], roundtrip)
    assert load_jsonl(roundtrip) == [first, second, third]


def test_load_jsonl_names_the_bad_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "ok", "documents": []}\n{"question": "no documents"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: `documents`"):
        load_jsonl(path)
    with pytest.raises(FileNotFoundError):
        load_jsonl(tmp_path / "missing.jsonl")


def test_bm25_ranks_the_lexical_match_first():
    index = Bm25Index(["the cat sat on the mat", "dogs chase cats", "a red car", "red red wine"])
    assert index.top("red wine", 2) == [3, 2]
    assert index.top("red wine", 2, exclude=[3]) == [2, 0]  # ties (score 0) go to the lower index


def test_sample_docs_are_regenerated_with_attribution_beside(tmp_path):
    docs = tmp_path / "docs"
    written = write_sample_docs(docs, titles=("Eiffel Tower", "Marie Curie"))
    assert [p.name for p in written] == ["eiffel-tower.md", "marie-curie.md"]
    assert written[0].read_text(encoding="utf-8").startswith("# Eiffel Tower\n\nThe Eiffel Tower")
    attribution = (tmp_path / ATTRIBUTION_FILE).read_text(encoding="utf-8")
    assert "CC BY-SA 4.0" in attribution and "Marie_Curie" in attribution
    assert not (docs / ATTRIBUTION_FILE).exists()
