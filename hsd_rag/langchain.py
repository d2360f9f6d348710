"""HybridSpecLLM: the speculative decoder as a LangChain chat model (a thin adapter, no decoding logic here).

    from hsd_rag.langchain import HybridSpecLLM, attach_documents

    llm = HybridSpecLLM(max_new_tokens=256)          # the embedded SmolLM2-135M, loaded on first use
    llm = HybridSpecLLM(model="org/name", head=None, device="cuda")  # or a dir / .gguf, loaded on first use
    llm = HybridSpecLLM.from_model_id("org/name")   # the same, loaded now (as HuggingFacePipeline does)
    llm = HybridSpecLLM(decoder=my_decoder)          # or share an already-loaded HybridSpecDecoder
    chain = {"context": retriever, "question": RunnablePassthrough()} | attach_documents(prompt) | llm

Documents for drafting: the n-gram drafter indexes the whole prompt, so chunks a chain puts into the prompt are
drafted from automatically. Extra chunks (e.g. more than fit in the context window) can be given per call,
`llm.invoke(messages, documents=[...])` (strings or Documents), or travel with the messages in
`additional_kwargs["hsd_rag_documents"]`, which is what `attach_documents` does. Because the documents travel
with each request and every generation builds its own drafter, concurrent requests (`batch`, async, threads)
never draft from each other's chunks.

Structured output and tools: `llm.with_structured_output(Schema)` and `llm.bind_tools([...], tool_choice=...)`
decode under a grammar (hsd_rag.constrain), still losslessly: answers always parse, tool calls always name a
bound tool with valid arguments, and come back in `AIMessage.tool_calls`; ToolMessages go back to the model.

Stats: `response_metadata` holds finish_reason, stop_reason, tau (tokens per target forward), steps,
accepted_by_source / drafted_by_source and all of `GenerationStats` under "hsd_rag_stats"; `usage_metadata`
holds the token counts. When streaming, they arrive on the last chunk. `get_num_tokens` and
`get_num_tokens_from_messages` count with the model's own tokenizer and chat template.

`timeout=` (a field, or per call) is a real generation deadline: the answer stops after the token during which
it passed, with finish_reason "timeout". `api_key` is refused: a local model has none.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from operator import itemgetter
from typing import Any, Literal

from pydantic import AliasChoices, ConfigDict, Field, model_validator

from hsd_rag.constrain import tool_calls
from hsd_rag.constrain.formats import JsonSchema
from hsd_rag.data.prompt import PASSAGE_SEPARATOR
from hsd_rag.decoder import HybridSpecDecoder
from hsd_rag.integrations_common import (
    API_KEY_MESSAGE,
    DOCUMENTS_KEY,
    DOCUMENTS_KWARG,
    GENERATION_KWARGS,
    INSTALL_HINT,
    MAX_TOKENS_ALIAS,
    DeadlineStream,
    ModelFields,
    SamplingFields,
    call_timeout,
    check_model_source,
    config_default,
    decoder_for,
    document_texts,
    iterate_in_thread,
    model_name,
    pop_structure,
    result_metadata,
    split_call_kwargs,
    structured_request,
    usage,
)

try:
    from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
    from langchain_core.language_models import LangSmithParams
    from langchain_core.language_models.chat_models import (
        BaseChatModel,
        agenerate_from_stream,
        generate_from_stream,
    )
    from langchain_core.messages import (
        AIMessage,
        AIMessageChunk,
        BaseMessage,
        ChatMessage,
        HumanMessage,
        SystemMessage,
        ToolMessage,
    )
    from langchain_core.messages.tool import tool_call_chunk
    from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
    from langchain_core.output_parsers.openai_tools import JsonOutputKeyToolsParser, PydanticToolsParser
    from langchain_core.outputs import ChatGenerationChunk, ChatResult
    from langchain_core.prompt_values import ChatPromptValue
    from langchain_core.runnables import (
        Runnable,
        RunnableConfig,
        RunnableLambda,
        RunnableMap,
        RunnablePassthrough,
    )
    from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
    from langchain_core.utils.pydantic import is_basemodel_subclass
except ImportError as error:
    raise ImportError(
        f"hsd_rag.langchain needs the optional package `langchain-core`: `pip install langchain-core` "
        f"(or `{INSTALL_HINT}`)."
    ) from error

ADAPTER = "HybridSpecLLM"
# Constructor arguments of hosted chat models that change nothing for a local model (a local generation never
# fails transiently, so there is nothing to retry): accepted so such configurations construct, and ignored.
IGNORED_REMOTE_PARAMS = frozenset({"max_retries"})
REFUSED_REMOTE_PARAMS = frozenset({"api_key"})  # silently dropping a credential would hide a misconfiguration
# Call kwargs LangChain itself uses to steer a call; they are not generation settings.
LANGCHAIN_CONTROL_KWARGS = ("stream",)
# Content blocks an AIMessage may carry besides text: its tool calls, which `tool_calls` also holds.
TOOL_CALL_BLOCKS = frozenset({"tool_use", "tool_call", "function_call"})
StructuredMethod = Literal["json_schema", "json_mode", "function_calling"]


def to_chat_messages(messages: Sequence[BaseMessage]) -> list[dict[str, Any]]:
    """LangChain messages -> chat-template dicts: {"role", "content"}, plus assistant `tool_calls` and tool results.

    Tool calls are `{"name", "arguments", "id"}`; a ToolMessage becomes `{"role": "tool", "content", "name",
    "tool_call_id"}` (`hsd_rag.constrain.tool_calls` renders both for templates with or without tool support).
    """
    if not messages:
        raise ValueError(
            f"{ADAPTER} got no messages: pass at least one, e.g. a HumanMessage with the question."
        )
    out = []
    for message in messages:
        extra: dict[str, Any] = {}
        if isinstance(message, SystemMessage):
            role = "system"
        elif isinstance(message, HumanMessage):
            role = "user"
        elif isinstance(message, AIMessage):
            role = "assistant"
            if message.tool_calls:
                extra["tool_calls"] = [
                    {"name": c["name"], "arguments": c["args"], "id": c.get("id")} for c in message.tool_calls
                ]
        elif isinstance(message, ToolMessage):
            role = "tool"
            extra = {k: v for k, v in (("name", message.name), ("tool_call_id", message.tool_call_id)) if v}
            if message.status == "error" and not message.text.lower().startswith("error"):
                extra["content"] = f"Error: {message.text}"
        elif isinstance(message, ChatMessage) and message.role in ("system", "user", "assistant", "tool"):
            role = message.role
        else:
            raise ValueError(
                f"{ADAPTER} supports system, human, ai and tool messages, got a {type(message).__name__} "
                f"(type {message.type!r})."
            )
        if isinstance(message.content, list) and any(
            not isinstance(block, str) and block.get("type") not in ("text", *TOOL_CALL_BLOCKS)
            for block in message.content
        ):
            raise ValueError(f"{ADAPTER} takes text only; a {type(message).__name__} held non-text content.")
        out.append({"role": role, "content": message.text, **extra})
    return out


def message_documents(messages: Sequence[BaseMessage]) -> list[str]:
    """Documents carried by the messages themselves (put there by `attach_documents`)."""
    return [text for m in messages for text in document_texts(m.additional_kwargs.get(DOCUMENTS_KEY))]


class HybridSpecLLM(SamplingFields, ModelFields, BaseChatModel):
    """A local Hugging Face chat model decoded by HybridSpecDecoder: same output as plain decoding, faster.

    The model: `decoder=` (already loaded) or `model=` / `head=` / `device=` / `dtype=` (loaded on first use).
    Generation settings are fields and can be overridden per call (`llm.invoke(msgs, temperature=0.7)`); the
    per-call `documents=[...]` adds texts to draft from, `timeout=` sets a deadline. See the module docstring
    for documents and stats. `max_retries` (a setting of hosted chat models) is accepted and ignored; `api_key`
    and any unknown name raise ValueError.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, populate_by_name=True)

    decoder: HybridSpecDecoder | None = Field(
        default=None,
        exclude=True,
        description="An already-loaded decoder to share. None: the embedded default model, loaded on first use "
        "and shared by every HybridSpecLLM in the process.",
    )
    max_new_tokens: int = Field(
        default=config_default("max_new_tokens"),
        gt=0,
        validation_alias=AliasChoices("max_new_tokens", MAX_TOKENS_ALIAS),
        description="Upper bound on generated tokens (`max_tokens` is accepted as an alias).",
    )
    stop: list[str] | None = Field(
        default=None, description="Default stop strings (a call's `stop` replaces them)."
    )
    streaming: bool = Field(
        default=False, description="Let invoke() go through the streaming path (LangChain's usual switch)."
    )

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_arguments(cls, values: Any) -> Any:
        """A misspelt setting fails loudly instead of being silently ignored."""
        if not isinstance(values, dict):
            return values
        if REFUSED_REMOTE_PARAMS & set(values):
            raise ValueError(API_KEY_MESSAGE.format(adapter=ADAPTER))
        known = set(cls.model_fields) | {MAX_TOKENS_ALIAS}
        unknown = sorted(set(values) - known - IGNORED_REMOTE_PARAMS)
        if unknown:
            raise ValueError(
                f"{ADAPTER} got unknown argument(s) {', '.join(unknown)}; "
                f"generation settings are {', '.join((*GENERATION_KWARGS, 'stop'))}."
            )
        if values.get("decoder") is not None and values.get("model") is not None:
            raise ValueError(f"{ADAPTER}: pass either decoder= (loaded) or model= (to load), not both.")
        check_model_source(values.get("model"), ADAPTER)
        return {k: v for k, v in values.items() if k not in IGNORED_REMOTE_PARAMS}

    # ---- what LangChain asks of a chat model ------------------------------------------------------------

    @property
    def _llm_type(self) -> str:
        return "hsd-rag"

    @property
    def model_name(self) -> str:
        return model_name(self.decoder, self.model)

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of `text` with the model's own tokenizer (no special tokens added)."""
        if self.custom_get_token_ids is not None:
            return self.custom_get_token_ids(text)
        return self._decoder().tokenizer(text, add_special_tokens=False).input_ids

    def get_num_tokens_from_messages(self, messages: list[BaseMessage], tools: Sequence | None = None) -> int:
        """Exactly the prompt tokens these messages cost: the model's chat template with the generation
        prompt, the same count `usage_metadata["input_tokens"]` reports."""
        if tools:
            raise ValueError(f"{ADAPTER} cannot count tool definitions; count the messages without tools.")
        return len(self._decoder().encode_prompt(to_chat_messages(messages)))

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name, **self._settings(), "stop": self.stop}

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = super()._get_ls_params(stop=stop, **kwargs)
        params["ls_provider"] = "hsd_rag"
        params["ls_model_name"] = kwargs["model"] if isinstance(kwargs.get("model"), str) else self.model_name
        max_tokens = kwargs.get("max_new_tokens", kwargs.get(MAX_TOKENS_ALIAS, self.max_new_tokens))
        if isinstance(max_tokens, int):
            params["ls_max_tokens"] = max_tokens
        if stop or self.stop:
            params["ls_stop"] = stop or self.stop
        return params

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        """One chunk per generated token with text, then an empty last chunk with the stats and usage.

        With tools bound, text that may be a tool call is held back; the last chunk carries the parsed calls
        (`tool_call_chunks`), so `invoke` and an aggregated stream both end with `AIMessage.tool_calls`.
        """
        timeout = call_timeout(kwargs, self.timeout, ADAPTER)
        decoder = self._decoder()
        prompt, documents, settings, expects_calls = self._call_args(messages, stop, kwargs)
        splitter = tool_calls.ToolCallSplitter() if expects_calls else None
        tokens = decoder.stream_tokens(prompt, documents, **settings)
        stream = DeadlineStream(tokens, timeout, lambda: len(decoder.encode_prompt(prompt)))
        pieces = iter(stream)
        try:
            for piece in pieces:
                text = splitter.feed(piece.text) if splitter else piece.text
                if not text:  # an incomplete character, text held back for a stop string, or a tool call
                    continue
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=text))
                if run_manager:
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
        finally:
            pieces.close()  # frees the decoder at once if the caller stops early
        result = stream.result
        metadata = result_metadata(result, model_name(decoder))
        content, call_chunks = "", []
        if splitter:
            content, calls, invalid = splitter.finish()
            call_chunks = _tool_call_chunks(calls, invalid)
            if calls:
                metadata["finish_reason"] = "tool_calls"  # the OpenAI vocabulary agents look for
        last = ChatGenerationChunk(
            message=AIMessageChunk(
                content=content,
                tool_call_chunks=call_chunks,
                usage_metadata=usage(result.stats),
                response_metadata=metadata,
                chunk_position="last",
            )
        )
        if run_manager:
            run_manager.on_llm_new_token(last.text, chunk=last)
        yield last

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return generate_from_stream(self._stream(messages, stop, run_manager, **kwargs))

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        """The sync stream run in one worker thread (see `iterate_in_thread`), callbacks fired on the loop."""
        async for chunk in iterate_in_thread(lambda: self._stream(messages, stop, None, **kwargs)):
            if run_manager:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return await agenerate_from_stream(self._astream(messages, stop, run_manager, **kwargs))

    # ---- translation ------------------------------------------------------------------------------------

    def _decoder(self) -> HybridSpecDecoder:
        return self.decoder if self.decoder is not None else decoder_for(self)

    def _settings(self) -> dict[str, Any]:
        settings = {name: getattr(self, name) for name in GENERATION_KWARGS}
        if settings["method"] is None:
            del settings["method"]  # the decoder's default_method decides
        return settings

    def _call_args(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]):
        """(prompt, documents, generation kwargs, whether tool calls are parsed) for one call.

        Unknown kwargs raise ValueError. The prompt is the chat messages, or token ids when tools are bound or
        the history holds tool calls (the chat template then renders them, see `constrain.tool_calls`).
        """
        kwargs = {k: v for k, v in kwargs.items() if k not in LANGCHAIN_CONTROL_KWARGS}
        structure = pop_structure(kwargs)
        overrides, documents = split_call_kwargs(kwargs, ADAPTER)
        chat = to_chat_messages(messages)
        settings = {**self._settings(), **overrides}
        stops = stop if stop is not None else self.stop
        if stops:
            settings["stop"] = list(stops)
        prompt, expects_calls = structured_request(self._decoder().tokenizer, chat, structure, settings)
        return prompt, message_documents(messages) + document_texts(documents), settings, expects_calls

    # ---- tools and structured output ------------------------------------------------------------------

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable | Any],
        *,
        tool_choice: str | dict | bool | None = None,
        parallel_tool_calls: bool | None = None,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable:
        """Bind tools (LangChain tools, functions, pydantic models, TypedDicts or OpenAI tool dicts).

        The model's chat template renders them when it supports `tools=`; otherwise they are described in a
        system message. Calls come back in `AIMessage.tool_calls`, with arguments constrained to each tool's
        schema. tool_choice: None/"auto" (the model decides), "none", "any"/"required"/True (must call a tool),
        or a tool's name (must call that tool). One call per turn unless `parallel_tool_calls=True`.
        """
        formatted = [convert_to_openai_tool(tool, strict=strict) for tool in tools]
        tool_calls.choose_tools(formatted, tool_choice)  # an unknown tool name fails here, not at invoke time
        return super().bind(
            tools=formatted, tool_choice=tool_choice, parallel_tool_calls=bool(parallel_tool_calls), **kwargs
        )

    def with_structured_output(
        self,
        schema: dict[str, Any] | type | None = None,
        *,
        method: StructuredMethod = "json_schema",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable:
        """Outputs parsed into `schema` (pydantic class -> instance; TypedDict / JSON schema -> dict).

        method: "json_schema" constrains the answer to the schema; "json_mode" to any JSON object (say what
        you want in the prompt; `schema` then only parses); "function_calling" forces a call to a tool built
        from the schema. All are lossless: the output is what the model decodes alone under the constraint.
        include_raw: return {"raw": AIMessage, "parsed": ..., "parsing_error": ...} instead of raising.
        """
        if kwargs:
            raise ValueError(f"{ADAPTER}.with_structured_output got unknown argument(s) {', '.join(kwargs)}.")
        if schema is None and method != "json_mode":
            raise ValueError(f"with_structured_output(method={method!r}) needs a schema.")
        is_pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)  # pydantic v2 or v1
        trace = {"kwargs": {"method": method, "strict": strict}, "schema": schema}
        if method == "function_calling":
            name = convert_to_openai_tool(schema)["function"]["name"]
            llm = self.bind_tools([schema], tool_choice=name, strict=strict, ls_structured_output_format=trace)
            parser = (
                PydanticToolsParser(tools=[schema], first_tool_only=True)
                if is_pydantic
                else JsonOutputKeyToolsParser(key_name=name, first_tool_only=True)
            )
        elif method in ("json_schema", "json_mode"):
            response_format = (
                JsonSchema(json_schema=convert_to_json_schema(schema)) if method == "json_schema" else "json_object"
            )
            bind_kwargs = {"ls_structured_output_format": trace} if schema is not None else {}
            llm = self.bind(response_format=response_format, **bind_kwargs)
            parser = PydanticOutputParser(pydantic_object=schema) if is_pydantic else JsonOutputParser()
        else:
            raise ValueError(
                f"method={method!r} is not supported; use 'json_schema', 'json_mode' or 'function_calling'."
            )
        if not include_raw:
            return llm | parser
        parse = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        keep_raw = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parse.with_fallbacks([keep_raw], exception_key="parsing_error")


def _tool_call_chunks(calls: list[tool_calls.ToolCall], invalid: list[tuple[str, str]]) -> list:
    """Parsed calls (and unparsable ones, which LangChain files under invalid_tool_calls) as tool_call_chunks."""
    chunks = [
        tool_call_chunk(name=call.name, args=json.dumps(call.arguments, ensure_ascii=False), id=call.id, index=i)
        for i, call in enumerate(calls)
    ]
    chunks += [
        tool_call_chunk(name=None, args=raw, id=None, index=len(calls) + i) for i, (raw, _) in enumerate(invalid)
    ]
    return chunks


def attach_documents(prompt: Runnable, key: str = "context", separator: str = PASSAGE_SEPARATOR) -> Runnable:
    """Format `prompt` and attach the documents found under input key `key` to the messages, for drafting.

    `{"context": retriever, "question": RunnablePassthrough()} | attach_documents(prompt) | llm`: the retrieved
    Documents are joined by `separator` into the prompt's `{context}` (their text, not their repr) and also ride
    along in the last message's `additional_kwargs["hsd_rag_documents"]`, where HybridSpecLLM picks them up.
    A string under `key` is used as is and attached as one document.
    """

    def split(inputs: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        if not isinstance(inputs, dict) or key not in inputs:
            raise ValueError(
                f"attach_documents expects a dict input with the key {key!r} (the retrieved documents)."
            )
        texts = document_texts(inputs[key])
        if not isinstance(inputs[key], str):
            inputs = {**inputs, key: separator.join(texts)}
        return inputs, texts

    def attach(value: Any, texts: list[str]) -> ChatPromptValue:
        messages = list(value.to_messages())
        last = messages[-1]
        extra = {**last.additional_kwargs, DOCUMENTS_KEY: texts}
        messages[-1] = last.model_copy(update={"additional_kwargs": extra})
        return ChatPromptValue(messages=messages)

    def run(inputs: dict[str, Any], config: RunnableConfig) -> ChatPromptValue:
        formatted, texts = split(inputs)
        return attach(prompt.invoke(formatted, config), texts)

    async def arun(inputs: dict[str, Any], config: RunnableConfig) -> ChatPromptValue:
        formatted, texts = split(inputs)
        return attach(await prompt.ainvoke(formatted, config), texts)

    return RunnableLambda(run, afunc=arun, name="attach_documents")


def documents_in_extra_body(llm: Runnable, field: str = DOCUMENTS_KWARG) -> Runnable:
    """Send the documents `attach_documents` attached as `extra_body={"documents": [...]}` of each call.

    For a chat model talking to an OpenAI-compatible server (`ChatOpenAI(base_url=...)` against `hsd-rag serve`),
    which cannot read our message field: `... | attach_documents(prompt) | documents_in_extra_body(llm)`. The
    server puts them into that request's n-gram index. The model's own `extra_body` is kept.
    """

    def route(value: Any) -> Runnable:
        messages = value.to_messages() if hasattr(value, "to_messages") else value
        documents = message_documents(messages) if isinstance(messages, list) else []
        if not documents:
            return llm
        extra = {**(getattr(llm, "extra_body", None) or {}), field: documents}
        return llm.bind(extra_body=extra)

    return RunnableLambda(route, name="documents_in_extra_body")

