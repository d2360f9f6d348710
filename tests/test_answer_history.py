"""Earlier answers as an n-gram draft source: bounded, generated tokens only, lossless."""

from __future__ import annotations

import threading

import pytest
import torch

from hsd_rag.drafters.answer_history import AnswerHistory, longest_suffix_match
from hsd_rag.drafters.base import DraftContext, StepOutcome
from hsd_rag.drafters.ngram import NgramDrafter
from hsd_rag.drafters.ngram_calibration import LENGTH_BUCKETS, SHARE_BUCKETS, NgramCalibrator
from hsd_rag.tree import SOURCE_HISTORY, SOURCE_NGRAM
from tests.tiny_models import IdTokenizer, tiny_model


def test_longest_suffix_match_finds_the_longest_continued_suffix():
    history = AnswerHistory()
    history.add([1, 2, 3, 4, 5, 6])
    history.add([9, 3, 4, 7, 8])
    with history.lock:
        state, length = longest_suffix_match(history.automaton, [0, 2, 3, 4])
        assert length == 3 and set(history.automaton.transitions(state)) == {5}
        assert longest_suffix_match(history.automaton, [0, 3, 4])[1] == 2  # continued by 5 and by 7
        assert longest_suffix_match(history.automaton, [0, 0, 42])[1] == 0


def test_history_is_bounded_deduplicated_and_forgets_the_oldest():
    history = AnswerHistory(max_answers=2, max_tokens=100)
    history.add([1, 2, 3, 4])
    history.add([1, 2, 3, 4])  # a repeated answer is stored once
    assert len(history) == 1 and history.num_tokens == 4
    history.add([5, 6, 7, 8])
    history.add([9, 10, 11, 12])
    assert len(history) == 2 and history.num_tokens == 8
    with history.lock:
        assert history.automaton.walk([1, 2, 3]) is None  # the oldest answer is gone from the index
        assert history.automaton.walk([9, 10, 11]) is not None
    small = AnswerHistory(max_answers=10, max_tokens=6)
    small.add([1, 2, 3, 4])
    small.add([5, 6, 7, 8])
    assert len(small) == 1 and small.num_tokens == 4
    small.add([1, 2])  # too short to carry phrasing
    assert len(small) == 1


def test_drafter_copies_an_earlier_answer_and_calibrates_it_on_its_own():
    history = AnswerHistory()
    history.add([50, 51, 52, 53, 54, 55])
    drafter = NgramDrafter(history=history)
    drafter.start([1, 2, 3, 50, 51], [])
    tree = drafter.propose(DraftContext([1, 2, 3, 50, 51], 5, 8))
    assert tree.tokens[1:5] == [52, 53, 54, 55]
    assert all(tree.sources[n] == SOURCE_HISTORY for n in range(1, 5))
    accepted = [0, 1, 2]
    drafter.observe(StepOutcome(tree, accepted, [52, 53, 60]))
    assert drafter.history_calibrator.observations == 3  # 52, 53 accepted; 54 rejected
    assert drafter.calibrator.observations == 0
    # the next request starts from what this one learned of earlier answers (its own n-gram calibration afresh)
    learned = [drafter.history_calibrator.estimate(b) for b in range(len(SHARE_BUCKETS) * len(LENGTH_BUCKETS))]
    drafter.close()
    following = NgramDrafter(history=history)
    following.start([1, 2, 3, 50, 51], [])
    assert following.history_calibrator.observations == 3 and following.calibrator.observations == 0
    assert [following.history_calibrator.estimate(b) for b in range(len(learned))] == learned
    assert learned != [NgramCalibrator().estimate(b) for b in range(len(learned))]
    history.clear()  # forgetting the answers forgets what they were worth too
    assert history.calibrator.observations == 0
    # without the history the same drafter has nothing to copy
    plain = NgramDrafter()
    plain.start([1, 2, 3, 50, 51], [])
    assert plain.propose(DraftContext([1, 2, 3, 50, 51], 5, 8)).num_drafts == 0


def test_request_and_history_matches_merge_into_one_tree():
    history = AnswerHistory()
    history.add([7, 8, 9, 10, 11])
    drafter = NgramDrafter(history=history)
    drafter.start([7, 8, 9, 12, 7, 8], [])  # the prompt continues 7 8 with 9 too
    tree = drafter.propose(DraftContext([7, 8, 9, 12, 7, 8], 6, 8))
    first = tree.child(0, 9)
    assert first is not None and tree.sources[first] == SOURCE_NGRAM | SOURCE_HISTORY


def test_decoder_remembers_answers_only_and_stays_lossless(tiny_llama):
    from hsd_rag import HybridSpecDecoder

    model = tiny_llama
    dec = HybridSpecDecoder(model, IdTokenizer())
    prompt = [3, 17, 29, 4, 17, 29, 4, 17]
    document = "40 41 42 43"
    expected = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=24, do_sample=False)[0, len(prompt):].tolist()
    first = dec.generate(prompt, documents=[document], max_new_tokens=24, method="ngram", budget=8)
    assert first.token_ids == expected
    assert len(dec.answer_history) == 1
    with dec.answer_history.lock:  # generated tokens only: the prompt's own 4-gram is not in the index
        assert dec.answer_history.automaton.walk(prompt[:4]) is None or prompt[:4] == expected[:4]
    again = dec.generate(prompt, max_new_tokens=24, method="ngram", budget=8)
    assert again.token_ids == expected
    assert again.stats.accepted_by_source.get("history", 0) > 0  # the earlier answer drafted this one
    isolated = dec.generate(prompt, max_new_tokens=24, method="ngram", budget=8, answer_history=False)
    assert isolated.token_ids == expected and "history" not in isolated.stats.drafted_by_source
    assert len(dec.answer_history) == 1


def test_a_seeded_sampled_request_gives_the_same_text_however_many_answers_came_before(tiny_llama):
    from hsd_rag import HybridSpecDecoder

    dec = HybridSpecDecoder(tiny_llama, IdTokenizer())
    prompt = [3, 17, 29, 4, 17, 29, 4, 17]
    runs = [dec.generate(prompt, max_new_tokens=24, method="ngram", budget=8, temperature=1.0, seed=11)
            for _ in range(3)]
    assert len(dec.answer_history) >= 1  # the answers were remembered...
    assert runs[0].token_ids == runs[1].token_ids == runs[2].token_ids  # ...but never drafted a seeded request
    assert all("history" not in r.stats.drafted_by_source for r in runs)
    greedy = [dec.generate(prompt, max_new_tokens=24, method="ngram", budget=8) for _ in range(2)]
    assert greedy[1].stats.drafted_by_source.get("history", 0) > 0  # greedy requests do draft from them


def test_concurrent_adds_and_queries_do_not_break_the_index():
    history = AnswerHistory(max_answers=8, max_tokens=200)
    errors = []

    def writer(seed):
        try:
            for i in range(50):
                history.add([seed, i % 7, (i * 3) % 11, i % 5, seed + 1])
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    def reader():
        try:
            for _ in range(200):
                with history.lock:
                    longest_suffix_match(history.automaton, [1, 2, 3, 4])
        except Exception as err:  # pragma: no cover
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(s,)) for s in range(3)] + [threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(history) <= 8 and history.num_tokens <= 200


def test_a_shared_calibrator_remembers_a_bounded_number_of_outcomes():
    """Past `memory` outcomes per bucket older ones fade, so a change of workload shows within a few requests."""
    calibrator, keep_all = NgramCalibrator(memory=8), NgramCalibrator()
    bucket = calibrator.bucket(2, 1.0)
    for _ in range(100):
        calibrator.record(bucket, False)
        keep_all.record(bucket, False)
    assert calibrator.observations == 8 and keep_all.observations == 100
    for _ in range(8):
        calibrator.record(bucket, True)
        keep_all.record(bucket, True)
    assert calibrator.estimate(bucket) > 0.5 > 0.2 > keep_all.estimate(bucket)
    with pytest.raises(ValueError, match="memory"):
        NgramCalibrator(memory=0)


@pytest.fixture(scope="module")
def tiny_llama():
    return tiny_model("llama", seed=3)
