"""Constrained speculative decoding equals the plain constrained decode, on tiny Llama / Qwen2 / Mistral.

The reference is HF `generate(do_sample=False)` with xgrammar's own HF logits processor over the same compiled
grammar, so the comparison shares no code with `hsd_rag.constrain.rule`. Drafts come from adversarial random
trees (mostly grammar-forbidden tokens), random trees with the true path planted, and the real n-gram / EAGLE /
hybrid drafters, so pruning, grafting and per-node masking are all on the path that is checked.
"""

from __future__ import annotations

import json

import pytest
import torch

from hsd_rag.constrain.rule import GrammarRule
from hsd_rag.heads import Eagle3Head
from hsd_rag.tree import SOURCE_EAGLE, SOURCE_GRAMMAR, SOURCE_NGRAM, TokenTree
from tests.constrain_fixtures import (
    EOS,
    FORMATS,
    MODEL_VOCAB,
    PERSON_SCHEMA,
    compiled_grammar,
    json_decoder,
    reference_greedy,
)
from tests.fake_drafters import RandomTreeDrafter

ARCHS = ["llama", "qwen2", "mistral"]
PROMPT = [0, 12, 13, 14, 3]
MAX_NEW = 40


@pytest.fixture(scope="module", params=ARCHS)
def decoder(request):
    dec = json_decoder(request.param, seed=5)
    torch.manual_seed(0)
    dec.head = Eagle3Head.from_target(dec.model)
    return dec


def with_drafter(decoder, drafter):
    decoder.drafter_factories = {**type(decoder).drafter_factories, "ngram": lambda d, cfg: drafter}
    return decoder


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("budget", [3, 24])
@pytest.mark.parametrize("planted", [True, False], ids=["true-path-planted", "random-only"])
def test_greedy_equals_constrained_generate(decoder, fmt, budget, planted):
    expected = reference_greedy(decoder, PROMPT, FORMATS[fmt], MAX_NEW)
    oracle = PROMPT + expected if planted else None
    drafter = RandomTreeDrafter(MODEL_VOCAB, seed=budget, oracle=oracle, width=3, depth=5)
    result = with_drafter(decoder, drafter).generate(
        PROMPT, response_format=FORMATS[fmt], method="ngram", budget=budget, max_new_tokens=MAX_NEW
    )
    assert result.token_ids == expected
    if planted:
        assert result.stats.tau > 1.3  # the planted path was really accepted under the mask


@pytest.mark.parametrize("method", ["ngram", "eagle", "hybrid", "hybrid-fixed"])
def test_real_drafters_greedy_equal(decoder, method):
    fmt = FORMATS["schema"]
    expected = reference_greedy(decoder, PROMPT, fmt, MAX_NEW)
    text = decoder.tokenizer.decode(expected, skip_special_tokens=True)
    decoder.drafter_factories = type(decoder).drafter_factories
    for docs in ([text], ['{"name": "zz", "age": 1, "tags": [], "ok": true}']):  # right, then wrong drafts
        result = decoder.generate(PROMPT, documents=docs, response_format=fmt, method=method, budget=12,
                                  max_new_tokens=MAX_NEW)
        assert result.token_ids == expected, (method, docs)


def test_vanilla_is_the_plain_constrained_decode(decoder):
    expected = reference_greedy(decoder, PROMPT, PERSON_SCHEMA, MAX_NEW)
    result = decoder.generate(PROMPT, response_format=PERSON_SCHEMA, method="vanilla", max_new_tokens=MAX_NEW)
    assert result.token_ids == expected
    assert result.stats.steps == len(expected)  # no grafted drafts: still one token per forward


def test_complete_outputs_are_valid_json_of_the_schema(decoder):
    import jsonschema

    for seed in range(6):
        result = decoder.generate(PROMPT, response_format=PERSON_SCHEMA, method="ngram", budget=8,
                                  temperature=1.0, seed=seed, max_new_tokens=120)
        assert result.stats.stop_reason == "eos", result.text  # maxLength/enum/maximum keep every value short
        jsonschema.validate(json.loads(result.text), PERSON_SCHEMA)


def test_grammar_forced_tokens_are_their_own_source(decoder):
    # `{"name": "` is forced at the start and `", "age": ` etc. after each value: grafted as "grammar" drafts
    # (without earlier answers, which would draft these runs too and share their labels)
    result = decoder.generate(PROMPT, response_format=PERSON_SCHEMA, method="ngram", budget=8,
                              max_new_tokens=MAX_NEW, answer_history=False)
    assert result.token_ids == reference_greedy(decoder, PROMPT, PERSON_SCHEMA, MAX_NEW)
    assert result.stats.accepted_by_source.get("grammar", 0) >= 3
    assert "grammar" in result.token_sources
    assert result.stats.tau > 1.2  # no document at all: the grafts alone beat one token per forward


def test_refine_drops_forbidden_drafts_and_grafts_forced_ones(decoder):
    rule = GrammarRule(None, None)
    from hsd_rag.constrain.engine import engine_for

    rule.engine = engine_for(decoder)
    rule.compiled = compiled_grammar(decoder, PERSON_SCHEMA)
    rule.start(PROMPT)
    vocab = {t: i for i, t in enumerate(decoder.tokenizer.convert_ids_to_tokens(list(range(53))))}
    tree = TokenTree.root(PROMPT[-1])
    brace = tree.add(0, vocab["{"], 0.9, SOURCE_NGRAM)  # allowed: an object starts with `{`
    tree.add(brace, vocab["x"], 0.8, SOURCE_NGRAM)  # forbidden: only `"` (a key) may follow `{`
    tree.add(0, vocab["a"], 0.7, SOURCE_EAGLE)  # forbidden at the start
    tree.add(0, EOS, 0.6, SOURCE_EAGLE)  # forbidden: the output is not complete
    refined = rule.refine(tree)
    decoded = [decoder.tokenizer.decode([refined.tokens[i] for i in refined.path_to(leaf)[1:]])
               for leaf in refined.leaves()]
    assert all(not d.endswith("x") and not d.startswith("a") for d in decoded)
    assert EOS not in refined.tokens[1:]
    assert any(d.startswith('{"name": ') for d in decoded)  # the forced run was grafted
    grafted = [i for i in range(1, len(refined)) if refined.sources[i] & SOURCE_GRAMMAR]
    assert grafted and all(refined.scores[i] < 1.0 for i in grafted)
    assert rule.matcher.find_jump_forward_string() == '{"name": "'  # refine left the matcher where it was


def test_masks_follow_each_nodes_own_path(decoder):
    """Two sibling branches in different grammar states get different masks in the same forward."""
    from hsd_rag.constrain.engine import engine_for

    engine = engine_for(decoder)
    rule = GrammarRule(engine, compiled_grammar(decoder, FORMATS["regex"]), graft=False)
    rule.start(PROMPT)
    tok = decoder.tokenizer.convert_tokens_to_ids
    tree = TokenTree.root(PROMPT[-1])
    a = tree.add(0, tok("a"), 0.5, SOURCE_NGRAM)  # after "a" only "b" may follow
    b = tree.add(0, tok("b"), 0.5, SOURCE_NGRAM)  # after "b" only "a" may follow
    logits = torch.zeros(len(tree), MODEL_VOCAB)
    masked = rule.apply(tree, logits, PROMPT)
    allowed = [set(torch.nonzero(torch.isfinite(row)).flatten().tolist()) for row in masked]
    assert allowed[0] == {tok("a"), tok("b")}
    assert allowed[a] == {tok("b")} and allowed[b] == {tok("a")}
    assert all(t < 53 for row in allowed for t in row)  # padded logits rows are never allowed


def test_bad_schema_is_a_clear_error(decoder):
    with pytest.raises(ValueError, match="Cannot compile the regex response format"):
        decoder.generate(PROMPT, response_format={"type": "regex", "pattern": "(unclosed"}, max_new_tokens=4)


def test_unknown_format_spelling_is_a_clear_error(decoder):
    with pytest.raises(ValueError, match="response_format"):
        decoder.generate(PROMPT, response_format="yaml", max_new_tokens=4)
