"""The draft vocabulary: the target tokens an EAGLE-3 head can propose, chosen by frequency in the training answers.

A head's `lm_head` over the whole vocabulary of a modern target (49k-256k ids) costs more than the rest of the
head; EAGLE-3 keeps only the most frequent target tokens of the training answers (FIELD-NOTES §5). Tokens never
seen in an answer are ranked by how often they occur in the prompts (RAG answers copy from their documents),
so a large draft vocabulary is filled sensibly. Ties keep the smaller id, so the choice is deterministic.

Maps, in the official layout: `d2t[d] = target_id(d) - d` (int64[draft]) and `t2d[t] = t is in the draft vocab`
(bool[vocab]); `Eagle3Head.set_vocab_map(draft_to_target)` installs both from the sorted target ids.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

# A token seen once in an answer outranks one seen this many times in prompts only.
PROMPT_WEIGHT = 1e-6


def token_counts(sequences: Iterable[Sequence[int]], vocab_size: int) -> torch.Tensor:
    """Occurrences of every target id in `sequences` -> float64[vocab_size]."""
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for ids in sequences:
        if len(ids):
            counts += torch.bincount(
                torch.as_tensor(list(ids), dtype=torch.long), minlength=vocab_size
            ).double()
    return counts


def select_draft_vocab(
    answers: Iterable[Sequence[int]],
    vocab_size: int,
    draft_vocab_size: int,
    prompts: Iterable[Sequence[int]] = (),
    always: Iterable[int] = (),
) -> torch.Tensor:
    """Sorted target ids of the draft vocabulary (int64[draft_vocab_size]).

    Ranking: answer frequency, then prompt frequency, then smaller id; `always` (e.g. end-of-turn ids) is kept
    whatever its count.
    """
    if not 0 < draft_vocab_size <= vocab_size:
        raise ValueError(f"draft_vocab_size must be in [1, {vocab_size}], got {draft_vocab_size}")
    score = token_counts(answers, vocab_size) + PROMPT_WEIGHT * token_counts(prompts, vocab_size)
    forced = torch.as_tensor(sorted(set(always)), dtype=torch.long)
    if forced.numel():
        score[forced] = float("inf")
    # stable descending sort: equal scores keep ascending id order
    order = torch.sort(score, descending=True, stable=True).indices
    return order[:draft_vocab_size].sort().values


def vocab_maps(draft_to_target: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(d2t int64[draft], t2d bool[vocab]) in the official EAGLE-3 layout."""
    ids = draft_to_target.to(torch.long)
    if ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all()):
        raise ValueError("draft_to_target must be strictly increasing")
    d2t = ids - torch.arange(ids.numel())
    t2d = torch.zeros(vocab_size, dtype=torch.bool)
    t2d[ids] = True
    return d2t, t2d


def coverage(draft_to_target: torch.Tensor, sequences: Iterable[Sequence[int]], vocab_size: int) -> float:
    """Fraction of the tokens of `sequences` that the draft vocabulary contains (what the head can propose)."""
    counts = token_counts(sequences, vocab_size)
    total = counts.sum().item()
    return counts[draft_to_target].sum().item() / total if total else 0.0
