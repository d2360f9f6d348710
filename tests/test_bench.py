"""The benchmark harness: metric arithmetic, the greedy equality check, the report files, and the dataset loaders.

Nothing here touches the network: hub loaders are exercised with a stand-in `datasets` module (and a stand-in
hub file system for mMARCO), which is also how their offline and not-installed errors are checked.
"""

from __future__ import annotations

import dataclasses
import sys
import types

import pytest
import torch

from hsd_rag import HybridSpecDecoder
from hsd_rag.bench import hub_datasets, mmarco
from hsd_rag.bench.context_cap import CHARS_PER_TOKEN, cap_documents
from hsd_rag.bench.datasets import load_cases
from hsd_rag.bench.plots import PLOTS
from hsd_rag.bench.report import RECORDS_FILE, REPORT_FILE, read_jsonl, write_report
from hsd_rag.bench.runner import BASELINE, BenchCase, BenchRecord, first_difference, run_benchmark
from hsd_rag.bench.summary import summarize, total_mismatches
from tests.tiny_models import IdTokenizer, tiny_model

PNG_MAGIC = b"\x89PNG"
LONG_ANSWER_SEED = 3  # a tiny model whose greedy answers to the prompts below run long without hitting EOS
TINY_LAYERS = 2
PROMPTS = [[0, 30, 31, 32, 33], [0, 40, 41, 42]]
MAX_NEW = 20


def record(case, method, budget, new, steps, wall, temperature=0.0, **kw) -> BenchRecord:
    return BenchRecord(case, "set", method, budget, temperature, 10, new, steps, wall, **kw)


# ---- metric arithmetic on hand-made records -------------------------------------------------------------------


@pytest.fixture
def hand_records():
    return [
        record("a", BASELINE, 0, 20, 20, 2.0, tokens_by_label={"target": 20}),
        record("b", BASELINE, 0, 10, 10, 2.0, tokens_by_label={"target": 10}),
        record("a", "ngram", 16, 20, 8, 1.0, matches_baseline=True, accepted_by_source={"ngram": 12},
               drafted_by_source={"ngram": 30}, accepted_by_depth={0: 4, 2: 2, 4: 2},
               tokens_by_label={"ngram": 12, "target": 8}, draft_s=0.1, verify_s=0.6, other_s=0.1, prefill_s=0.1),
        record("b", "ngram", 16, 10, 2, 1.0, matches_baseline=False, first_mismatch=3,
               accepted_by_source={"ngram": 8}, drafted_by_source={"ngram": 10}, accepted_by_depth={4: 2},
               tokens_by_label={"ngram": 8, "target": 2}),
        record("a", "ngram", "auto", 20, 10, 1.5, matches_baseline=True, tokens_by_label={"target": 20}),
        record("b", "ngram", "auto", 10, 5, 0.5, matches_baseline=True, tokens_by_label={"target": 10}),
    ]


def test_summary_ratios_are_ratios_of_sums(hand_records):
    rows = {(s.method, s.budget): s for s in summarize(hand_records)}
    base, fixed, auto = rows[(BASELINE, 0)], rows[("ngram", 16)], rows[("ngram", "auto")]
    assert base.tau == 1.0 and base.tokens_per_s == pytest.approx(30 / 4.0)
    assert fixed.tau == pytest.approx(30 / 10)  # Σ tokens / Σ forwards, not the mean of 2.5 and 5
    assert fixed.tokens_per_s == pytest.approx(30 / 2.0)
    assert fixed.speedup == pytest.approx((30 / 2.0) / (30 / 4.0))
    assert auto.speedup == pytest.approx((30 / 2.0) / (30 / 4.0)) and auto.tau == pytest.approx(30 / 15)
    assert base.speedup == pytest.approx(1.0)


def test_source_shares_rates_and_depths(hand_records):
    fixed = next(s for s in summarize(hand_records) if s.budget == 16)
    assert fixed.source_share() == pytest.approx({"ngram": 20 / 30, "target": 10 / 30})
    assert sum(fixed.source_share().values()) == pytest.approx(1.0)
    assert fixed.acceptance_rate() == pytest.approx({"ngram": 20 / 40})
    # 10 forwards: 4 accepted nothing, 2 reached depth 2, 4 reached depth 4
    assert fixed.acceptance_by_depth() == pytest.approx({1: 0.6, 2: 0.6, 3: 0.4, 4: 0.4})
    assert fixed.time_split()["verify"] == pytest.approx(0.6 / 2.0)


def test_mismatches_are_counted(hand_records):
    summaries = summarize(hand_records)
    fixed = next(s for s in summaries if s.budget == 16)
    assert (fixed.mismatches, fixed.compared) == (1, 2)
    assert total_mismatches(summaries) == 1


def test_temperatures_are_summarized_apart(hand_records):
    sampled = [dataclasses.replace(r, temperature=0.7, matches_baseline=None) for r in hand_records]
    summaries = summarize(hand_records + sampled)
    assert len(summaries) == 2 * 3
    assert all(s.compared == 0 for s in summaries if s.temperature > 0)
    assert all(s.speedup is not None for s in summaries)


def test_first_difference():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2


# ---- the equality check on tiny models ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_decoder():
    return HybridSpecDecoder(tiny_model("llama", seed=LONG_ANSWER_SEED, layers=TINY_LAYERS), IdTokenizer())


@pytest.fixture(scope="module")
def tiny_cases(tiny_decoder):
    """Token-id prompts, one with a document holding its true continuation so n-gram drafts get accepted."""
    model = tiny_decoder.model
    first = PROMPTS[0]
    answer = model.generate(torch.tensor([first]), do_sample=False, max_new_tokens=MAX_NEW)[0, len(first) :]
    doc = " ".join(map(str, first[-2:] + answer.tolist()))
    return [BenchCase("with-doc", "tiny", first, [doc]), BenchCase("text", "tiny", " ".join(map(str, PROMPTS[1])))]


@pytest.fixture(scope="module")
def tiny_records(tiny_decoder, tiny_cases):
    return run_benchmark(tiny_decoder, tiny_cases, ["vanilla", "ngram"], [4, "auto"], MAX_NEW, progress=False)


def test_greedy_runs_match_hf_generate(tiny_records, tiny_cases):
    assert len(tiny_records) == len(tiny_cases) * (1 + 2 * 2)
    ours = [r for r in tiny_records if r.method != BASELINE]
    assert all(r.matches_baseline and r.first_mismatch is None for r in ours)
    assert all(r.speedup is not None and r.speedup > 0 for r in ours)
    assert all(r.new_tokens == MAX_NEW for r in tiny_records)
    with_doc = [r for r in ours if r.case_id == "with-doc" and r.method == "ngram"]
    assert all(r.accepted_by_source.get("ngram", 0) > 0 and r.tau > 1 for r in with_doc)
    assert {r.budget for r in ours} == {4, "auto"}


def test_order_rotates_between_prompts(tiny_records, tiny_cases):
    per_case = len(tiny_records) // len(tiny_cases)
    assert tiny_records[0].method == BASELINE
    assert tiny_records[per_case].method != BASELINE  # the second prompt starts with another method


class LossyDecoder:
    """A real decoder whose `LOSSY` method corrupts one generated token: the check must catch it."""

    LOSSY = "ngram"

    def __init__(self, inner, position: int):
        self.inner, self.position = inner, position

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def generate(self, prompt, documents=None, **kwargs):
        res = self.inner.generate(prompt, documents, **kwargs)
        if kwargs.get("method") == self.LOSSY and len(res.token_ids) > self.position:
            ids = list(res.token_ids)
            ids[self.position] = (ids[self.position] + 1) % self.inner.model.config.vocab_size
            res = dataclasses.replace(res, token_ids=ids)
        return res


def test_a_lossy_method_is_counted_and_reported(tiny_decoder, tiny_cases, tmp_path):
    position = 5
    records = run_benchmark(LossyDecoder(tiny_decoder, position), tiny_cases, ["vanilla", "ngram"], [4],
                            MAX_NEW, progress=False)
    lossy = [r for r in records if r.method == LossyDecoder.LOSSY]
    assert all(r.matches_baseline is False and r.first_mismatch == position for r in lossy)
    assert all(r.matches_baseline for r in records if r.method == "vanilla")
    assert total_mismatches(summarize(records)) == len(tiny_cases)
    report = write_report(records, tmp_path).read_text()
    assert "LOSSLESSNESS VIOLATED" in report and f"**{len(tiny_cases)}/{len(tiny_cases)}**" in report


def test_sampled_runs_are_not_compared(tiny_decoder, tiny_cases, tmp_path):
    records = run_benchmark(tiny_decoder, tiny_cases[:1], ["ngram"], ["auto"], MAX_NEW, temperature=0.8,
                            progress=False)
    assert all(r.matches_baseline is None and r.temperature == 0.8 for r in records)
    assert all(r.speedup is not None for r in records if r.method != BASELINE)
    report = write_report(records, tmp_path).read_text()
    assert "not compared" in report and "Sampling (temperature > 0)" in report
    assert "Greedy outputs differing" not in report


def test_report_writes_jsonl_markdown_and_pngs(tiny_records, tmp_path):
    path = write_report(tiny_records, tmp_path / "out", header="tiny run")
    out = path.parent
    assert path.name == REPORT_FILE
    text = path.read_text()
    assert "tiny run" in text and "| tiny | 0 | ngram | auto |" in text and "≥1" in text
    assert "Greedy outputs differing from HF generate: 0 of 8 compared" in text
    # the default (ngram at auto) against the bars this run had: ngram at 4 is the only other single source
    assert "| tiny | 0 | best single source (ngram, budget 4) |" in text and "| tiny | 0 | HF generate |" in text
    back = read_jsonl(out / RECORDS_FILE)
    assert [dataclasses.asdict(r) for r in back] == [dataclasses.asdict(r) for r in tiny_records]
    for name in PLOTS:
        png = out / name
        assert png.read_bytes()[: len(PNG_MAGIC)] == PNG_MAGIC, name
        assert f"]({name})" in text


# ---- chat prompts through a real chat template ----------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_decoder():
    """The default model's tokenizer (ChatML template) on a tiny random Llama of the same vocabulary."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from hsd_rag.loading import default_snapshot

    tokenizer = AutoTokenizer.from_pretrained(default_snapshot())
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return HybridSpecDecoder(model, tokenizer)


def test_chat_cases_match_hf_generate(chat_decoder):
    docs = ["The Eiffel Tower was designed by Gustave Eiffel's company and built from 1887 to 1889."]
    messages = [{"role": "user", "content": f"Context: {docs[0]}\nQuestion: who designed the Eiffel Tower?"}]
    cases = [BenchCase("chat", "chat", messages, docs)]
    records = run_benchmark(chat_decoder, cases, ["ngram"], [8], 12, progress=False)
    ours = [r for r in records if r.method != BASELINE]
    assert ours and all(r.matches_baseline for r in ours)
    assert records[0].prompt_tokens > len(messages[0]["content"].split())  # the template wrapped the turn


# ---- document cap ---------------------------------------------------------------------------------------------


def test_cap_documents_counts_tokens_in_order():
    tok = IdTokenizer()
    docs = ["1 2 3 4", "5 6 7 8", "9 10"]
    assert cap_documents(docs, 6, tok) == ["1 2 3 4", "5 6"]
    assert cap_documents(docs, 100, tok) == docs
    assert cap_documents(docs, 0, tok) == []


def test_cap_documents_falls_back_to_characters():
    docs = ["a" * 10, "b" * 10]
    capped = cap_documents(docs, 3, None)
    assert capped == ["a" * 10, "b" * (3 * CHARS_PER_TOKEN - 10)]


# ---- dataset loaders: names, schemas, offline and missing-package errors ---------------------------------------


def fake_datasets(monkeypatch, rows_by_call=None, error: Exception | None = None) -> list[tuple]:
    """Install a stand-in `datasets` module; returns the list its `load_dataset` calls are recorded in."""
    calls: list[tuple] = []

    def load_dataset(path, name=None, split=None, data_files=None):
        calls.append((path, name, split, data_files))
        if error is not None:
            raise error
        return rows_by_call(path, name, split, data_files)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def ragbench_rows(path, name, split, data_files):
    return [
        {"id": f"q{i}", "question": f"question {i}?", "documents": ["7 " * 5000, "8 9"],
         "response": f"answer {i}", "documents_sentences": []}
        for i in range(6)
    ]


def test_ragbench_rows_become_capped_rag_prompts(monkeypatch):
    calls = fake_datasets(monkeypatch, ragbench_rows)
    cases = load_cases("ragbench:covidqa", limit=4, tokenizer=IdTokenizer(), max_context_tokens=50)
    assert calls[0] == (hub_datasets.RAGBENCH_REPO, "covidqa", hub_datasets.RAGBENCH_SPLIT, None)
    assert len(cases) == 4 and all(c.dataset == "ragbench:covidqa" and c.id.startswith("covidqa-q") for c in cases)
    assert all(len(" ".join(c.documents).split()) <= 50 for c in cases)
    content = cases[0].prompt[0]["content"]
    assert content.startswith("Use the following pieces of context") and "\nQuestion: question" in content
    smaller = load_cases("ragbench:covidqa", limit=2, tokenizer=IdTokenizer(), max_context_tokens=50)
    assert [c.id for c in smaller] == [c.id for c in cases[:2]]  # a smaller limit is a prefix


def test_specbench_keeps_the_rag_category_and_mtbench_has_no_documents(monkeypatch):
    def rows(path, name, split, data_files):
        if path == "json":
            assert data_files == hub_datasets.SPEC_BENCH_URL
            return [{"question_id": i, "category": "rag" if i % 2 else "qa", "turns": [f"docs... Q{i}"]}
                    for i in range(10)]
        return [{"prompt_id": i, "category": "writing", "prompt": [f"turn one {i}", "turn two"], "reference": []}
                for i in range(5)]

    fake_datasets(monkeypatch, rows)
    spec = load_cases("specbench-rag")
    assert len(spec) == 5 and all(c.prompt[0]["content"].startswith("docs... Q") for c in spec)
    assert all(int(c.id.split("-")[1]) % 2 for c in spec)
    mt = load_cases("mtbench", limit=3)
    assert len(mt) == 3 and all(c.documents == [] for c in mt)
    assert all(c.prompt == [{"role": "user", "content": c.prompt[0]["content"]}] for c in mt)
    assert all(c.prompt[0]["content"].startswith("turn one") for c in mt)


def test_missing_datasets_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(ImportError, match="pip install datasets"):
        load_cases("ragbench:covidqa", limit=1)


def test_unreachable_hub_gives_a_clear_error(monkeypatch):
    fake_datasets(monkeypatch, error=ConnectionError("Couldn't reach 'rungalileo/ragbench' on the Hub"))
    with pytest.raises(hub_datasets.HubDatasetUnavailable, match="RAGBench subset 'covidqa'") as info:
        load_cases("ragbench:covidqa", limit=1)
    assert isinstance(info.value, ConnectionError)
    assert "network access" in str(info.value) and "builtin-en" in str(info.value)


def test_changed_schema_names_the_missing_field(monkeypatch):
    fake_datasets(monkeypatch, lambda *a: [{"id": "x", "query": "?", "documents": []}])
    with pytest.raises(ValueError, match="no field 'question'"):
        load_cases("ragbench:covidqa")


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="covidqa"):
        load_cases("ragbench:nope")
    with pytest.raises(ValueError, match="fr \\(french\\)"):
        load_cases("mmarco:klingon")
    with pytest.raises(ValueError, match="specbench-rag"):
        load_cases("nope")


# ---- mMARCO: assembly from the raw files, cache, offline error --------------------------------------------------

MMARCO_FILES = {
    mmarco.QRELS_FILE: ["1\t0\t100\t1", "2\t0\t200\t1", "3\t0\t300\t1"],
    # q1 and q2 are judged; q9 is not (skipped); 100 is q1's positive inside its own run (skipped as negative)
    mmarco._run_file("french"): (
        [f"9\t{900 + r}\t{r}" for r in range(1, 4)]
        + [f"1\t{100 if r == 2 else 110 + r}\t{r}" for r in range(1, 12)]
        + [f"2\t{210 + r}\t{r}" for r in range(1, 12)]
        + [f"3\t{310 + r}\t{r}" for r in range(1, 12)]
    ),
    mmarco._queries_file("french"): ["1\tquestion un ?", "2\tquestion deux ?", "3\tquestion trois ?"],
    mmarco._collection_file("french"): [f"{pid}\tpassage {pid}" for pid in range(100, 330)],
}


def test_mmarco_assembly_one_positive_nine_hard_negatives(monkeypatch, tmp_path):
    monkeypatch.setenv("HSD_RAG_CACHE", str(tmp_path))
    reads: list[str] = []

    def lines(path):
        reads.append(path)
        yield from MMARCO_FILES[path]

    monkeypatch.setattr(mmarco, "hub_lines", lines)
    cases = load_cases("mmarco:fr", limit=2)
    assert [c.id for c in cases] == ["mmarco-fr-1", "mmarco-fr-2"]
    first = cases[0]
    assert len(first.documents) == 1 + mmarco.MMARCO_NEGATIVES
    assert "passage 100" in first.documents  # the positive, somewhere among the negatives
    negatives = sorted(d for d in first.documents if d != "passage 100")
    assert negatives == sorted(f"passage {110 + r}" for r in (1, *range(3, 11)))  # best-ranked non-relevant
    assert "Question: question un ?" in first.prompt[0]["content"]
    # cached: a second load (same or smaller limit) never reads the hub
    monkeypatch.setattr(mmarco, "hub_lines", lambda path: pytest.fail(f"read {path} again"))
    assert [c.id for c in load_cases("mmarco:french", limit=1)] == ["mmarco-fr-1"]


def test_mmarco_offline_error(monkeypatch, tmp_path):
    import huggingface_hub

    class OfflineFileSystem:
        def open(self, *args, **kwargs):
            raise ConnectionError("Name or service not known")

    monkeypatch.setenv("HSD_RAG_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub, "HfFileSystem", OfflineFileSystem)
    with pytest.raises(hub_datasets.HubDatasetUnavailable, match="unicamp-dl/mmarco/data/qrels.dev.small.tsv"):
        load_cases("mmarco:fr", limit=2)


# ---- warm-up: never a measured prompt ---------------------------------------------------------------------------


def _spy_runs(monkeypatch) -> list[str]:
    from hsd_rag.bench import runner

    seen: list[str] = []
    real = runner._run

    def spy(decoder, case, *args, **kwargs):
        seen.append(case.id)
        return real(decoder, case, *args, **kwargs)

    monkeypatch.setattr(runner, "_run", spy)
    return seen


def test_warm_up_runs_an_unmeasured_prompt_first(tiny_decoder, tiny_cases, monkeypatch):
    """A prefix cache or a cache of earlier answers (vLLM's suffix decoding) must not see a measured prompt early."""
    seen = _spy_runs(monkeypatch)
    run_benchmark(tiny_decoder, tiny_cases[:1], ["ngram"], [4], MAX_NEW, progress=False)
    assert seen == ["warmup", "warmup", tiny_cases[0].id, tiny_cases[0].id]  # HF and ngram, warm-up then measured

    seen.clear()
    given = BenchCase("spare", "tiny", PROMPTS[1])
    run_benchmark(tiny_decoder, tiny_cases[:1], ["ngram"], [4], MAX_NEW, progress=False, warmup_case=given)
    assert seen[:2] == ["spare", "spare"]


def test_reversed_warmup_case_shares_no_prefix(tiny_decoder, tiny_cases):
    from hsd_rag.bench.runner import reversed_warmup_case

    case = reversed_warmup_case(tiny_decoder, tiny_cases[0])
    assert case.prompt == PROMPTS[0][::-1] and case.prompt[0] != PROMPTS[0][0]


def test_load_warmup_case_is_the_first_sets_next_prompt():
    from hsd_rag.bench.datasets import load_warmup_case

    measured = {c.id for c in load_cases("builtin-en,builtin-fr", limit=2)}
    warm = load_warmup_case("builtin-en,builtin-fr", 2)
    assert warm.id not in measured and warm.id == load_cases("builtin-en", limit=3)[2].id
    assert load_warmup_case("builtin-en", 10_000) is None  # the whole set is measured: the runner's fallback
