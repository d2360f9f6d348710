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

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from pydantic import Field, PrivateAttr, model_validator

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
    raw_response,
    result_metadata,
    split_call_kwargs,
)
from hsd_rag.stats import GenerationResult

try:
    from llama_index.core.base.llms.types import TextBlock
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
except ImportError as error:
    raise ImportError(
        f"hsd_rag.llama_index needs the optional package `llama-index-core`: `pip install llama-index-core` "
        f"(or `{INSTALL_HINT}`)."
    ) from error

ADAPTER = "HybridSpecLLM"
DEFAULT_CONTEXT_WINDOW = 2048  # reported only for models whose config names no max_position_embeddings
ROLES = {
    MessageRole.SYSTEM: "system",
    MessageRole.DEVELOPER: "system",
    MessageRole.USER: "user",
    MessageRole.ASSISTANT: "assistant",
    MessageRole.CHATBOT: "assistant",
    MessageRole.MODEL: "assistant",
}


def to_chat_messages(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    """LlamaIndex messages -> [{"role", "content"}] for the tokenizer's chat template (text only, no tools)."""
    if not messages:
        raise ValueError(
            f"{ADAPTER} got no messages: pass at least one, e.g. a user message with the question."
        )
    out = []
    for message in messages:
        if message.role not in ROLES:
            raise ValueError(
                f"{ADAPTER} supports system, user and assistant messages only, got role {message.role.value!r}; "
                "tool and function messages need tool calling, which it does not have."
            )
        if any(not isinstance(block, TextBlock) for block in message.blocks):
            raise ValueError(
                f"{ADAPTER} takes text only; a {message.role.value} message held non-text content."
            )
        out.append({"role": ROLES[message.role], "content": message.content or ""})
    return out


class HybridSpecLLM(SamplingFields, ModelFields, CustomLLM):
    """A local Hugging Face chat model decoded by HybridSpecDecoder: same output as plain decoding, faster.

    The model: `decoder` (already loaded) or `model=` / `head=` / `device=` / `dtype=` (loaded on first use).
    Chat messages go through the tokenizer's chat template; a completion prompt is sent as one user message
    (after a system message when `system_prompt` is set and the prompt is not `formatted`). Generation settings
    are fields and can be overridden per call; `documents=[...]` adds texts to draft from, `timeout=` sets a
    deadline.
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
    def from_model_id(
        cls,
        model_id: str,
        *,
        head: str | None = "auto",
        device: str | None = None,
        dtype: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> HybridSpecLLM:
        """Load `model_id` (hub id, local directory or .gguf) now, so a wrong id fails here; `kwargs` are the
        other fields (max_new_tokens, temperature, callback_manager, ...)."""
        llm = cls(model=model_id, head=head, device=device, dtype=dtype, model_kwargs=model_kwargs, **kwargs)
        _ = llm.decoder  # loads the model now
        return llm

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
        return self._chat(self._generate(messages, kwargs))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        stream = self._start(messages, kwargs)
        return self._responses(stream, self._chat_piece)

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return self._chat(await generate_in_thread(lambda: self._start(messages, kwargs)))

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        stream = self._start(messages, kwargs)
        return iterate_in_thread(lambda: self._responses(stream, self._chat_piece))

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
        overrides, documents = split_call_kwargs(kwargs, ADAPTER)
        settings = {name: getattr(self, name) for name in GENERATION_KWARGS}
        if settings["method"] is None:
            del settings["method"]  # the decoder's default_method decides
        settings.update(overrides)
        if self.stop:
            settings["stop"] = list(self.stop)
        carried = [text for m in messages for text in document_texts(m.additional_kwargs.get(DOCUMENTS_KEY))]
        decoder, prompt = self.decoder, to_chat_messages(messages)
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

    def _chat(self, result: GenerationResult) -> ChatResponse:
        message = ChatMessage(role=MessageRole.ASSISTANT, content=result.text)
        return ChatResponse(message=message, raw=self._raw(result), additional_kwargs=self._metadata(result))

    @staticmethod
    def _completion_piece(text: str, delta: str) -> CompletionResponse:
        return CompletionResponse(text=text, delta=delta)

    @staticmethod
    def _chat_piece(text: str, delta: str) -> ChatResponse:
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=delta)

    def _responses(self, stream: DeadlineStream, piece: Callable[[str, str], Any]) -> Iterator[Any]:
        """Cumulative text + delta per generated token, then a last response (empty delta) with the stats."""
        text = ""
        pieces = iter(stream)
        try:
            for token in pieces:
                if token.text:  # empty while a character is incomplete or text is held back for a stop string
                    text += token.text
                    yield piece(text, token.text)
        finally:
            pieces.close()  # frees the decoder at once if the caller stops early
        last = piece(stream.result.text, "")
        last.raw, last.additional_kwargs = self._raw(stream.result), self._metadata(stream.result)
        yield last
