"""The default-vs-bars ratios of a benchmark run: paired over prompts, with a bootstrap interval that shows noise."""

from __future__ import annotations

import pytest

from hsd_rag.bench.paired_ratio import default_vs_bars_table, paired_ratio
from hsd_rag.bench.runner import BASELINE, BenchRecord


def run(case, method, budget, wall, tokens=100, dataset="set") -> BenchRecord:
    return BenchRecord(case, dataset, method, budget, 0.0, 10, tokens, tokens, wall)


def test_the_ratio_is_of_sums_over_shared_prompts_and_a_steady_ratio_has_no_spread():
    ours = [run("a", "hybrid", "auto", 1.0), run("b", "hybrid", "auto", 2.0), run("c", "hybrid", "auto", 4.0)]
    theirs = [run("a", "ngram", "auto", 1.5), run("b", "ngram", "auto", 3.0), run("c", "ngram", "auto", 6.0),
              run("only-theirs", "ngram", "auto", 0.1)]
    paired = paired_ratio(ours, theirs)
    assert paired.prompts == 3  # the prompt only one side ran is left out
    assert paired.ratio == pytest.approx(1.5)  # (300 / 7.0) / (300 / 10.5)
    assert paired.low == pytest.approx(1.5) and paired.high == pytest.approx(1.5)  # every prompt says 1.5


def test_one_slow_prompt_widens_the_interval_around_the_point():
    ours = [run(c, "hybrid", "auto", 1.0) for c in "abcde"]
    theirs = [run(c, "ngram", "auto", 1.0) for c in "abcd"] + [run("e", "ngram", "auto", 3.0)]  # a hiccup
    paired = paired_ratio(ours, theirs)
    assert paired.ratio == pytest.approx(7.0 / 5.0)
    assert paired.low < 1.05 and paired.high > 1.6  # with 5 prompts the run cannot pin the ratio down
    assert paired.low <= paired.ratio <= paired.high
    assert paired_ratio(ours, theirs) == paired  # a fixed seed: the same report every time


def test_a_resample_of_empty_answers_is_left_out_of_the_interval():
    ours = [run("a", "hybrid", "auto", 1.0), run("eos", "hybrid", "auto", 0.1, tokens=0)]
    theirs = [run("a", "ngram", "auto", 2.0), run("eos", "ngram", "auto", 0.1, tokens=0)]
    paired = paired_ratio(ours, theirs)
    assert paired.ratio == pytest.approx(2.1 / 1.1)
    assert 1.0 < paired.low <= paired.high < 3.0  # finite: resamples holding only "eos" have no ratio


def test_nothing_shared_gives_none():
    assert paired_ratio([run("a", "hybrid", "auto", 1.0)], [run("b", "ngram", "auto", 1.0)]) is None
    assert paired_ratio([run("a", "hybrid", "auto", 0.0)], [run("a", "ngram", "auto", 1.0)]) is None


def test_the_table_puts_the_default_against_suffix_the_fastest_single_source_fixed_split_and_hf():
    records = []
    for case in "ab":
        records += [
            run(case, BASELINE, 0, 4.0),
            run(case, "hybrid", "auto", 1.0),
            run(case, "ngram", "auto", 1.1),
            run(case, "ngram", 16, 1.6),  # slower than ngram at auto: not the best single source
            run(case, "eagle", "auto", 2.0),
            run(case, "hybrid-fixed", "auto", 0.9),
            run(case, "hybrid-fixed", 16, 0.5),  # another budget than the default's: not its fixed split
            run(case, "vllm-suffix", 16, 1.2),
            run(case, "hybrid", "auto", 1.0, dataset="other"),  # no bar ran there: no rows
        ]
    table = default_vs_bars_table(records, "hybrid")
    rows = {line.split(" | ")[2]: line for line in table.splitlines() if line.startswith("| set |")}
    assert set(rows) == {"vLLM suffix (k=16)", "best single source (ngram, budget auto)",
                         "fixed split (hybrid-fixed, budget auto)", "HF generate"}
    assert "| 1.20× | 1.20–1.20 | 2 |" in rows["vLLM suffix (k=16)"]
    assert "| 1.10× |" in rows["best single source (ngram, budget auto)"]
    assert "| 0.90× |" in rows["fixed split (hybrid-fixed, budget auto)"]
    assert "| 4.00× |" in rows["HF generate"]
    assert "| other |" not in table
    assert default_vs_bars_table([run("a", "ngram", "auto", 1.0)], "hybrid") == ""  # the default did not run
