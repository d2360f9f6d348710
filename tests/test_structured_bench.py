"""The structured-output benchmark set: cases carry a response format, and every run honours it, HF's included."""

from __future__ import annotations

import pytest

from hsd_rag.bench.datasets import load_cases
from hsd_rag.bench.runner import BenchCase, run_benchmark
from hsd_rag.bench.structured import INSTRUCTION, RESPONSE_FORMAT, PassageFacts
from tests.constrain_fixtures import PERSON_SCHEMA, json_decoder


def test_structured_cases_are_the_builtin_prompts_with_a_schema():
    cases = load_cases("structured-en", limit=3)
    builtin = load_cases("builtin-en", limit=3)
    assert [c.id for c in cases] == [c.id for c in builtin]
    for case, plain in zip(cases, builtin, strict=True):
        assert case.response_format == RESPONSE_FORMAT and case.dataset == "structured-en"
        assert case.prompt[-1]["content"] == plain.prompt[-1]["content"] + INSTRUCTION
        assert case.documents == plain.documents
    assert RESPONSE_FORMAT.json_schema == PassageFacts.model_json_schema()


def test_every_run_is_constrained_and_greedy_equal_to_the_constrained_hf_baseline():
    decoder = json_decoder("llama", seed=2)
    case = BenchCase("c1", "structured-test", [0, 12, 13, 14, 3], [], PERSON_SCHEMA)
    records = run_benchmark(decoder, [case], ["vanilla", "ngram"], budgets=[8], max_new_tokens=40,
                            progress=False)
    assert {r.method for r in records} == {"hf", "vanilla", "ngram"}
    baseline = next(r for r in records if r.method == "hf")
    text = decoder.tokenizer.decode(baseline.token_ids, skip_special_tokens=True)
    assert text.startswith('{"name": "')  # the baseline decoded under the schema too
    for record in records:
        if record.method != "hf":
            assert record.matches_baseline, record.method
    ngram = next(r for r in records if r.method == "ngram")
    assert ngram.accepted_by_source.get("grammar", 0) > 0 and ngram.tau > 1.0


def test_unknown_structured_language_fails_clearly():
    with pytest.raises(ValueError, match="Unsupported language"):
        load_cases("structured-xx", limit=1)
