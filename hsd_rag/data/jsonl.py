"""Bring-your-own prompt sets: one JSON object per line.

Each line has `documents` (list of str) and one of `messages` (a chat prompt sent as is), `prompt` (one user turn
sent as is) or `question` (filled into the RAG template); optional `answer`, `id`, `lang`, `gold_title`,
`gold_index`.
A line without an `id` gets a hash of its content, so the held-out split stays stable when lines are reordered.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from hsd_rag.data.rag_prompts import RagExample

ID_HEX_CHARS = 16
PROMPT_KEYS = ("messages", "prompt", "question")


def _content_id(record: dict) -> str:
    content = json.dumps([record.get(key) for key in (*PROMPT_KEYS, "documents")], sort_keys=True)
    return hashlib.sha256(content.encode()).hexdigest()[:ID_HEX_CHARS]


def _messages_are_valid(messages: object) -> bool:
    return (
        isinstance(messages, list)
        and bool(messages)
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )
    )


def _example(record: object, where: str) -> RagExample:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    documents = record.get("documents")
    if not isinstance(documents, list) or not all(isinstance(d, str) for d in documents):
        raise ValueError(f"{where}: `documents` must be a list of strings")
    messages = record.get("messages")
    if messages is not None:
        if not _messages_are_valid(messages):
            raise ValueError(
                f"{where}: `messages` must be a non-empty list of {{role, content}} string objects"
            )
        user_turns = [m["content"] for m in messages if m["role"] == "user"]
        question = user_turns[-1] if user_turns else messages[-1]["content"]
    elif isinstance(record.get("prompt"), str):
        question = record["prompt"]
        messages = [{"role": "user", "content": question}]
    elif isinstance(record.get("question"), str):
        question = record["question"]
    else:
        raise ValueError(f"{where}: needs one of {', '.join(PROMPT_KEYS)}")
    answer = record.get("answer")
    return RagExample(
        id=str(record.get("id") or _content_id(record)),
        question=question,
        documents=documents,
        answer=None if answer is None else str(answer),
        gold_title=record.get("gold_title"),
        lang=record.get("lang"),
        gold_index=record.get("gold_index"),
        messages=messages,
    )


def load_jsonl(path: str | Path) -> list[RagExample]:
    """Examples from a jsonl file; a malformed line raises `ValueError` naming its line number."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No prompt file at {path}")
    examples = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from error
            examples.append(_example(record, f"{path}:{number}"))
    return examples


def dump_jsonl(examples: Iterable[RagExample], path: str | Path) -> None:
    """Write examples in the format `load_jsonl` reads (empty fields left out)."""
    with Path(path).open("w", encoding="utf-8") as out:
        for example in examples:
            record = {key: value for key, value in dataclasses.asdict(example).items() if value is not None}
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
