"""Offline RAG prompt sets (FanOutQA + Wikipedia lead sections), jsonl prompt files and the held-out split."""

from hsd_rag.data.jsonl import dump_jsonl, load_jsonl
from hsd_rag.data.prompt import PASSAGE_SEPARATOR, RAG_PROMPT_TEMPLATE, format_messages, format_prompt
from hsd_rag.data.rag_prompts import RagExample, load_builtin
from hsd_rag.data.sources import DataNotInstalledError
from hsd_rag.data.split import is_heldout, split

__all__ = [
    "PASSAGE_SEPARATOR",
    "RAG_PROMPT_TEMPLATE",
    "DataNotInstalledError",
    "RagExample",
    "dump_jsonl",
    "format_messages",
    "format_prompt",
    "is_heldout",
    "load_builtin",
    "load_jsonl",
    "split",
]
