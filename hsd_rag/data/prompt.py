"""The RAG chat prompt: one template, the research prototype's, so benchmark numbers stay comparable."""

from __future__ import annotations

import string
from collections.abc import Sequence

from hsd_rag.data.rag_prompts import RagExample

RAG_PROMPT_TEMPLATE = (
    "Use the following pieces of context to answer the question.\n{passages}\nQuestion: {query}"
)
PASSAGE_SEPARATOR = "\n\n"
TEMPLATE_FIELDS = {"passages", "query"}


def format_prompt(
    question: str,
    documents: Sequence[str],
    template: str = RAG_PROMPT_TEMPLATE,
    separator: str = PASSAGE_SEPARATOR,
) -> str:
    """The user turn: `template` filled with the joined documents and the question."""
    fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    if fields != TEMPLATE_FIELDS:
        raise ValueError(
            f"template must use exactly the fields {sorted(TEMPLATE_FIELDS)}, got {sorted(fields)}"
        )
    return template.format(passages=separator.join(documents), query=question)


def format_messages(
    example: RagExample, template: str = RAG_PROMPT_TEMPLATE, separator: str = PASSAGE_SEPARATOR
) -> list[dict[str, str]]:
    """Chat messages for `example`; a ready-made `example.messages` (from a jsonl file) is returned unchanged."""
    if example.messages is not None:
        return [dict(message) for message in example.messages]
    return [
        {"role": "user", "content": format_prompt(example.question, example.documents, template, separator)}
    ]
