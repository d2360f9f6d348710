"""EAGLE-3 head training on a tiny random Llama target: TTT semantics, vocabulary maps, loss, save/load, resume."""

from __future__ import annotations

import json

import pytest
import torch

from hsd_rag.decoder import HybridSpecDecoder
from hsd_rag.heads import Eagle3Head, load_head
from hsd_rag.heads.checkpoint import HeadCheckpointError
from hsd_rag.training import TrainConfig, train_head
from hsd_rag.training.api import export_head
from hsd_rag.training.batches import FIRST_PREDICTION_OFFSET, collate
from hsd_rag.training.data import conversation_from_record, encode
from hsd_rag.training.evaluate import depth_accuracy, measure_tau
from hsd_rag.training.features import FeatureStore, compute_sample, fit_length, teacher_positions
from hsd_rag.training.trainer import Item, Trainer, init_head
from hsd_rag.training.ttt import UnrolledHead, shifted_tokens
from hsd_rag.training.vocab import coverage, select_draft_vocab, vocab_maps
from hsd_rag.training.warm_start import warm_start
from tests.tiny_models import IdTokenizer, tiny_model

VOCAB = 256
HIDDEN = 64
LAYERS = 4
DRAFT_VOCAB = 64
STEPS = 5  # unroll depth used in the tests
SEQUENCES = 8
PROMPT_LEN, ANSWER_LEN = 24, 12


class ChatIdTokenizer(IdTokenizer):
    """IdTokenizer with a trivial chat template: each turn's content is its space-separated ids."""

    chat_template = "ids"

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=True, return_dict=False):
        return [int(t) for m in messages for t in m["content"].split()]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and spinning threads crawl on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def target():
    return tiny_model("llama", vocab=VOCAB, layers=LAYERS, hidden=HIDDEN)


@pytest.fixture(scope="module")
def items(target):
    """Prompts of random ids answered greedily by the target (self-distillation data, as the recipe makes)."""
    generator = torch.Generator().manual_seed(0)
    out = []
    with torch.no_grad():
        for i in range(SEQUENCES):
            prompt = torch.randint(2, VOCAB, (1, PROMPT_LEN), generator=generator)
            full = target.generate(
                prompt, max_new_tokens=ANSWER_LEN, do_sample=False, min_new_tokens=ANSWER_LEN
            )
            out.append(Item(f"seq{i}", full[0].tolist(), PROMPT_LEN))
    return out


def draft_ids(items) -> torch.Tensor:
    answers = [i.input_ids[i.answer_start :] for i in items]
    prompts = [i.input_ids[: i.answer_start] for i in items]
    return select_draft_vocab(answers, VOCAB, DRAFT_VOCAB, prompts)


def config(tmp_path, **overrides) -> TrainConfig:
    fields = dict(
        output_dir=tmp_path,
        steps=12,
        batch_size=2,
        lr=3e-3,
        warmup_steps=2,
        ttt_steps=STEPS,
        draft_vocab_size=DRAFT_VOCAB,
        eval_every=1000,
        checkpoint_every=1000,
        log_every=1,
        seed=0,
    )
    fields.update(overrides)
    return TrainConfig(**fields)


def make_trainer(target, items, cfg, vocab=None) -> Trainer:
    vocab = draft_ids(items) if vocab is None else vocab
    store = FeatureStore(
        target, vocab, cfg.output_dir / "features", torch.float16, cfg.prompt_chains, cfg.ttt_steps
    )
    head = init_head(target, vocab, cfg)
    return Trainer(head, store, items[2:], items[:2], cfg, progress=False)


# ---- semantics -----------------------------------------------------------------------------------------------


def test_unrolled_steps_equal_the_head_drafting_with_a_cache_and_tree_mask(target):
    """Step j of the unroll == head.forward over a cache of steps 0..j-1 with a causal block and one diagonal
    block per earlier step, at positions t + j: exactly how EagleDrafter runs a draft chain."""
    torch.manual_seed(1)
    head = Eagle3Head.from_target(target, draft_vocab_size=DRAFT_VOCAB)
    with torch.no_grad():
        for param in head.parameters():
            param.normal_(0, 0.2)
    length = 13
    features = torch.randn(2, length, 3 * HIDDEN)
    ids = torch.randint(0, VOCAB, (2, length))
    queries = torch.tensor([[1, 4, 5, 9, 12], [0, 2, 3, 7, 8]])  # steps >= 1 run on these positions only
    unrolled = UnrolledHead(head).hidden_states(features, ids, STEPS, queries)

    neg = torch.finfo(torch.float32).min
    causal = torch.zeros(length, length).masked_fill(
        torch.ones(length, length, dtype=torch.bool).triu(1), neg
    )
    diagonal = torch.full((length, length), neg).fill_diagonal_(0)
    cache, hidden = head.new_cache(), features
    for step in range(STEPS):
        mask = torch.cat([causal] + [diagonal] * step, dim=1)[None, None]
        positions = (torch.arange(length) + step)[None]
        out = head(hidden, shifted_tokens(ids, step), positions, mask if step else None, cache)
        hidden = out.hidden
        expected = hidden if step == 0 else hidden.gather(1, queries[..., None].expand(-1, -1, HIDDEN))
        torch.testing.assert_close(unrolled[step], expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_folding_the_feature_scale_into_fc_keeps_the_trained_function(target):
    torch.manual_seed(2)
    head = Eagle3Head.from_target(target, draft_vocab_size=DRAFT_VOCAB)
    unrolled = UnrolledHead(head)
    unrolled.feature_scale.copy_(torch.rand(3 * HIDDEN) * 100 + 0.1)
    features = torch.randn(1, 9, 3 * HIDDEN) * 50
    ids = torch.randint(0, VOCAB, (1, 9))
    before = unrolled.hidden_states(features, ids, 3)
    unrolled.fold_feature_scale()
    after = UnrolledHead(head).hidden_states(features, ids, 3)  # a fresh wrapper: scale 1
    for a, b in zip(before, after, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_collated_rows_pair_each_step_with_the_token_it_predicts(target, items):
    vocab = draft_ids(items)
    samples = []
    for item in items[:3]:
        positions = teacher_positions(len(item.input_ids), item.answer_start, 2, STEPS, item.id)
        samples.append(
            compute_sample(target, item.input_ids, item.answer_start, vocab, torch.float32, positions)
        )
    batch = collate(samples, STEPS)
    assert len(batch.steps) == STEPS
    prompt_rows = 0
    for step, rows in enumerate(batch.steps):
        for n, (b, slot) in enumerate(zip(rows.batch_index.tolist(), rows.slot.tolist(), strict=True)):
            t = slot if step == 0 else batch.query_positions[b, slot].item()
            predicted = t + FIRST_PREDICTION_OFFSET + step  # the token this row's logits predict
            sample = samples[b]
            assert predicted < sample.length
            assert bool(rows.in_answer[n]) == (predicted >= sample.answer_start)
            prompt_rows += not bool(rows.in_answer[n])
            expected_top1 = target(sample.input_ids[None, :predicted]).logits[0, -1].argmax().item()
            assert rows.target_top1[n].item() == expected_top1
            if rows.in_answer[n]:  # greedy self-generated answers: the target's argmax is the next token
                assert expected_top1 == sample.input_ids[predicted].item()
    assert prompt_rows > 0
    full = target(torch.tensor([items[0].input_ids])).logits[0].float()
    rows0 = samples[0].teacher_positions
    torch.testing.assert_close(samples[0].teacher, full[rows0][:, vocab], atol=1e-4, rtol=1e-4)


def test_draft_vocab_maps_are_consistent(target, items):
    vocab = draft_ids(items)
    assert vocab.numel() == DRAFT_VOCAB and bool((vocab[1:] > vocab[:-1]).all())
    answer_tokens = {t for i in items for t in i.input_ids[i.answer_start :]}
    if len(answer_tokens) <= DRAFT_VOCAB:  # every answer token ranks before prompt-only tokens
        assert answer_tokens <= set(vocab.tolist())
    d2t, t2d = vocab_maps(vocab, VOCAB)
    head = init_head(target, vocab, TrainConfig(draft_vocab_size=DRAFT_VOCAB))
    assert torch.equal(head.d2t, d2t) and torch.equal(head.t2d, t2d)
    draft = torch.arange(DRAFT_VOCAB)
    assert torch.equal(head.to_target_ids(draft), vocab)
    assert int(t2d.sum()) == DRAFT_VOCAB and bool(t2d[vocab].all())
    assert coverage(vocab, [i.input_ids[i.answer_start :] for i in items], VOCAB) == pytest.approx(
        len([t for i in items for t in i.input_ids[i.answer_start :] if t in set(vocab.tolist())])
        / sum(len(i.input_ids) - i.answer_start for i in items)
    )
    forced = select_draft_vocab([[5, 5, 6]], VOCAB, 2, always=[200])
    assert forced.tolist() == [5, 200]


def test_fit_length_keeps_the_answer_and_the_end_of_the_prompt():
    ids, start = fit_length(list(range(10)), [100, 101, 102], 8)
    assert ids == [5, 6, 7, 8, 9, 100, 101, 102] and start == 5
    ids, start = fit_length([1, 2], list(range(100, 120)), 6)
    assert start == 1 and ids == [2, 100, 101, 102, 103, 104]


# ---- training ------------------------------------------------------------------------------------------------


def test_training_lowers_the_loss_and_the_saved_head_loads(tmp_path, target, items):
    cfg = config(tmp_path, steps=24)
    torch.manual_seed(0)
    trainer = make_trainer(target, items, cfg)
    trainer.eval_items = trainer.train_items  # 6 random sequences: the check is that it fits them
    trainer.unrolled.feature_scale.copy_(trainer.estimate_feature_scale())
    before = trainer.evaluate()
    losses = [trainer.train_step()[0] for _ in range(cfg.steps)]
    after = trainer.evaluate()
    assert sum(losses[-4:]) < sum(losses[:4])
    assert after.weighted_loss(cfg.ttt_decay) < before.weighted_loss(cfg.ttt_decay)

    saved = export_head(trainer.head, tmp_path / "head", torch.bfloat16)
    loaded = load_head(saved, target, dtype=target.dtype)
    assert isinstance(loaded, Eagle3Head) and loaded.fc.weight.dtype == target.dtype
    assert torch.equal(loaded.d2t, trainer.head.d2t) and torch.equal(loaded.t2d, trainer.head.t2d)
    for name, value in trainer.head.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(loaded.state_dict()[name], value.to(torch.bfloat16).float())


@torch.no_grad()
def test_warm_start_continues_a_saved_head_under_a_new_vocabulary(tmp_path, target, items):
    """A run started from a saved head computes the saved head's function on the shared tokens from step 0, and
    rows of tokens the saved head lacks are the target's rows under the map that fits the shared ones."""
    torch.manual_seed(4)
    answers = [i.input_ids[i.answer_start :] for i in items]
    # more shared rows than dimensions, so the least-squares map is unique
    vocab = select_draft_vocab(answers, VOCAB, 2 * HIDDEN)
    new_ids = vocab[::8]
    saved_ids = torch.tensor([t for t in range(VOCAB) if t not in set(new_ids.tolist())])
    source = Eagle3Head.from_target(target, draft_vocab_size=saved_ids.numel())
    source.set_vocab_map(saved_ids)
    for param in source.parameters():
        param.normal_(0, 0.2)
    embedding = target.get_output_embeddings().weight
    mapping = torch.randn(HIDDEN, HIDDEN) * 0.3  # the saved rows are an exact linear map of the target's
    source.lm_head.weight.copy_(embedding[saved_ids] @ mapping)
    export_head(source, tmp_path / "saved", torch.float32)

    shared = torch.isin(vocab, saved_ids)
    assert int((~shared).sum()) == new_ids.numel()
    cfg = config(tmp_path / "run", init_head=str(tmp_path / "saved"), draft_vocab_size=vocab.numel())
    trainer = make_trainer(target, items, cfg, vocab)
    trainer.precompute()
    trainer.set_feature_scale()
    assert not torch.equal(trainer.unrolled.feature_scale, torch.ones_like(trainer.unrolled.feature_scale))

    features = torch.randn(1, 9, 3 * HIDDEN) * 5
    ids = torch.randint(0, VOCAB, (1, 9))
    hidden = trainer.unrolled.hidden_states(features, ids, 1)[0]  # the unroll divides by the scale
    expected = source(features, shifted_tokens(ids, 0)).hidden
    torch.testing.assert_close(hidden, expected, atol=1e-4, rtol=1e-4)
    row_of = {int(t): r for r, t in enumerate(saved_ids)}
    for row, token in enumerate(vocab.tolist()):
        expected = source.lm_head.weight[row_of[token]] if shared[row] else embedding[token] @ mapping
        torch.testing.assert_close(trainer.head.lm_head.weight[row], expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("vocab", "hidden", "named"), [(VOCAB, 2 * HIDDEN, "fc.weight"), (2 * VOCAB, HIDDEN, "t2d")]
)
def test_warm_start_refuses_a_head_of_another_target(tmp_path, target, items, vocab, hidden, named):
    other = tiny_model("llama", vocab=vocab, layers=LAYERS, hidden=hidden)
    head = Eagle3Head.from_target(other, draft_vocab_size=DRAFT_VOCAB)
    export_head(head, tmp_path / "other", torch.float32)
    with pytest.raises(HeadCheckpointError, match=f"wrong shape.*{named}.*same target"):
        make_trainer(target, items, config(tmp_path / "run", init_head=str(tmp_path / "other")))


def test_resume_continues_with_identical_losses(tmp_path, target, items):
    steps, split = 8, 4
    full = make_trainer(target, items, config(tmp_path / "a", steps=steps))
    reference = [full.train_step()[0] for _ in range(steps)]

    first = make_trainer(target, items, config(tmp_path / "b", steps=steps))
    for _ in range(split):
        first.train_step()
    first.save_checkpoint()
    resumed = make_trainer(target, items, config(tmp_path / "b", steps=steps))
    assert resumed.load_latest() and resumed.step == split
    assert resumed.scheduler.last_epoch == split
    continued = [resumed.train_step()[0] for _ in range(steps - split)]
    assert continued == pytest.approx(reference[split:], rel=1e-6, abs=1e-7)


def test_train_head_end_to_end_from_prompts_answered_by_the_target(tmp_path, target):
    decoder = HybridSpecDecoder(target, ChatIdTokenizer())
    generator = torch.Generator().manual_seed(3)
    records = [
        {"id": f"c{i}", "messages": [{"role": "user", "content": " ".join(map(str, row.tolist()))}]}
        for i, row in enumerate(torch.randint(2, VOCAB, (6, 16), generator=generator))
    ]
    records.append(  # a conversation whose answer is given: it is tokenized, not generated
        {"messages": [{"role": "user", "content": "5 6 7"}, {"role": "assistant", "content": "8 9 1"}]}
    )
    from hsd_rag.training import RecipeConfig

    recipe = RecipeConfig(cache=tmp_path / "answers.jsonl", max_new_tokens=8)
    cfg = config(tmp_path / "out", steps=4, eval_fraction=0.3, eval_every=2, checkpoint_every=2)
    head = train_head(decoder, config=cfg, conversations=records, recipe=recipe, progress=False)
    assert isinstance(head, Eagle3Head)
    assert len((tmp_path / "answers.jsonl").read_text().splitlines()) == 6  # generated answers are cached
    report = json.loads((tmp_path / "out" / "train_report.json").read_text())
    assert report["steps"] == 4 and report["conversations"] == 7
    assert load_head(tmp_path / "out", target).draft_vocab_size == DRAFT_VOCAB
    given = conversation_from_record(records[-1])
    assert encode(decoder, given) == ([5, 6, 7], [8, 9, 1])

    # held-out judging: real EAGLE decoding (lossless: equals greedy) and teacher-forced top-1 per depth
    with_head = HybridSpecDecoder(target, ChatIdTokenizer(), head=head.eval())
    prompts = [conversation_from_record(r) for r in records[:2]]
    report = measure_tau(with_head, prompts, budget=4, max_new_tokens=6)
    assert (
        report.steps > 0
        and report.tau >= 1.0
        and report.new_tokens == sum(len(c.answer_ids) for c in report.conversations)
    )
    for conversation in report.conversations:
        ids = torch.tensor([with_head.encode_prompt(conversation.messages)])
        greedy = target.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1] :].tolist()
        assert conversation.answer_ids == greedy[: len(conversation.answer_ids)]
    stats = depth_accuracy(with_head, head, report.conversations, steps=3)
    assert len(stats.accuracy()) >= 1 and all(0.0 <= a <= 1.0 for a in stats.accuracy())


def test_eval_head_cli_parses_and_refuses_no_head(capsys):
    from hsd_rag.cli import build_parser, main

    args = build_parser().parse_args(["eval-head", "--head", "my-head", "--limit", "3", "--budget", "8"])
    assert (args.head, args.limit, args.budget, args.lang) == ("my-head", 3, 8, "en")
    assert main(["eval-head", "--head", "none"]) == 2
    assert "pass --head" in capsys.readouterr().err


def test_eval_head_judges_every_benchmark_prompt_and_none_the_priors_use():
    """By default a head is judged on all the held-out prompts benchmarks draw from, and on none of the prompts its
    acceptance priors are measured on (those start right after them)."""
    from hsd_rag.cli import build_parser
    from hsd_rag.training.evaluate import PRIORS_OFFSET, heldout_rag_conversations

    limit = build_parser().parse_args(["eval-head"]).limit
    assert limit == PRIORS_OFFSET == 50
    for lang in ("en", "fr", "es"):
        judged = {c.id for c in heldout_rag_conversations(limit, lang)}
        priors = {c.id for c in heldout_rag_conversations(20, lang, offset=PRIORS_OFFSET)}
        assert len(judged) == limit and len(priors) == 20 and not judged & priors


def test_warm_start_auto_names_the_shipped_head(target):
    """ "auto" resolves to the head this package ships (for SmolLM2, so a tiny target is refused, naming it)."""
    head = Eagle3Head.from_target(target, draft_vocab_size=DRAFT_VOCAB)
    with pytest.raises(HeadCheckpointError, match="smollm2-135m-instruct-eagle3.*wrong shape"):
        warm_start(head, "auto")


def test_copy_instructions_use_train_side_gold_passages_of_each_language():
    """The recipe's copy prompts: per language, train-side gold passages only (never a held-out one), the
    passage given as the prompt's document, reproducible by seed, and off unless asked for."""
    from hsd_rag.bench.datasets import HELDOUT_FRACTION
    from hsd_rag.data import load_builtin, split
    from hsd_rag.training import RecipeConfig
    from hsd_rag.training.data import COPY_TEMPLATES, copy_instructions, recipe_prompts

    prompts = copy_instructions(["fr", "es"], 5, seed=1)
    assert [c.source for c in prompts] == ["copy-fr"] * 5 + ["copy-es"] * 5
    for lang in ("fr", "es"):
        _, heldout = split(load_builtin(lang), HELDOUT_FRACTION)
        heldout_gold = {e.documents[e.gold_index] for e in heldout if e.gold_index is not None}
        for conversation in (c for c in prompts if c.source == f"copy-{lang}"):
            (passage,) = conversation.documents
            assert passage not in heldout_gold
            content = conversation.messages[0]["content"]
            assert any(content == t.format(text=passage) for t in COPY_TEMPLATES[lang])
    assert [c.id for c in copy_instructions(["fr", "es"], 5, seed=1)] == [c.id for c in prompts]
    assert [c.id for c in copy_instructions(["fr"], 5, seed=2)] != [c.id for c in prompts[:5]]
    # a larger count keeps a smaller one's prompts, so their cached answers stay valid
    assert [c.id for c in copy_instructions(["fr"], 3, seed=1)] == [c.id for c in prompts[:3]]
    assert copy_instructions(["en"], 0) == []
    default = RecipeConfig(languages=["en"], rag_limit=2, general_wiki=0, general_pydoc=0)
    assert not any(c.source.startswith("copy") for c in recipe_prompts(default))
    asked = recipe_prompts(default.model_copy(update={"copy_passages": 3}))
    assert sum(c.source == "copy-en" for c in asked) == 3
