"""HybridSpecLLM: the speculative decoder as a LlamaIndex LLM (a thin adapter, no decoding logic here).

    from hsd_rag.llama_index import HybridSpecLLM
    from hsd_rag.retrieval.llama_index_retriever import build_query_engine

    llm = HybridSpecLLM(decoder=my_decoder)          # or HybridSpecLLM(): the embedded SmolLM2-135M, lazily
    llm = HybridSpecLLM(model="org/name", head=None, device="cuda")   # or a dir / .gguf, loaded on first use
    llm = HybridSpecLLM.from_model_id("org/name")   # the same, loaded now
    engine = build_query_engine(folder_index, llm=llm)

Documents for drafting: the n-gram drafter indexes the whole prompt, so the chunks a query engine puts into its
prompt are drafted from automatically. Extra chunks can be passed per call, `llm.chat(messages,
documents=[...])` or `llm.complete(prompt, documents=[...])` (strings, nodes or Documents); each generation
builds its own drafter, so concurrent requests never draft from each other's chunks.

Structured output and tools: `structured_predict` / `as_structured_llm` and function calling (`chat_with_tools`,
`predict_and_call`, `FunctionAgent`) decode under a grammar (hsd_rag.constrain), still losslessly; see the class.

Stats: `response.raw` is an OpenAI-shaped dict, {"model", "usage": {"prompt_tokens", "completion_tokens",
"total_tokens"}, "finish_reason", "hsd_rag_stats": every GenerationStats field}, so LlamaIndex's own
`TokenCountingHandler` counts exactly the tokens the model read and wrote; `response.additional_kwargs`
holds finish_reason, tau, steps, accepted_by_source, usage and "hsd_rag_stats" too. When streaming, both
arrive on the last response. A query engine returns only text: read them from the LLM's chat end event with a
LlamaIndex instrumentation handler (`LLMChatEndEvent.response.raw`), or from a handler in
`Settings.callback_manager` (a query engine's synthesizer replaces the LLM's own callback manager with it).

Tokens: `llm.tokenizer` is the model's own tokenizer as LlamaIndex's tokenizer hook wants it (`str -> ids`):
`Settings.tokenizer = llm.tokenizer` makes prompt fitting and token counting exact. `timeout=` (a field, or
per call) is a real generation deadline (finish_reason "timeout"); `api_key` is refused: a local model has
none.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

from pydantic import Field, PrivateAttr, model_validator

from hsd_rag.constrain import tool_calls
from hsd_rag.constrain.formats import JsonSchema
from hsd_rag.decoder import HybridSpecDecoder
from hsd_rag.integrations_common import (
    API_KEY_MESSAGE,
    DOCUMENTS_KEY,
    GENERATION_KWARGS,
    INSTALL_HINT,
    DeadlineStream,
    ModelFields,
    SamplingFields,
    call_timeout,
    check_model_source,
    config_default,
    decoder_for,
    document_texts,
    generate_in_thread,
    iterate_in_thread,
    model_name,
    pop_structure,
    raw_response,
    result_metadata,
    split_call_kwargs,
    structured_request,
)
from hsd_rag.stats import GenerationResult

try:
    from llama_index.core.base.llms.types import TextBlock, ToolCallBlock
    from llama_index.core.instrumentation import get_dispatcher
    from llama_index.core.instrumentation.events.llm import (
        LLMStructuredPredictEndEvent,
        LLMStructuredPredictInProgressEvent,
        LLMStructuredPredictStartEvent,
    )
    from llama_index.core.llms import (
        ChatMessage,
        ChatResponse,
        ChatResponseAsyncGen,
        ChatResponseGen,
        CompletionResponse,
        CompletionResponseAsyncGen,
        CompletionResponseGen,
        CustomLLM,
        LLMMetadata,
        MessageRole,
    )
    from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
    from llama_index.core.llms.function_calling import FunctionCallingLLM
    from llama_index.core.llms.llm import ToolSelection
    from llama_index.core.program.streaming_utils import process_streaming_content_incremental
    from llama_index.core.types import PydanticProgramMode
except ImportError as error:
    raise ImportError(
        f"hsd_rag.llama_index needs the optional package `llama-index-core`: `pip install llama-index-core` "
        f"(or `{INSTALL_HINT}`)."
    ) from error

ADAPTER = "HybridSpecLLM"
dispatcher = get_dispatcher(__name__)
DEFAULT_CONTEXT_WINDOW = 2048  # reported only for models whose config names no max_position_embeddings
ROLES = {
    MessageRole.SYSTEM: "system",
    MessageRole.DEVELOPER: "system",
    MessageRole.USER: "user",
    MessageRole.ASSISTANT: "assistant",
    MessageRole.CHATBOT: "assistant",
    MessageRole.MODEL: "assistant",
    MessageRole.TOOL: "tool",
}


def to_chat_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """LlamaIndex messages -> chat-template dicts: {"role", "content"}, plus assistant tool calls and tool results.

    An assistant's calls are read from its ToolCallBlocks (or OpenAI-style `additional_kwargs["tool_calls"]`);
    a tool message's call id from `additional_kwargs["tool_call_id"]`, as LlamaIndex's agents write them.
    """
    if not messages:
        raise ValueError(
            f"{ADAPTER} got no messages: pass at least one, e.g. a user message with the question."
        )
    out = []
    for message in messages:
        if message.role not in ROLES:
            raise ValueError(
                f"{ADAPTER} supports system, user, assistant and tool messages, got role {message.role.value!r}."
            )
        if any(not isinstance(block, TextBlock | ToolCallBlock) for block in message.blocks):
            raise ValueError(
                f"{ADAPTER} takes text only; a {message.role.value} message held non-text content."
            )
        entry: dict[str, Any] = {"role": ROLES[message.role], "content": message.content or ""}
        calls = _message_tool_calls(message)
        if calls:
            entry["tool_calls"] = calls
        if message.role == MessageRole.TOOL:
            entry.update({k: message.additional_kwargs[k] for k in ("tool_call_id", "name") if k in message.additional_kwargs})
        out.append(entry)
    return out


def _message_tool_calls(message: ChatMessage) -> list[dict[str, Any]]:
    calls = [
        {"name": b.tool_name, "arguments": _arguments(b.tool_kwargs), "id": b.tool_call_id}
        for b in message.blocks
        if isinstance(b, ToolCallBlock)
    ]
    for call in message.additional_kwargs.get("tool_calls") or []:  # OpenAI shape, or this adapter's own
        function = call.get("function", call) if isinstance(call, dict) else {}
        if "name" in function:
            calls.append({"name": function["name"], "arguments": _arguments(function.get("arguments")),
                          "id": call.get("id")})
    return calls


def _arguments(value: Any) -> dict[str, Any]:
    """Tool arguments as a dict, whether given as a dict or as a JSON string."""
    if isinstance(value, str):
        try:
            value = json.loads(value or "{}")
        except ValueError:
            return {}
    return dict(value or {})


class HybridSpecLLM(SamplingFields, ModelFields, CustomLLM, FunctionCallingLLM):
    """A local Hugging Face chat model decoded by HybridSpecDecoder: same output as plain decoding, faster.

    The model: `decoder` (already loaded) or `model=` / `head=` / `device=` / `dtype=` (loaded on first use).
    Chat messages go through the tokenizer's chat template; a completion prompt is sent as one user message
    (after a system message when `system_prompt` is set and the prompt is not `formatted`). Generation settings
    are fields and can be overridden per call; `documents=[...]` adds texts to draft from, `timeout=` sets a
    deadline.

    Structured output (`structured_predict`, `as_structured_llm`) and function calling (`chat_with_tools`,
    agents) run through the same lossless constrained decoding (`hsd_rag.constrain`): the output is what the
    model decodes alone under the constraint, so it always parses. Tools are rendered by the chat template
    when it takes `tools=`; otherwise (SmolLM2's template has no tool support) they are described in a
    Hermes-style system message and the grammar makes every call well-formed, which is why every chat model
    counts as a function-calling model here. Whether it picks the right tool is up to the model.
    """

    max_new_tokens: int = Field(
        default=config_default("max_new_tokens"), gt=0, description="Upper bound on generated tokens."
    )
    stop: list[str] | None = Field(
        default=None, description="Stop strings: the answer ends before the first one."
    )

    _decoder: HybridSpecDecoder | None = PrivateAttr(default=None)

    def __init__(self, decoder: HybridSpecDecoder | None = None, **kwargs: Any):
        """`decoder`: an already-loaded decoder to share; None loads the model of the fields on first use."""
        if decoder is not None and kwargs.get("model") is not None:
            raise ValueError(f"{ADAPTER}: pass either decoder (loaded) or model= (to load), not both.")
        super().__init__(**kwargs)
        self._decoder = decoder

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_arguments(cls, values: Any) -> Any:
        """A misspelt setting fails loudly instead of being silently ignored; so does a credential."""
        if isinstance(values, dict):
            if "api_key" in values:
                raise ValueError(API_KEY_MESSAGE.format(adapter=ADAPTER))
            unknown = sorted(set(values) - set(cls.model_fields))
            if unknown:
                raise ValueError(f"{ADAPTER} got unknown argument(s) {', '.join(unknown)}.")
            check_model_source(values.get("model"), ADAPTER)
        return values

    @classmethod
    def class_name(cls) -> str:
        return "HybridSpecLLM"

    @property
    def decoder(self) -> HybridSpecDecoder:
        """The decoder (a model chosen by the fields is loaded here, on first use, and shared)."""
        return self._decoder if self._decoder is not None else decoder_for(self)

    @property
    def tokenizer(self) -> Callable[[str], list[int]]:
        """The model's tokenizer as LlamaIndex's hook wants it: `Settings.tokenizer = llm.tokenizer`, or
        `TokenCountingHandler(tokenizer=llm.tokenizer)`. Text in, token ids out, no special tokens added."""
        tokenizer = self.decoder.tokenizer
        return lambda text: tokenizer(text, add_special_tokens=False).input_ids

    @property
    def metadata(self) -> LLMMetadata:
        decoder = self.decoder
        return LLMMetadata(
            context_window=decoder.context_window or DEFAULT_CONTEXT_WINDOW,
            num_output=self.max_new_tokens,
            is_chat_model=True,
            is_function_calling_model=getattr(decoder.tokenizer, "chat_template", None) is not None,
            model_name=model_name(decoder),
        )

    # ---- completion: one user message through the chat template -------------------------------------------

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return self._completion(self._generate(self._completion_messages(prompt, formatted), kwargs))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        stream = self._start(self._completion_messages(prompt, formatted), kwargs)  # bad kwargs fail here
        return self._responses(stream, self._completion_piece)

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        messages = self._completion_messages(prompt, formatted)
        return self._completion(await generate_in_thread(lambda: self._start(messages, kwargs)))

    @llm_completion_callback()
    async def astream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseAsyncGen:
        stream = self._start(self._completion_messages(prompt, formatted), kwargs)
        return iterate_in_thread(lambda: self._responses(stream, self._completion_piece))

    # ---- chat ------------------------------------------------------------------------------------------------

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return self._chat(self._generate(messages, kwargs), _parses_tool_calls(kwargs))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        stream = self._start(messages, kwargs)
        return self._responses(stream, self._chat_piece, _parses_tool_calls(kwargs))

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        parses_calls = _parses_tool_calls(kwargs)
        return self._chat(await generate_in_thread(lambda: self._start(messages, kwargs)), parses_calls)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        stream = self._start(messages, kwargs)
        parses_calls = _parses_tool_calls(kwargs)
        return iterate_in_thread(lambda: self._responses(stream, self._chat_piece, parses_calls))

    # ---- function calling (FunctionCallingLLM) ------------------------------------------------------------

    def _prepare_chat_with_tools(
        self,
        tools: Sequence[Any],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        tool_choice: str | dict | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """chat() arguments for a turn with tools: the calls are constrained to each tool's schema.

        tool_choice: "auto" (default; "required" when `tool_required`), "none", or a tool's name.
        """
        messages = list(chat_history or [])
        if user_msg is not None:
            messages.append(ChatMessage(role=MessageRole.USER, content=user_msg) if isinstance(user_msg, str)
                            else user_msg)
        return {
            "messages": messages,
            "tools": [tool.metadata.to_openai_tool() for tool in tools],
            "tool_choice": tool_choice or ("required" if tool_required else "auto"),
            "parallel_tool_calls": allow_parallel_tool_calls,
            **kwargs,
        }

    def get_tool_calls_from_response(
        self, response: ChatResponse, error_on_no_tool_call: bool = True, **kwargs: Any
    ) -> list[ToolSelection]:
        calls = [
            ToolSelection(tool_id=block.tool_call_id or "", tool_name=block.tool_name,
                          tool_kwargs=_arguments(block.tool_kwargs))
            for block in response.message.blocks
            if isinstance(block, ToolCallBlock)
        ]
        if not calls and error_on_no_tool_call:
            raise ValueError(f"Expected a tool call, but the model answered: {response.message.content!r}")
        return calls

    # ---- structured output: constrained to the output class's JSON schema ----------------------------------

    def structured_predict(
        self, output_cls: type, prompt: Any, llm_kwargs: dict[str, Any] | None = None, **prompt_args: Any
    ) -> Any:
        """The output class filled in by a decode constrained to its JSON schema (always parses unless cut short).

        Set `pydantic_program_mode` to anything but DEFAULT for LlamaIndex's prompt-based programs instead.
        """
        if self.pydantic_program_mode != PydanticProgramMode.DEFAULT:
            return super().structured_predict(output_cls, prompt, llm_kwargs, **prompt_args)
        messages, kwargs = self._structured_call(output_cls, prompt, llm_kwargs, prompt_args)
        response = self.chat(messages, **kwargs)
        return self._structured_result(output_cls, response)

    async def astructured_predict(
        self, output_cls: type, prompt: Any, llm_kwargs: dict[str, Any] | None = None, **prompt_args: Any
    ) -> Any:
        if self.pydantic_program_mode != PydanticProgramMode.DEFAULT:
            return await super().astructured_predict(output_cls, prompt, llm_kwargs, **prompt_args)
        messages, kwargs = self._structured_call(output_cls, prompt, llm_kwargs, prompt_args)
        response = await self.achat(messages, **kwargs)
        return self._structured_result(output_cls, response)

    def stream_structured_predict(
        self, output_cls: type, prompt: Any, llm_kwargs: dict[str, Any] | None = None, **prompt_args: Any
    ) -> Iterator[Any]:
        """Partial objects as the constrained JSON grows (LlamaIndex's own incremental parser), then the whole."""
        if self.pydantic_program_mode != PydanticProgramMode.DEFAULT:
            return super().stream_structured_predict(output_cls, prompt, llm_kwargs, **prompt_args)
        messages, kwargs = self._structured_call(output_cls, prompt, llm_kwargs, prompt_args)
        return self._partial_objects(output_cls, self.stream_chat(messages, **kwargs))

    async def astream_structured_predict(
        self, output_cls: type, prompt: Any, llm_kwargs: dict[str, Any] | None = None, **prompt_args: Any
    ) -> AsyncIterator[Any]:
        if self.pydantic_program_mode != PydanticProgramMode.DEFAULT:
            return await super().astream_structured_predict(output_cls, prompt, llm_kwargs, **prompt_args)
        messages, kwargs = self._structured_call(output_cls, prompt, llm_kwargs, prompt_args)
        responses = await self.astream_chat(messages, **kwargs)

        async def partial_objects():
            current = None
            async for response in responses:
                current = process_streaming_content_incremental(response, output_cls, current)
                dispatcher.event(LLMStructuredPredictInProgressEvent(output=current))
                yield current
            dispatcher.event(LLMStructuredPredictEndEvent(output=current))

        return partial_objects()

    def _structured_call(self, output_cls, prompt, llm_kwargs, prompt_args) -> tuple[list[ChatMessage], dict]:
        dispatcher.event(
            LLMStructuredPredictStartEvent(output_cls=output_cls, template=prompt, template_args=prompt_args)
        )
        messages = prompt.format_messages(llm=self, **prompt_args)
        schema = JsonSchema(json_schema=output_cls.model_json_schema())
        return messages, {**(llm_kwargs or {}), "response_format": schema}

    @staticmethod
    def _structured_result(output_cls: type, response: ChatResponse) -> Any:
        text = response.message.content or ""
        if response.additional_kwargs.get("finish_reason") == "length":
            raise ValueError(
                f"The structured answer was cut at max_new_tokens before it was complete ({text[:60]!r}...): "
                "raise max_new_tokens."
            )
        result = output_cls.model_validate_json(text)
        dispatcher.event(LLMStructuredPredictEndEvent(output=result))
        return result

    @staticmethod
    def _partial_objects(output_cls: type, responses: Iterator[ChatResponse]) -> Iterator[Any]:
        current = None
        for response in responses:
            current = process_streaming_content_incremental(response, output_cls, current)
            dispatcher.event(LLMStructuredPredictInProgressEvent(output=current))
            yield current
        dispatcher.event(LLMStructuredPredictEndEvent(output=current))

    # ---- translation -----------------------------------------------------------------------------------------

    def _completion_messages(self, prompt: str, formatted: bool) -> list[ChatMessage]:
        messages = [ChatMessage(role=MessageRole.USER, content=prompt)]
        if self.system_prompt and not formatted:
            messages.insert(0, ChatMessage(role=MessageRole.SYSTEM, content=self.system_prompt))
        return messages

    def _start(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> DeadlineStream:
        """Validate the call and open the decoder's token stream (no model work until it is iterated)."""
        kwargs = dict(kwargs)
        timeout = call_timeout(kwargs, self.timeout, ADAPTER)
        structure = pop_structure(kwargs)
        overrides, documents = split_call_kwargs(kwargs, ADAPTER)
        settings = {name: getattr(self, name) for name in GENERATION_KWARGS}
        if settings["method"] is None:
            del settings["method"]  # the decoder's default_method decides
        settings.update(overrides)
        if self.stop:
            settings["stop"] = list(self.stop)
        carried = [text for m in messages for text in document_texts(m.additional_kwargs.get(DOCUMENTS_KEY))]
        decoder = self.decoder
        prompt, _ = structured_request(decoder.tokenizer, to_chat_messages(messages), structure, settings)
        stream = decoder.stream_tokens(prompt, carried + document_texts(documents), **settings)
        return DeadlineStream(stream, timeout, lambda: len(decoder.encode_prompt(prompt)))

    def _generate(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> GenerationResult:
        stream = self._start(messages, kwargs)
        for _ in stream:
            pass
        return stream.result

    def _metadata(self, result: GenerationResult) -> dict[str, Any]:
        return result_metadata(result, model_name(self.decoder))

    def _raw(self, result: GenerationResult) -> dict[str, Any]:
        return raw_response(result, model_name(self.decoder))

    def _completion(self, result: GenerationResult) -> CompletionResponse:
        return CompletionResponse(
            text=result.text, raw=self._raw(result), additional_kwargs=self._metadata(result)
        )

    def _chat(self, result: GenerationResult, parses_calls: bool = False) -> ChatResponse:
        if parses_calls:
            content, calls, _ = tool_calls.parse_tool_calls(result.text)
            message = _assistant_message(content, calls)
        else:
            message = ChatMessage(role=MessageRole.ASSISTANT, content=result.text)
        return ChatResponse(message=message, raw=self._raw(result), additional_kwargs=self._metadata(result))

    @staticmethod
    def _completion_piece(text: str, delta: str) -> CompletionResponse:
        return CompletionResponse(text=text, delta=delta)

    @staticmethod
    def _chat_piece(text: str, delta: str) -> ChatResponse:
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=delta)

    def _responses(
        self, stream: DeadlineStream, piece: Callable[[str, str], Any], parses_calls: bool = False
    ) -> Iterator[Any]:
        """Cumulative text + delta per generated token, then a last response (empty delta) with the stats.

        When tool calls are parsed, text that may be a call is held back; the last response carries the calls.
        """
        text = ""
        splitter = tool_calls.ToolCallSplitter() if parses_calls else None
        pieces = iter(stream)
        try:
            for token in pieces:
                delta = splitter.feed(token.text) if splitter else token.text
                if delta:  # empty while a character is incomplete or text is held back (stop string, tool call)
                    text += delta
                    yield piece(text, delta)
        finally:
            pieces.close()  # frees the decoder at once if the caller stops early
        if splitter:
            rest, calls, _ = splitter.finish()
            last = ChatResponse(message=_assistant_message(text + rest, calls), delta=rest)
        else:
            last = piece(stream.result.text, "")
        last.raw, last.additional_kwargs = self._raw(stream.result), self._metadata(stream.result)
        yield last


def _parses_tool_calls(kwargs: dict[str, Any]) -> bool:
    return tool_calls.parses_tool_calls(kwargs.get("tools"), kwargs.get("tool_choice"))


def _assistant_message(content: str, calls: list[tool_calls.ToolCall]) -> ChatMessage:
    """An assistant message with its text and its tool calls as ToolCallBlocks (what agents read back)."""
    blocks: list[Any] = [TextBlock(text=content)] if content else []
    blocks += [ToolCallBlock(tool_call_id=c.id, tool_name=c.name, tool_kwargs=c.arguments) for c in calls]
    return ChatMessage(role=MessageRole.ASSISTANT, blocks=blocks)
