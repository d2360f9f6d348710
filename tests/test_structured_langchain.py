"""LangChain structured output and tool calling, on a tiny random Llama over the real SmolLM2 tokenizer.

A random model writes nonsense, so what is checked is the plumbing: the constraint always yields a parsable,
valid answer; the adapter's text equals the decoder's own constrained decode (the adapter adds no decoding);
tool calls come back in `AIMessage.tool_calls` (invoke and stream); histories with tool calls and results are
accepted. The schemas bound every value (enums, integer ranges, short strings) so a random model finishes.
"""

from __future__ import annotations

import json
from typing import Literal

import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.tools import tool
from pydantic import BaseModel, Field
from typing_extensions import TypedDict

from hsd_rag.langchain import HybridSpecLLM
from tests.tiny_models import smollm2_chat_decoder

QUESTION = "Who is it about?"
MAX_NEW = 64


class Person(BaseModel):
    """A person mentioned in the text."""

    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=120)
    role: Literal["scientist", "artist", "other"]


class PersonDict(TypedDict):
    name: Literal["Ada", "Alan"]
    age: int


PERSON_JSON_SCHEMA = {
    "title": "person",
    "description": "A person.",
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 5}, "alive": {"type": "boolean"}},
    "required": ["name", "alive"],
}


@tool
def add(a: int, b: int) -> int:
    """Add two small integers."""
    return a + b


class Lookup(BaseModel):
    """Look a word up."""

    word: str = Field(max_length=6)


@pytest.fixture(scope="module")
def chat_decoder():
    return smollm2_chat_decoder()


@pytest.fixture
def llm(chat_decoder):
    return HybridSpecLLM(decoder=chat_decoder, max_new_tokens=MAX_NEW)


def bounded_add():
    """`add` with argument ranges, so a random model's integers end."""

    @tool
    def add(a: int = Field(ge=0, le=9), b: int = Field(ge=0, le=9)) -> int:
        """Add two small integers."""
        return a + b

    return add


# ---- with_structured_output ------------------------------------------------------------------------------


@pytest.mark.parametrize("schema", [Person, PersonDict, PERSON_JSON_SCHEMA], ids=["pydantic", "typeddict", "json"])
def test_json_schema_method_returns_the_schema_type(llm, chat_decoder, schema):
    result = llm.with_structured_output(schema).invoke(QUESTION)
    if schema is Person:
        assert isinstance(result, Person)
    else:
        assert isinstance(result, dict)
    if schema is PERSON_JSON_SCHEMA:
        assert set(result) == {"name", "alive"} and isinstance(result["alive"], bool)
    if schema is PersonDict:
        assert result["name"] in ("Ada", "Alan") and isinstance(result["age"], int)


def test_structured_answer_is_the_decoders_constrained_decode(llm, chat_decoder):
    raw = llm.with_structured_output(Person, include_raw=True).invoke(QUESTION)
    reference = chat_decoder.generate([{"role": "user", "content": QUESTION}], response_format=Person,
                                      max_new_tokens=MAX_NEW)
    assert raw["raw"].content == reference.text
    assert raw["parsed"] == Person.model_validate_json(reference.text) and raw["parsing_error"] is None
    plain = chat_decoder.generate([{"role": "user", "content": QUESTION}], response_format=Person,
                                  max_new_tokens=MAX_NEW, method="vanilla")
    assert plain.text == reference.text  # and both are the plain constrained decode


def test_include_raw_reports_a_truncated_answer_instead_of_raising(chat_decoder):
    short = HybridSpecLLM(decoder=chat_decoder, max_new_tokens=3)
    out = short.with_structured_output(Person, include_raw=True).invoke(QUESTION)
    assert out["parsed"] is None and out["parsing_error"] is not None
    assert out["raw"].response_metadata["finish_reason"] == "length"


def test_json_mode_returns_an_object(chat_decoder):
    llm = HybridSpecLLM(decoder=chat_decoder, max_new_tokens=200)
    out = llm.with_structured_output(None, method="json_mode", include_raw=True).invoke(QUESTION)
    if out["raw"].response_metadata["finish_reason"] == "stop":  # a random model's object may run long
        assert isinstance(out["parsed"], dict)
    assert out["raw"].content.startswith("{")
    json_mode = chat_decoder.generate([{"role": "user", "content": QUESTION}], response_format="json_object",
                                      max_new_tokens=200)
    assert out["raw"].content == json_mode.text


def test_function_calling_method(llm):
    out = llm.with_structured_output(Lookup, method="function_calling", include_raw=True).invoke(QUESTION)
    assert isinstance(out["parsed"], Lookup)
    assert out["raw"].tool_calls[0]["name"] == "Lookup"
    dict_out = llm.with_structured_output(PERSON_JSON_SCHEMA, method="function_calling").invoke(QUESTION)
    assert set(dict_out) == {"name", "alive"}


def test_structured_output_streams_and_runs_in_an_lcel_chain(llm):
    prompt = ChatPromptTemplate.from_messages([("system", "Extract the person."), ("human", "{text}")])
    chain = prompt | llm.with_structured_output(PERSON_JSON_SCHEMA)
    result = chain.invoke({"text": "Ada Lovelace wrote the first program."})
    partials = list(chain.stream({"text": "Ada Lovelace wrote the first program."}))
    assert partials and partials[-1] == result


def test_bad_structured_arguments_fail_clearly(llm):
    with pytest.raises(ValueError, match="needs a schema"):
        llm.with_structured_output(None)
    with pytest.raises(ValueError, match="not supported"):
        llm.with_structured_output(Person, method="xml")
    with pytest.raises(ValueError, match="unknown argument"):
        llm.with_structured_output(Person, temprature=1)


# ---- tools -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("choice", ["any", "required", True, "add"])
def test_forced_tool_calls_parse_into_tool_calls(llm, choice):
    message = llm.bind_tools([bounded_add(), Lookup], tool_choice=choice).invoke("What is 2 + 3?")
    assert message.content == ""
    assert len(message.tool_calls) == 1
    call = message.tool_calls[0]
    assert call["type"] == "tool_call" and call["id"].startswith("call_")
    if choice == "add":
        assert call["name"] == "add"
    if call["name"] == "add":
        assert set(call["args"]) == {"a", "b"} and all(0 <= v <= 9 for v in call["args"].values())
    else:
        assert set(call["args"]) == {"word"}
    assert message.response_metadata["finish_reason"] == "tool_calls"


def test_streamed_tool_call_aggregates_to_the_invoked_one(llm):
    bound = llm.bind_tools([bounded_add()], tool_choice="any")
    invoked = bound.invoke("What is 2 + 3?")
    full = None
    for chunk in bound.stream("What is 2 + 3?"):
        full = chunk if full is None else full + chunk
    assert [(c["name"], c["args"]) for c in full.tool_calls] == [(c["name"], c["args"]) for c in invoked.tool_calls]
    assert full.chunk_position == "last"


def test_tool_choice_none_and_unknown(llm):
    message = llm.bind_tools([add], tool_choice="none").invoke("What is 2 + 3?", max_tokens=8)
    assert message.tool_calls == []
    with pytest.raises(ValueError, match="names no bound tool"):
        llm.bind_tools([add], tool_choice="multiply")


def test_auto_tool_choice_lets_the_model_answer_in_text(llm, chat_decoder):
    message = llm.bind_tools([add]).invoke("Hello", max_tokens=10)
    assert isinstance(message, AIMessage)
    # a random model practically never writes `<tool_call>` by chance: the text is streamed as content
    assert message.content and not message.tool_calls


def test_tool_results_go_back_to_the_model(llm, chat_decoder):
    history = [
        HumanMessage("What is 1 + 2?"),
        AIMessage("", tool_calls=[{"name": "add", "args": {"a": 1, "b": 2}, "id": "abc123", "type": "tool_call"}]),
        ToolMessage(json.dumps({"result": 3}), name="add", tool_call_id="abc123"),
    ]
    message = llm.bind_tools([add]).invoke(history, max_tokens=8)
    assert isinstance(message, AIMessage)
    prompt = chat_decoder.tokenizer.decode(_prompt_ids(llm, history, [add]))
    assert '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>' in prompt
    assert '<tool_response>\n{"result": 3}\n</tool_response>' in prompt
    assert '"name": "add"' in prompt.split("<|im_end|>")[0]  # the tool is described in the system message
    error = ToolMessage("Missing argument b.", name="add", tool_call_id="abc123", status="error")
    llm.bind_tools([add]).invoke([*history[:2], error], max_tokens=4)  # an error result is accepted too


def test_anthropic_style_content_blocks_are_accepted(llm):
    history = [
        HumanMessage("What is 1 + 2?"),
        AIMessage(
            [{"type": "text", "text": "some text"}, {"type": "tool_use", "id": "abc123", "name": "add",
                                                     "input": {"a": 1, "b": 2}}],
            tool_calls=[{"name": "add", "args": {"a": 1, "b": 2}, "id": "abc123", "type": "tool_call"}],
        ),
        ToolMessage("3", name="add", tool_call_id="abc123"),
    ]
    assert isinstance(llm.bind_tools([add]).invoke(history, max_tokens=4), AIMessage)


def _prompt_ids(llm, messages, tools):
    from langchain_core.utils.function_calling import convert_to_openai_tool

    prompt, _, _, _ = llm._call_args(messages, None, {"tools": [convert_to_openai_tool(t) for t in tools]})
    return prompt
