"""`train_head`: conversations -> target tokens -> draft vocabulary -> features -> TTT training -> saved head."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from hsd_rag.data.split import unit_hash
from hsd_rag.heads.checkpoint import save_head
from hsd_rag.heads.eagle3 import Eagle3Head
from hsd_rag.training.config import RecipeConfig, TrainConfig
from hsd_rag.training.data import (
    Conversation,
    answer_missing,
    build_recipe_data,
    conversation_from_record,
    encode,
    load_conversations,
)
from hsd_rag.training.features import FeatureStore, fit_length
from hsd_rag.training.trainer import Item, Trainer, init_head
from hsd_rag.training.vocab import coverage, select_draft_vocab

FEATURE_DIR = "features"
REPORT_NAME = "train_report.json"
EVAL_SPLIT_SEED = 1  # the eval split hashes ids with its own seed, independent of the benchmark split
COVERAGE_SIZES = (2048, 4096, 8192, 16384, 32768)  # draft vocab sizes whose answer coverage the report lists


def as_decoder(target, tokenizer=None):
    """A HybridSpecDecoder from a decoder, or from a model and its tokenizer."""
    from hsd_rag.decoder import HybridSpecDecoder

    if isinstance(target, HybridSpecDecoder):
        return target
    if tokenizer is None:
        raise ValueError(
            "Pass the target's tokenizer (or a HybridSpecDecoder) to train a head for a bare model."
        )
    return HybridSpecDecoder(target, tokenizer)


def as_conversations(conversations) -> list[Conversation]:
    """Accept a jsonl path, `{"messages": ...}` dicts or `Conversation` objects."""
    if isinstance(conversations, str | Path):
        return load_conversations(conversations)
    return [
        c if isinstance(c, Conversation) else conversation_from_record(c, f"conversation {i}")
        for i, c in enumerate(conversations)
    ]


def to_items(decoder, conversations: Sequence[Conversation], max_len: int) -> list[Item]:
    items = []
    for conversation in conversations:
        prompt_ids, answer_ids = encode(decoder, conversation)
        if not answer_ids:
            continue
        ids, start = fit_length(prompt_ids, answer_ids, max_len)
        items.append(Item(conversation.id, ids, start))
    return items


def train_head(
    target,
    tokenizer=None,
    config: TrainConfig | None = None,
    conversations=None,
    recipe: RecipeConfig | None = None,
    progress: bool = True,
) -> Eagle3Head:
    """Train an EAGLE-3 head for `target` (a HybridSpecDecoder, or an HF causal LM with `tokenizer`).

    `conversations`: a jsonl path, `{"messages": [...]}` dicts or `Conversation`s; prompts without an assistant
    turn are answered by the target. None = the built-in recipe (`recipe` tunes it). The head is saved to
    `config.output_dir` (official layout, `config.save_dtype`) with a `train_report.json`, and returned in
    the training dtype, bound to the target.
    """
    config = config or TrainConfig()
    decoder = as_decoder(target, tokenizer)
    model = decoder.model
    started = time.perf_counter()
    if conversations is None:
        conversations = build_recipe_data(decoder, recipe or RecipeConfig(seed=config.seed), progress)
    else:
        recipe = recipe or RecipeConfig()
        conversations = answer_missing(
            decoder,
            as_conversations(conversations),
            recipe.cache,
            recipe.max_new_tokens,
            recipe.budget,
            progress,
        )
    data_s = time.perf_counter() - started
    items = to_items(decoder, conversations, config.max_seq_len)
    eval_items = [i for i in items if unit_hash(i.id, EVAL_SPLIT_SEED + config.seed) < config.eval_fraction]
    held = {i.id for i in eval_items}
    train_items = [i for i in items if i.id not in held]

    vocab_size = model.config.get_text_config().vocab_size
    answers = [i.input_ids[i.answer_start :] for i in train_items]
    prompts = [i.input_ids[: i.answer_start] for i in train_items]
    size = min(config.draft_vocab_size or vocab_size, vocab_size)
    draft_to_target = select_draft_vocab(answers, vocab_size, size, prompts, always=decoder.eos_token_ids)

    head = init_head(model, draft_to_target, config)
    feature_dir = Path(config.output_dir) / FEATURE_DIR if config.cache_features else None
    store = FeatureStore(
        model,
        draft_to_target,
        feature_dir,
        getattr(torch, config.feature_dtype),
        config.prompt_chains,
        config.ttt_steps,
    )
    trainer = Trainer(head, store, train_items, eval_items, config, progress)
    head = trainer.fit()
    if trainer.runtime.is_main:
        export_head(head, config.output_dir, getattr(torch, config.save_dtype))
        eval_answers = [i.input_ids[i.answer_start :] for i in eval_items]
        report = {
            "conversations": len(items),
            "train_conversations": len(train_items),
            "eval_conversations": len(eval_items),
            "train_answer_tokens": sum(len(a) for a in answers),
            "draft_vocab_size": size,
            "eval_answer_coverage": round(coverage(draft_to_target, eval_answers, vocab_size), 4),
            "coverage_by_size": _coverage_table(
                answers, prompts, eval_answers, vocab_size, decoder.eos_token_ids
            ),
            "steps": trainer.total_steps,
            "train_s": round(trainer.train_s, 1),
            "data_s": round(data_s, 1),
            "total_s": round(time.perf_counter() - started, 1),
            "history": trainer.history,
            "config": json.loads(config.model_dump_json()),
        }
        (Path(config.output_dir) / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    return head


def export_head(head: Eagle3Head, directory: str | Path, dtype: torch.dtype) -> Path:
    """Save `head` in the official layout with weights cast to `dtype` (the head itself is left unchanged)."""
    copy = Eagle3Head(head.config)
    copy.load_state_dict({k: v.detach().cpu() for k, v in head.state_dict().items()})
    return save_head(copy.to(dtype), directory)


def _coverage_table(answers, prompts, eval_answers, vocab_size: int, always) -> dict[str, float]:
    """Held-out answer-token coverage of the draft vocabulary for several sizes (chooses `draft_vocab_size`)."""
    table = {}
    for size in COVERAGE_SIZES:
        if size <= vocab_size:
            ids = select_draft_vocab(answers, vocab_size, size, prompts, always)
            table[str(size)] = round(coverage(ids, eval_answers, vocab_size), 4)
    return table
