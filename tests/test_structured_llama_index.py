"""LlamaIndex structured output and function calling, on a tiny random Llama over the real SmolLM2 tokenizer.

`structured_predict` / `as_structured_llm` decode under the output class's JSON schema (not LlamaIndex's
prompt-and-parse program), so even a random model's answer always parses; function calling goes through
`FunctionCallingLLM` (`chat_with_tools`, `predict_and_call`, a `FunctionAgent`), with calls constrained to the
tool's schema. Schemas bound every value so a random model finishes.
"""

from __future__ import annotations

from typing import Literal

import pytest
from llama_index.core.base.llms.types import ToolCallBlock
from llama_index.core.llms import ChatMessage, MessageRole
from llama_index.core.prompts import ChatPromptTemplate, PromptTemplate
from llama_index.core.tools import FunctionTool
from pydantic import BaseModel, Field

from hsd_rag.llama_index import HybridSpecLLM
from tests.tiny_models import smollm2_chat_decoder

MAX_NEW = 64
PROMPT = PromptTemplate("Extract the person from: {text}")
TEXT = "Ada Lovelace wrote the first program."


class Person(BaseModel):
    """A person mentioned in the text."""

    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=120)
    role: Literal["scientist", "artist", "other"]


def add(a: int = Field(ge=0, le=9), b: int = Field(ge=0, le=9)) -> int:
    """Add two small integers."""
    return a + b


ADD = FunctionTool.from_defaults(fn=add)


@pytest.fixture(scope="module")
def chat_decoder():
    return smollm2_chat_decoder()


@pytest.fixture
def llm(chat_decoder):
    return HybridSpecLLM(decoder=chat_decoder, max_new_tokens=MAX_NEW)


def test_structured_predict_is_the_constrained_decode(llm, chat_decoder):
    person = llm.structured_predict(Person, PROMPT, text=TEXT)
    assert isinstance(person, Person)
    reference = chat_decoder.generate(
        [{"role": "user", "content": PROMPT.format(text=TEXT)}],
        response_format=Person, max_new_tokens=MAX_NEW, method="vanilla",
    )
    assert person == Person.model_validate_json(reference.text)


async def test_async_and_streamed_structured_predict_agree(llm):
    expected = llm.structured_predict(Person, PROMPT, text=TEXT)
    assert await llm.astructured_predict(Person, PROMPT, text=TEXT) == expected
    partials = list(llm.stream_structured_predict(Person, PROMPT, text=TEXT))
    assert len(partials) > 1 and partials[-1] == expected
    stream = await llm.astream_structured_predict(Person, PROMPT, text=TEXT)
    assert [p async for p in stream][-1] == expected


def test_as_structured_llm(llm):
    structured = llm.as_structured_llm(Person)
    response = structured.chat([ChatMessage(role=MessageRole.USER, content=TEXT)])
    assert isinstance(response.raw, Person)
    assert Person.model_validate_json(response.message.content) == response.raw
    chat_prompt = ChatPromptTemplate.from_messages([("system", "Extract the person."), ("user", "{text}")])
    assert isinstance(llm.structured_predict(Person, chat_prompt, text=TEXT), Person)


def test_a_truncated_structured_answer_says_what_to_do(chat_decoder):
    short = HybridSpecLLM(decoder=chat_decoder, max_new_tokens=3)
    with pytest.raises(ValueError, match="raise max_new_tokens"):
        short.structured_predict(Person, PROMPT, text=TEXT)


@pytest.mark.parametrize("tool_required", [True, False])
def test_chat_with_tools(llm, tool_required):
    response = llm.chat_with_tools([ADD], user_msg="What is 2 + 3?", tool_required=tool_required)
    calls = llm.get_tool_calls_from_response(response, error_on_no_tool_call=False)
    if tool_required:
        assert len(calls) == 1 and calls[0].tool_name == "add"
        assert set(calls[0].tool_kwargs) == {"a", "b"} and all(0 <= v <= 9 for v in calls[0].tool_kwargs.values())
        assert not response.message.content
    else:  # a random model practically never writes `<tool_call>` by itself
        assert not calls and response.message.content
        with pytest.raises(ValueError, match="Expected a tool call"):
            llm.get_tool_calls_from_response(response)


def test_predict_and_call_runs_the_tool(llm):
    answer = llm.predict_and_call([ADD], user_msg="What is 2 + 3?", tool_choice="add")
    selection = answer.sources[0]
    assert selection.tool_name == "add"
    assert int(answer.response) == add(**selection.raw_input["kwargs"])


def test_streamed_tool_call(llm):
    responses = list(llm.stream_chat_with_tools([ADD], user_msg="What is 2 + 3?", tool_required=True))
    calls = llm.get_tool_calls_from_response(responses[-1])
    assert [c.tool_name for c in calls] == ["add"]
    assert all(not r.delta for r in responses[:-1])  # the call is not streamed as text


def test_tool_history_goes_back_to_the_model(llm, chat_decoder):
    history = [
        ChatMessage(role=MessageRole.USER, content="What is 1 + 2?"),
        ChatMessage(role=MessageRole.ASSISTANT,
                    blocks=[ToolCallBlock(tool_call_id="c1", tool_name="add", tool_kwargs={"a": 1, "b": 2})]),
        ChatMessage(role=MessageRole.TOOL, content="3", additional_kwargs={"tool_call_id": "c1"}),
    ]
    response = llm.chat_with_tools([ADD], chat_history=history, max_new_tokens=6)
    assert response.message.role == MessageRole.ASSISTANT


async def test_function_agent_calls_the_tool(llm):
    from llama_index.core.agent.workflow import FunctionAgent, ToolCallResult

    agent = FunctionAgent(tools=[ADD], llm=llm, initial_tool_choice="add")  # the first turn must call `add`
    handler = agent.run(user_msg="What is 2 + 3?")
    results = [event async for event in handler.stream_events() if isinstance(event, ToolCallResult)]
    await handler
    assert results and results[0].tool_name == "add"
    assert int(results[0].tool_output.content) == add(**results[0].tool_kwargs)
