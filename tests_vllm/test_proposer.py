"""HsdNgramProposer without an engine: literal token rows in, draft chains out (one comment per case).

The proposer is called as vLLM calls it: `propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu)`, one
row per request, `token_ids_cpu` a [rows, max_model_len] matrix whose rows already hold the sampled tokens.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from hsd_rag.budget import CostProfile
from hsd_rag.engines.vllm.answer_index import AnswerIndex
from hsd_rag.engines.vllm.chain import best_chain, chain_lengths
from hsd_rag.engines.vllm.documents import DocumentInbox
from hsd_rag.engines.vllm.proposer import HsdNgramProposer
from hsd_rag.tree import SOURCE_NGRAM, TokenTree

MAX_MODEL_LEN = 64
FLAT = CostProfile(tokens=[1, 2], relative_cost=[1.0, 1.0])  # verifying is free: every draft with a score pays
STEEP = CostProfile(tokens=[1, 2], relative_cost=[1.0, 2.0])  # each verified token costs a full forward
BONUS = 99  # the target's own token after the accepted drafts (never drafted in these cases)
COPIED = [10, 11, 12, 13, 14, 15]  # a span the answer copies from the prompt


def make_proposer(k: int = 4, profile: CostProfile = FLAT, answers=None, inbox=None) -> HsdNgramProposer:
    config = SimpleNamespace(
        speculative_config=SimpleNamespace(num_speculative_tokens=k),
        model_config=SimpleNamespace(max_model_len=MAX_MODEL_LEN),
        device_config=SimpleNamespace(device_type="cpu"),
    )
    return HsdNgramProposer(config, answers=answers if answers is not None else False, profile=profile, inbox=inbox)


def batch(*rows: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """vLLM's token matrix and per-row token counts for these rows."""
    matrix = np.zeros((len(rows), MAX_MODEL_LEN), dtype=np.int32)
    for i, row in enumerate(rows):
        matrix[i, : len(row)] = row
    return np.array([len(r) for r in rows], dtype=np.int32), matrix


def test_drafts_the_span_the_prompt_continues_with():
    proposer = make_proposer()
    # Prompt mentions 10..15 then restarts it; the first sampled token is 11 after 10: draft 12 13 14 15.
    row = [1, 2, *COPIED, 3, 10, 11]
    counts, matrix = batch(row)
    assert proposer.propose([[11]], counts, matrix) == [[12, 13, 14, 15]]


def test_partial_prefill_and_full_context_get_no_drafts():
    proposer = make_proposer()
    full = [1, 2, *COPIED, 3] + [10] * (MAX_MODEL_LEN - 9)  # room for no draft before max_model_len
    counts, matrix = batch([1, 2, *COPIED, 3, 10, 11], full)
    # Row 0 is still prefilling (nothing sampled); row 1 has no room left.
    assert proposer.propose([[], [10]], counts, matrix) == [[], []]


def test_outcome_calibrates_the_request_drafter():
    proposer = make_proposer()
    first = [1, 2, *COPIED, 3, 10, 11]
    counts, matrix = batch(first)
    assert proposer.propose([[11]], counts, matrix) == [[12, 13, 14, 15]]
    request = proposer._rows[0]
    # vLLM accepted 12 and 13, rejected 14 and emitted the bonus token: 3 drafts decided (2 yes, 1 no).
    counts, matrix = batch(first + [12, 13, BONUS])
    proposer.propose([[12, 13, BONUS]], counts, matrix)
    assert proposer._rows[0] is request
    assert request.drafter.calibrator.observations == 3
    assert request.tokens == first + [12, 13, BONUS]


def test_steep_cost_keeps_only_drafts_likely_enough_to_pay():
    flat, steep = make_proposer(profile=FLAT), make_proposer(profile=STEEP)
    # An ambiguous one-token context (10 continues with 11 and with 20 in the prompt) gives low scores.
    row = [10, 11, 5, 10, 20, 6, 10]
    counts, matrix = batch(row)
    assert flat.propose([[10]], counts, matrix)[0] != []
    assert steep.propose([[10]], counts, matrix) == [[]]


def test_requests_are_followed_when_rows_move_and_retired_when_they_leave():
    answers = AnswerIndex()
    proposer = make_proposer(answers=answers)
    a = [1, 2, *COPIED, 3, 10, 11]
    b = [4, 5, 6, 7, 8, 9, 4, 5]
    counts, matrix = batch(a, b)
    proposer.propose([[11], [5]], counts, matrix)
    request_b = proposer._rows[1]
    # Request a finished; vLLM moved b into row 0 and b emitted one more token.
    counts, matrix = batch(b + [6])
    proposer.propose([[6]], counts, matrix)
    assert proposer._rows == {0: request_b}
    assert request_b.tokens == b + [6]
    # a's output (its one generated token 11) is now an earlier answer; its prompt is not.
    assert len(answers) == 1


def test_earlier_answers_draft_but_never_earlier_prompts():
    answers = AnswerIndex()
    proposer = make_proposer(answers=answers)
    secret = [70, 71, 72, 73, 74, 75]  # only in the first request's prompt
    answer = [40, 41, 42, 43, 44, 45]  # what the first request generates, one token per step
    prompt = [1, *secret, 2]
    for step in range(1, len(answer) + 1):
        counts, matrix = batch(prompt + answer[:step])
        proposer.propose([[answer[step - 1]]], counts, matrix)
    counts, matrix = batch([9, 9])
    proposer.propose([[9]], counts, matrix)  # the first request left the batch: its output is indexed
    # A new request whose answer starts like the earlier answer gets the rest of it as drafts ...
    counts, matrix = batch([8, 8, 40, 41])
    assert proposer.propose([[41]], counts, matrix) == [[42, 43, 44, 45]]
    # ... while one that quotes the earlier prompt gets nothing.
    counts, matrix = batch([8, 8, 70, 71])
    assert make_proposer(answers=answers).propose([[71]], counts, matrix) == [[]]


def test_documents_from_the_inbox_reach_only_their_request(tmp_path):
    inbox = DocumentInbox(tmp_path)
    proposer = make_proposer(inbox=inbox)
    prompt = [1, 2, 3, 50]
    inbox.put(prompt, [[50, 51, 52, 53, 54]])  # the extra document continues 50 with 51..54
    counts, matrix = batch(prompt + [51], [7, 7, 7, 50, 51])
    # Row 0's prompt owns the document; row 1 (another prompt, same recent tokens) does not see it.
    assert proposer.propose([[51], [51]], counts, matrix) == [[52, 53, 54], []]
    assert inbox.take(prompt) == []  # taken once


def test_identical_prompts_registered_twice_get_no_documents(tmp_path):
    inbox = DocumentInbox(tmp_path)
    inbox.put([1, 2], [[5, 6]])
    inbox.put([1, 2], [[7, 8]])  # a second request with the same prompt: nobody can tell them apart
    assert inbox.take([1, 2]) == []


def test_best_chain_maximises_expected_accepted_length():
    tree = TokenTree.root(0)
    a = tree.add(0, 1, 0.6, SOURCE_NGRAM)  # likelier first draft ...
    tree.add(a, 2, 0.1, SOURCE_NGRAM)
    b = tree.add(0, 3, 0.5, SOURCE_NGRAM)  # ... but this branch continues far better
    c = tree.add(b, 4, 0.45, SOURCE_NGRAM)
    tree.add(c, 5, 0.4, SOURCE_NGRAM)
    assert best_chain(tree, 8) == ([3, 4, 5], [0.5, 0.45, 0.4])
    assert best_chain(tree, 1) == ([1], [0.6])  # one draft allowed: the likelier first token


def test_chain_lengths_shorten_chains_as_the_batch_grows():
    cpu = CostProfile(tokens=[1, 8, 16, 30, 60], relative_cost=[1.0, 1.5, 1.8, 2.4, 3.3])
    chain = [0.9, 0.7, 0.5, 0.3, 0.2, 0.1]
    # Alone, every draft down to 0.2 pays; 12 and 32 requests in the step leave room for fewer.
    assert chain_lengths([chain], cpu, rows=1) == [5]
    assert chain_lengths([chain] * 12, cpu, rows=12) == [3] * 12
    assert chain_lengths([chain] * 32, cpu, rows=32) == [2] * 32
    assert chain_lengths([[], chain], cpu, rows=2) == [0, 4]  # no drafts, but its token is in the step too


@pytest.mark.parametrize("k", [1, 3])
def test_chains_never_exceed_num_speculative_tokens(k):
    proposer = make_proposer(k=k)
    counts, matrix = batch([1, 2, *COPIED, 3, 10, 11])
    assert len(proposer.propose([[11]], counts, matrix)[0]) == k
