"""What a constrained output must look like: the `response_format` values a generation accepts.

The names follow the OpenAI / vLLM `response_format` vocabulary so configurations travel between them:
`{"type": "json_schema", ...}`, `{"type": "json_object"}`, plus `regex`, `grammar` (EBNF) and
`structural_tag` (free text with constrained tagged sections, used for tool calls). Convenience inputs are
normalised here, once: a pydantic model class, a TypedDict or a plain JSON-schema dict become a `JsonSchema`;
the string "json_object" (or "json") becomes `JsonObject`. Nothing here imports the grammar engine.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter
from typing_extensions import is_typeddict

# Keys of OpenAI's wrapper {"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}.
OPENAI_SCHEMA_WRAPPER_KEYS = frozenset({"name", "schema", "strict", "description"})


class _Format(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def cache_key(self) -> str:
        """A canonical string: equal formats share one compiled grammar."""
        return json.dumps(self.model_dump(), sort_keys=True, default=str)


class JsonSchema(_Format):
    """One JSON value valid under `json_schema` (properties in schema order, as most models write them)."""

    type: Literal["json_schema"] = "json_schema"
    json_schema: dict[str, Any]
    """The JSON schema (draft 2020-12 subset supported by xgrammar: types, enums, const, required, anyOf,
    arrays with items/min/max, string patterns and lengths, numeric ranges, $defs/$ref)."""
    any_whitespace: bool = False
    """False: compact separators `, ` and `: ` only. Small models given free whitespace can emit newlines
    forever inside a JSON value; the compact form is also what `json.dumps` and most chat models write."""


class JsonObject(_Format):
    """JSON mode: any JSON object (OpenAI's `{"type": "json_object"}`)."""

    type: Literal["json_object"] = "json_object"
    any_whitespace: bool = False
    """See `JsonSchema.any_whitespace`."""


class Regex(_Format):
    """Text matching a regular expression (the whole output)."""

    type: Literal["regex"] = "regex"
    pattern: str


class Grammar(_Format):
    """Text derived from an EBNF grammar in xgrammar's GBNF dialect (the start rule is `root`)."""

    type: Literal["grammar"] = "grammar"
    ebnf: str


class StructuralTag(_Format):
    """Free text with tagged sections whose content is constrained (xgrammar / vLLM "structural_tag").

    `format` is the structural tag's format object in its JSON form, e.g. `{"type": "triggered_tags",
    "triggers": ["<tool_call>"], "tags": [...]}`; `hsd_rag.constrain.tool_calls` builds these for tools.
    """

    type: Literal["structural_tag"] = "structural_tag"
    format: dict[str, Any]


FORMATS = (JsonSchema, JsonObject, Regex, Grammar, StructuralTag)
FORMAT_TYPES = frozenset(f.model_fields["type"].default for f in FORMATS)


def schema_of(schema: Any) -> dict[str, Any]:
    """A pydantic model class (v2 or v1), a TypedDict class or a JSON-schema dict -> the JSON-schema dict."""
    if isinstance(schema, dict):
        return schema
    if isinstance(schema, type) and issubclass(schema, BaseModel):
        return schema.model_json_schema()
    if isinstance(schema, type) and hasattr(schema, "schema") and hasattr(schema, "__fields__"):  # pydantic.v1
        return schema.schema()
    if is_typeddict(schema):
        return TypeAdapter(schema).json_schema()
    raise TypeError(
        f"Expected a pydantic model class, a TypedDict or a JSON-schema dict, got {schema!r}."
    )


def to_response_format(value: Any) -> _Format | None:
    """Normalise the accepted spellings of a response format (see the module docstring); None stays None."""
    if value is None or isinstance(value, _Format):
        return value
    if isinstance(value, str):
        if value in ("json_object", "json"):
            return JsonObject()
        raise ValueError(
            f"response_format={value!r} is not a format: use 'json_object', a JSON schema, a pydantic model, "
            "or {'type': 'regex', 'pattern': ...}."
        )
    if isinstance(value, dict) and value.get("type") in FORMAT_TYPES:
        if value["type"] == "json_schema" and isinstance(value.get("json_schema"), dict):
            wrapper = value["json_schema"]
            if "schema" in wrapper and set(wrapper) <= OPENAI_SCHEMA_WRAPPER_KEYS:  # OpenAI's nesting
                value = {**value, "json_schema": wrapper["schema"]}
                value.pop("strict", None)
        return _FORMAT_ADAPTER.validate_python(value)
    return JsonSchema(json_schema=schema_of(value))


ResponseFormat = Annotated[
    JsonSchema | JsonObject | Regex | Grammar | StructuralTag, Field(discriminator="type")
]
_FORMAT_ADAPTER = TypeAdapter(ResponseFormat)
# The DecodeConfig field type: any accepted spelling in, a `ResponseFormat` (or None) out.
ResponseFormatSetting = Annotated[ResponseFormat | None, BeforeValidator(to_response_format)]
