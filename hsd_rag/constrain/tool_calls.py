"""Tool calls as constrained text: tools into the prompt, a grammar for the call, the call parsed back out.

Framework-free: the LangChain and LlamaIndex adapters translate their own tool and message types into the
OpenAI shapes used here (`{"type": "function", "function": {"name", "description", "parameters"}}`).

A call is written in the Hermes format that Qwen2/2.5/3, Hermes and SmolLM3 chat templates use:

    <tool_call>
    {"name": "get_weather", "arguments": {"location": "Paris"}}
    </tool_call>

and the arguments are constrained to the tool's JSON schema (an xgrammar structural tag), so a parsed call
always names a bound tool and always has valid arguments. Templates that accept `tools=` render the tools
themselves; for others (e.g. SmolLM2's) the tools are described in a system message in the same Hermes style,
past calls are written back as `<tool_call>` blocks and tool results as `<tool_response>` blocks.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hsd_rag.constrain.formats import StructuralTag

CALL_TRIGGER = "<tool_call>"
CALL_BEGIN = "<tool_call>\n"
CALL_END = "\n</tool_call>"
CALL_SEPARATOR = "\n"
CALL_PATTERN = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
ARGUMENT_WHITESPACE = 1  # at most one whitespace character in a row inside the arguments: no endless newlines
NO_ARGUMENTS = {"type": "object", "properties": {}}

ToolChoice = str | dict | bool | None  # "auto", "none", "any"/"required"/True, a tool name, or OpenAI's dict

TOOLS_SYSTEM_PROMPT = (
    "You may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within <tool_call></tool_call> "
    'XML tags:\n<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


@dataclass
class ToolCall:
    """A parsed call: the tool's name, its arguments and an id to pair it with the tool's result."""

    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:16]}")


def tool_name(tool: dict) -> str:
    return tool["function"]["name"]


def choose_tools(tools: Sequence[dict], tool_choice: ToolChoice) -> tuple[list[dict], bool]:
    """(tools the call may use, whether a call is required) for a tool_choice; None means "auto".

    "none" returns no tools; "any" / "required" / True require a call to any tool; a tool's name (or OpenAI's
    `{"type": "function", "function": {"name": ...}}`) requires that tool.
    """
    if tool_choice in (None, "auto"):
        return list(tools), False
    if tool_choice == "none" or tool_choice is False:
        return [], False
    if tool_choice in ("any", "required") or tool_choice is True:
        return list(tools), True
    if isinstance(tool_choice, dict):
        tool_choice = tool_choice.get("function", {}).get("name") or tool_choice.get("name")
    chosen = [t for t in tools if tool_name(t) == tool_choice]
    if not chosen:
        raise ValueError(
            f"tool_choice={tool_choice!r} names no bound tool; bound tools: {', '.join(map(tool_name, tools))}."
        )
    return chosen, True


def tool_call_format(
    tools: Sequence[dict], tool_choice: ToolChoice = None, parallel_tool_calls: bool = False
) -> StructuralTag | None:
    """The response format for a turn with tools: free text with constrained calls, or calls only.

    Auto: any text; once the model writes `<tool_call>` the call must name a tool and match its schema.
    Required / named: the output is the call(s) and nothing else. One call per turn unless `parallel_tool_calls`.
    None when no tool may be called (tool_choice "none", or no tools).
    """
    allowed, required = choose_tools(tools, tool_choice)
    if not allowed:
        return None
    tags = [_call_tag(tool) for tool in allowed]
    if required:
        fmt = {"type": "tags_with_separator", "tags": tags, "separator": CALL_SEPARATOR, "at_least_one": True,
               "stop_after_first": not parallel_tool_calls}
    else:
        fmt = {"type": "triggered_tags", "triggers": [CALL_TRIGGER], "tags": tags,
               "stop_after_first": not parallel_tool_calls}
    return StructuralTag(format=fmt)


def _call_tag(tool: dict) -> dict:
    parameters = tool["function"].get("parameters") or NO_ARGUMENTS
    begin = CALL_BEGIN + '{"name": ' + json.dumps(tool_name(tool), ensure_ascii=False) + ', "arguments": '
    return {
        "type": "tag",
        "begin": begin,
        "content": {"type": "json_schema", "json_schema": parameters, "max_whitespace_cnt": ARGUMENT_WHITESPACE},
        "end": "}" + CALL_END,
    }


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall], list[tuple[str, str]]]:
    """Generated text -> (text outside the calls, parsed calls, [(raw call, error)] for unparsable ones).

    A call the generation stopped inside (max_new_tokens reached before `</tool_call>`) is reported as
    unparsable, never as content.
    """
    calls, invalid = [], []
    for raw in CALL_PATTERN.findall(text):
        try:
            data = json.loads(raw)
            calls.append(ToolCall(name=str(data["name"]), arguments=dict(data.get("arguments") or {})))
        except (ValueError, KeyError, TypeError) as error:
            invalid.append((raw, f"{type(error).__name__}: {error}"))
    content = CALL_PATTERN.sub("", text)
    unterminated = content.find(CALL_TRIGGER)
    if unterminated >= 0:
        raw = content[unterminated + len(CALL_TRIGGER) :].strip()
        invalid.append((raw, "the generation ended inside this tool call (raise max_new_tokens)"))
        content = content[:unterminated]
    if calls or invalid:
        content = content.strip()
    return content, calls, invalid


class ToolCallSplitter:
    """Streams the text before a tool call, holds back anything that may be the start of one."""

    def __init__(self):
        self.text = ""
        self.emitted = 0
        self.in_call = False

    def feed(self, piece: str) -> str:
        """Add generated text; returns the text that is safe to stream as content now."""
        self.text += piece
        if self.in_call:
            return ""
        start = self.text.find(CALL_TRIGGER, self.emitted)
        if start >= 0:
            self.in_call = True
            safe = start
        else:  # hold back a tail that could still grow into the trigger
            safe = len(self.text)
            for keep in range(min(len(CALL_TRIGGER) - 1, len(self.text) - self.emitted), 0, -1):
                if CALL_TRIGGER.startswith(self.text[-keep:]):
                    safe = len(self.text) - keep
                    break
        out = self.text[self.emitted : safe]
        self.emitted = max(self.emitted, safe)
        return out

    def finish(self) -> tuple[str, list[ToolCall], list[tuple[str, str]]]:
        """(content not streamed yet, calls, invalid calls) once generation has ended."""
        if not self.in_call:
            rest = self.text[self.emitted :]
            self.emitted = len(self.text)
            return rest, [], []
        content, calls, invalid = parse_tool_calls(self.text[self.emitted :])
        return content, calls, invalid


# ---- the prompt ---------------------------------------------------------------------------------------------


def prepare_request(
    tokenizer,
    chat: Sequence[dict],
    tools: Sequence[dict] | None = None,
    tool_choice: ToolChoice = None,
    parallel_tool_calls: bool = False,
    response_format: Any = None,
) -> tuple[Sequence[dict] | list[int], Any, bool]:
    """What both adapters send the decoder: (prompt, response format or None, whether to parse tool calls).

    The prompt stays chat messages unless tools are bound or the history holds tool calls or results: then it
    is token ids from `encode_chat_with_tools` (the decoder's own chat encoding knows no tools).
    """
    tools = list(tools or [])
    call_format = tool_call_format(tools, tool_choice, parallel_tool_calls)
    if call_format is not None and response_format is not None:
        raise ValueError("Bind tools or pass a response_format, not both.")
    if tools or any(m.get("tool_calls") or m["role"] == "tool" for m in chat):
        prompt = encode_chat_with_tools(tokenizer, chat, tools)
    else:
        prompt = chat
    return prompt, call_format or response_format, call_format is not None


def parses_tool_calls(tools: Sequence[dict] | None, tool_choice: ToolChoice = None) -> bool:
    """Whether a call with these tools and tool_choice may produce tool calls (the output is then parsed)."""
    return bool(tools) and bool(choose_tools(tools, tool_choice)[0])


def template_renders_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template uses the `tools` it is given (else they would be dropped silently)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("tool_use") or template.get("default") or ""
    return bool(template) and "tools" in template


def tools_system_prompt(tools: Sequence[dict]) -> str:
    return TOOLS_SYSTEM_PROMPT.format(tools="\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools))


def render_call(call: dict) -> str:
    """An assistant's past call ({"name", "arguments"}) in the generated form."""
    body = json.dumps({"name": call["name"], "arguments": call.get("arguments") or {}}, ensure_ascii=False)
    return CALL_BEGIN + body + CALL_END


def encode_chat_with_tools(tokenizer, messages: Sequence[dict], tools: Sequence[dict]) -> list[int]:
    """Chat messages (OpenAI/HF shapes: assistant `tool_calls`, role "tool") and tools -> prompt token ids.

    Assistant tool calls are `{"name", "arguments", "id"}` dicts under "tool_calls"; tool results are
    `{"role": "tool", "content", "name", "tool_call_id"}`.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("This tokenizer has no chat template: tool calling needs one to build the prompt.")
    if template_renders_tools(tokenizer):
        hf_messages = [_hf_message(m) for m in messages]
        kwargs = {"tools": list(tools)} if tools else {}
    else:
        hf_messages = _inline_tools(messages, tools)
        kwargs = {}
    ids = tokenizer.apply_chat_template(
        hf_messages, add_generation_prompt=True, tokenize=True, return_dict=False, **kwargs
    )
    return [int(t) for t in ids]


def _hf_message(message: dict) -> dict:
    """transformers' chat-template shape for tool calls: [{"type": "function", "function": {...}}]."""
    if message.get("tool_calls"):
        calls = [
            {"type": "function", "id": c.get("id"), "function": {"name": c["name"], "arguments": c.get("arguments") or {}}}
            for c in message["tool_calls"]
        ]
        return {**message, "content": message.get("content") or "", "tool_calls": calls}
    return message


def _inline_tools(messages: Sequence[dict], tools: Sequence[dict]) -> list[dict]:
    """For templates without tool support: tools in the system message, calls and results as text."""
    out: list[dict] = []
    for message in messages:
        role, content = message["role"], message.get("content") or ""
        if role == "assistant" and message.get("tool_calls"):
            calls = "\n".join(render_call(c) for c in message["tool_calls"])
            out.append({"role": "assistant", "content": f"{content}\n{calls}" if content else calls})
        elif role == "tool":
            response = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1]["content"].startswith("<tool_response>"):
                out[-1] = {"role": "user", "content": out[-1]["content"] + "\n" + response}  # parallel results
            else:
                out.append({"role": "user", "content": response})
        else:
            out.append({"role": role, "content": content})
    if tools:
        system = tools_system_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + system}
        else:
            out.insert(0, {"role": "system", "content": system})
    return out
