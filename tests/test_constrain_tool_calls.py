"""Tool calls as constrained text: choosing tools, the grammar, parsing, streaming and prompt rendering."""

from __future__ import annotations

import json

import pytest

from hsd_rag.constrain import tool_calls
from hsd_rag.constrain.formats import to_response_format

ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers.",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                       "required": ["a", "b"]},
    },
}
NOW = {"type": "function", "function": {"name": "now", "description": "The time.", "parameters": {}}}
CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'


@pytest.mark.parametrize(
    ("choice", "names", "required"),
    [
        (None, ["add", "now"], False),
        ("auto", ["add", "now"], False),
        ("none", [], False),
        ("any", ["add", "now"], True),
        ("required", ["add", "now"], True),
        (True, ["add", "now"], True),
        ("now", ["now"], True),
        ({"type": "function", "function": {"name": "add"}}, ["add"], True),
    ],
)
def test_choose_tools(choice, names, required):
    chosen, must_call = tool_calls.choose_tools([ADD, NOW], choice)
    assert [tool_calls.tool_name(t) for t in chosen] == names
    assert must_call is required


def test_unknown_tool_choice_names_the_bound_tools():
    with pytest.raises(ValueError, match="names no bound tool.*add, now"):
        tool_calls.choose_tools([ADD, NOW], "multiply")


def test_formats_per_choice():
    assert tool_calls.tool_call_format([ADD], "none") is None
    auto = tool_calls.tool_call_format([ADD, NOW], "auto").format
    assert auto["type"] == "triggered_tags" and auto["triggers"] == ["<tool_call>"]
    forced = tool_calls.tool_call_format([ADD, NOW], "now").format
    assert forced["type"] == "tags_with_separator" and forced["at_least_one"] and forced["stop_after_first"]
    assert [t["begin"] for t in forced["tags"]] == ['<tool_call>\n{"name": "now", "arguments": ']
    assert forced["tags"][0]["content"]["json_schema"] == tool_calls.NO_ARGUMENTS  # no parameters: {}
    parallel = tool_calls.tool_call_format([ADD], "any", parallel_tool_calls=True).format
    assert parallel["stop_after_first"] is False
    assert to_response_format(tool_calls.tool_call_format([ADD], "any").model_dump()).type == "structural_tag"


def test_parse_tool_calls():
    content, calls, invalid = tool_calls.parse_tool_calls(f"Let me add.\n{CALL}\n")
    assert content == "Let me add."
    assert [(c.name, c.arguments) for c in calls] == [("add", {"a": 1, "b": 2})]
    assert calls[0].id.startswith("call_") and not invalid
    content, calls, invalid = tool_calls.parse_tool_calls("<tool_call>\n{not json}\n</tool_call>")
    assert not calls and invalid and invalid[0][0] == "{not json}"
    assert tool_calls.parse_tool_calls("no calls  ") == ("no calls  ", [], [])
    content, calls, invalid = tool_calls.parse_tool_calls(f'{CALL}\n<tool_call>\n{{"name": "add", "argu')
    assert content == "" and len(calls) == 1
    assert invalid == [('{"name": "add", "argu', "the generation ended inside this tool call (raise max_new_tokens)")]


def test_splitter_streams_text_and_holds_back_calls():
    splitter = tool_calls.ToolCallSplitter()
    pieces = ["Sure", ", I will", " add. <", "tool", "_call>\n", '{"name": "add", "arguments": {"a": 1, "b": 2}}',
              "\n</tool_call>"]
    streamed = "".join(splitter.feed(p) for p in pieces)
    assert streamed == "Sure, I will add. "
    rest, calls, invalid = splitter.finish()
    assert rest == "" and [c.name for c in calls] == ["add"] and not invalid


def test_splitter_releases_a_held_back_prefix_that_was_not_a_call():
    splitter = tool_calls.ToolCallSplitter()
    assert splitter.feed("a <to") == "a "
    assert splitter.feed("p> b") == "<top> b"
    assert splitter.finish() == ("", [], [])
    splitter = tool_calls.ToolCallSplitter()
    assert splitter.feed("x <tool") == "x "
    assert splitter.finish() == ("<tool", [], [])  # ended mid-prefix: the text is content after all


class TemplateTokenizer:
    """Just enough of a tokenizer to see what the chat template receives."""

    def __init__(self, template: str):
        self.chat_template = template
        self.seen: dict = {}

    def apply_chat_template(self, messages, **kwargs):
        self.seen = {"messages": messages, **kwargs}
        return [1, 2, 3]


def test_templates_without_tools_get_them_inline():
    tokenizer = TemplateTokenizer("{% for message in messages %}{{ message['content'] }}{% endfor %}")
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "1 + 2?"},
        {"role": "assistant", "content": "", "tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 2}, "id": "c1"}]},
        {"role": "tool", "content": "3", "name": "add", "tool_call_id": "c1"},
    ]
    assert tool_calls.encode_chat_with_tools(tokenizer, history, [ADD]) == [1, 2, 3]
    sent = tokenizer.seen["messages"]
    assert "tools" not in tokenizer.seen
    assert sent[0]["role"] == "system" and sent[0]["content"].startswith("Be brief.")
    assert json.dumps(ADD) in sent[0]["content"] and "<tool_call>" in sent[0]["content"]
    assert sent[2] == {"role": "assistant", "content": CALL}
    assert sent[3] == {"role": "user", "content": "<tool_response>\n3\n</tool_response>"}


def test_templates_with_tools_render_them_themselves():
    tokenizer = TemplateTokenizer("{% if tools %}{{ tools | tojson }}{% endif %}{% for m in messages %}{% endfor %}")
    history = [
        {"role": "user", "content": "1 + 2?"},
        {"role": "assistant", "content": "", "tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 2}, "id": "c1"}]},
        {"role": "tool", "content": "3", "name": "add", "tool_call_id": "c1"},
    ]
    tool_calls.encode_chat_with_tools(tokenizer, history, [ADD])
    assert tokenizer.seen["tools"] == [ADD]
    sent = tokenizer.seen["messages"]
    assert sent[1]["tool_calls"] == [{"type": "function", "id": "c1",
                                      "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]
    assert sent[2]["role"] == "tool"
