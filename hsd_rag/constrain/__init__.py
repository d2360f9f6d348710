"""Constrained decoding that stays lossless: JSON schema, JSON mode, regex, EBNF and tool-call formats.

    decoder.generate(messages, response_format=MyPydanticModel)        # or a JSON-schema dict, "json_object",
    decoder.generate(messages, response_format={"type": "regex", "pattern": r"(yes|no)"})

`formats` normalises what callers pass; `engine` wraps the grammar engine (xgrammar: why, with measurements, in
its docstring); `rule` is the per-node `LogitsRule` the decode loop runs; `tool_calls` renders tools and parses
calls for the LangChain / LlamaIndex adapters.
"""

from hsd_rag.constrain.formats import (
    Grammar,
    JsonObject,
    JsonSchema,
    Regex,
    ResponseFormat,
    StructuralTag,
    schema_of,
    to_response_format,
)
from hsd_rag.constrain.rule import GrammarRule, grammar_rule

__all__ = [
    "Grammar",
    "GrammarRule",
    "JsonObject",
    "JsonSchema",
    "Regex",
    "ResponseFormat",
    "StructuralTag",
    "grammar_rule",
    "schema_of",
    "to_response_format",
]
