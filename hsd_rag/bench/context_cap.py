"""Cut a prompt's documents to a total token budget, as the research prototype did for RAGBench (2,800 tokens).

Some RAGBench subsets (CUAD contracts, TechQA manuals) carry documents far longer than a small target's context
window; the cap keeps prompts comparable across subsets and models. Documents are kept in their given order
(retrievers rank the best first): each is kept whole while it fits, the one that crosses the cap is cut, and
the rest are dropped. With a tokenizer the cap counts the target's tokens; without one it falls back to a
character cap of `CHARS_PER_TOKEN` characters per token, a typical average of English BPE vocabularies.
"""

from __future__ import annotations

from collections.abc import Sequence

PROTOTYPE_CONTEXT_TOKENS = 2800  # the research prototype's cap on RAGBench documents (FIELD-NOTES §6)
CHARS_PER_TOKEN = 4


def cap_documents(documents: Sequence[str], max_tokens: int, tokenizer=None) -> list[str]:
    """`documents` cut to at most `max_tokens` tokens together (see the module docstring for the rule)."""
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
    out: list[str] = []
    room = max_tokens if tokenizer is not None else max_tokens * CHARS_PER_TOKEN  # in tokens, or characters
    for doc in documents:
        if room <= 0:
            break
        kept, used = _cut(doc, room, tokenizer)
        if kept:
            out.append(kept)
        room -= used
    return out


def _cut(doc: str, room: int, tokenizer) -> tuple[str, int]:
    """(the part of `doc` that fits in `room` units, the units it uses): tokens, or characters without tokenizer."""
    if tokenizer is None:
        kept = doc[:room]
        return kept, len(kept)
    ids = tokenizer(doc, add_special_tokens=False).input_ids
    if len(ids) <= room:
        return doc, len(ids)
    return tokenizer.decode(ids[:room], skip_special_tokens=True), room
