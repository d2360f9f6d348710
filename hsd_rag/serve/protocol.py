"""The OpenAI wire format this server speaks: every request and response schema, in one file.

Requests accept the fields OpenAI clients (the `openai` SDK, LangChain `ChatOpenAI`, LlamaIndex `OpenAILike`)
send. A field we cannot honour is rejected with a 400 naming it rather than silently ignored (`n` > 1,
logprobs, tools, penalties); a field that only steers the client or billing (`user`, `store`, `metadata`...)
is accepted and ignored. Extensions, all optional: `documents` (texts that reach exactly this request's n-gram
index), `method` / `budget` (our decoding settings), `timeout` (a per-request deadline in seconds, capped by the
server's), `return_token_ids` (the generated token ids on each choice, for exact comparisons); every response
carries our decoding stats under `hsd_rag`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hsd_rag.config import Method

# ---- requests -------------------------------------------------------------------------------------------------

class StreamOptions(BaseModel):
    include_usage: bool = False
    """Send one more chunk before `[DONE]` with `usage` (and our stats) and no choices."""


class RequestBase(BaseModel):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    """Must name the served model (GET /v1/models) when given."""
    max_tokens: int | None = Field(None, gt=0)
    """Upper bound on generated tokens; the server's default when omitted."""
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    """0 = greedy (token-identical to HF generate); omitted = the server's default (OpenAI's is 1)."""
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    n: int = Field(1, ge=1)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None
    top_logprobs: int | None = None
    # extensions
    documents: list[str] | None = None
    """Texts to draft from, for this request only (the prompt is always drafted from as well)."""
    method: Method | None = None
    """Draft source(s): vanilla, ngram, eagle, hybrid, hybrid-fixed; omitted = the server's default."""
    budget: int | Literal["auto"] | None = None
    """Draft tokens verified per target forward, or "auto"; omitted = the server's default."""
    timeout: float | None = Field(None, gt=0)
    """Deadline for this request in seconds (queueing included); at most the server's own deadline."""
    return_token_ids: bool = False
    """Add the generated token ids to each choice (`token_ids`)."""

    # accepted so standard clients work, and ignored: they steer the client, routing or billing, not the tokens
    user: str | None = None
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, value):
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _only_what_we_honour(self):
        if self.n != 1:
            raise ValueError(f"n={self.n} is not supported: this server returns one choice per request (n=1).")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if value not in (None, 0, 0.0):
                raise ValueError(f"{name}={value} is not supported (only 0): it would change the target's output.")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported.")
        if self.logprobs not in (None, False, 0) or self.top_logprobs:
            raise ValueError("logprobs are not supported.")
        return self

    def stop_list(self) -> list[str] | None:
        return self.stop or None  # the validator made a string a list


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message; `developer` is OpenAI's newer name for `system`. Text only (no images, no tools)."""

    model_config = ConfigDict(extra="ignore")  # e.g. `name`, `refusal`: no meaning for a local chat template

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    @model_validator(mode="before")
    @classmethod
    def _no_tools(cls, value):
        if isinstance(value, dict):
            if value.get("role") in ("tool", "function"):
                raise ValueError(f"role {value['role']!r} needs tool calling, which this server does not support.")
            if value.get("tool_calls") or value.get("function_call"):
                raise ValueError("tool calls are not supported.")
        return value

    def as_template_message(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionRequest(RequestBase):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, gt=0)
    """OpenAI's newer name for max_tokens."""
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _chat_only_what_we_honour(self):
        if self.tools:
            raise ValueError("tools are not supported (this server has no tool calling).")
        if self.tool_choice not in (None, "none"):
            raise ValueError("tool_choice is not supported (this server has no tool calling).")
        if self.response_format and self.response_format.get("type") != "text":
            raise ValueError("response_format other than {'type': 'text'} is not supported.")
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise ValueError("give max_tokens or max_completion_tokens, not both with different values.")
            self.max_tokens = self.max_completion_tokens
        return self


class CompletionRequest(RequestBase):
    prompt: str | list[int] | list[str] = Field(...)
    """Text or token ids (a list of one string is accepted; several prompts per request are not)."""
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _completion_only_what_we_honour(self):
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            if len(self.prompt) != 1:
                raise ValueError("one prompt per request: send a string, token ids or a list of one string.")
            self.prompt = self.prompt[0]
        if self.echo:
            raise ValueError("echo is not supported.")
        if self.best_of not in (None, 1):
            raise ValueError("best_of is not supported (only 1).")
        if self.suffix:
            raise ValueError("suffix (insertion) is not supported.")
        return self


# ---- responses ------------------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def unix_time() -> int:
    return int(time.time())


FinishReason = Literal["stop", "length"]


class DecodingStats(BaseModel):
    """What speculative decoding did for this request (the `hsd_rag` field of every response)."""

    method: str
    tau: float = Field(description="tokens per target forward (accepted drafts + 1)")
    steps: int = Field(description="target forwards after the prefill")
    accepted_by_source: dict[str, int]
    drafted_by_source: dict[str, int]
    stop_reason: str = Field(description="eos, length, stop_string or context_window")
    tokens_per_s: float = Field(description="decode throughput of this generation, prefill excluded")
    queue_s: float = Field(description="time spent waiting for the engine")
    generation_s: float = Field(description="time the engine spent on this request")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    hsd_rag: DecodingStats | None = None
    """The same stats as the response's `hsd_rag`, repeated here for clients that keep only `usage`
    (LangChain's ChatOpenAI puts it in response_metadata["token_usage"])."""


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatResponseMessage
    finish_reason: FinishReason
    logprobs: None = None
    token_ids: list[int] | None = None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: new_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=unix_time)
    model: str
    choices: list[ChatChoice]
    usage: Usage
    hsd_rag: DecodingStats


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    finish_reason: FinishReason | None = None
    logprobs: None = None
    token_ids: list[int] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    hsd_rag: DecodingStats | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: FinishReason | None = None
    logprobs: None = None
    token_ids: list[int] | None = None


class CompletionResponse(BaseModel):
    """Both the whole response and, with `stream`, each chunk (OpenAI uses one schema for both)."""

    id: str = Field(default_factory=lambda: new_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=unix_time)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    hsd_rag: DecodingStats | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=unix_time)
    owned_by: str = "hsd-rag"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error body: {"error": {"message", "type", "param", "code"}}."""

    error: ErrorInfo
