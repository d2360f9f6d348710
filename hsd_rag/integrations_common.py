"""What the LangChain and LlamaIndex adapters share: model selection and loading, call kwargs, documents,
deadlines and stats.

Kept free of both frameworks (documents are read by duck typing) so each adapter imports only its own.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from hsd_rag.config import DecodeConfig, Method
from hsd_rag.decoder import GenerationStream, HybridSpecDecoder, TokenPiece
from hsd_rag.loading import DEFAULT_MODEL_NAME, looks_like_path
from hsd_rag.stats import GenerationResult, GenerationStats

# Generation settings an adapter exposes as fields and accepts per call (the DecodeConfig names).
GENERATION_KWARGS: tuple[str, ...] = (
    "max_new_tokens",
    "do_sample",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "method",
    "budget",
    "seed",
)
MAX_TOKENS_ALIAS = "max_tokens"  # the name LangChain's standard params and hosted chat APIs use
DOCUMENTS_KWARG = "documents"  # per-call extra texts to draft from
DOCUMENTS_KEY = "hsd_rag_documents"  # the same, carried in a message's additional_kwargs
TIMEOUT_KWARG = "timeout"  # per-call generation deadline in seconds (a field too)
TIMEOUT_STOP_REASON = "timeout"  # stop_reason and finish_reason of an answer cut by its deadline
# Our stop reasons -> the finish_reason vocabulary chat frameworks already know ("stop" / "length");
# a deadline has no standard name there, so it keeps its own.
FINISH_REASONS = {
    "eos": "stop",
    "stop_string": "stop",
    "length": "length",
    "context_window": "length",
    TIMEOUT_STOP_REASON: TIMEOUT_STOP_REASON,
}
HEAD_AUTO = "auto"  # the head shipped for the default model; no head for other models
HEAD_NONE = "none"  # the CLI's spelling of "no head"
API_KEY_MESSAGE = (
    "{adapter} runs a local model, so there is no API key to give: remove `api_key` "
    "(choose the model with `model=` or `HybridSpecLLM.from_model_id(...)`)."
)
INSTALL_HINT = "pip install 'hsd-rag[rag]'"

T = TypeVar("T")

_default_decoder: HybridSpecDecoder | None = None
_default_lock = threading.Lock()
_decoders: dict[tuple, HybridSpecDecoder] = {}  # models chosen by name, one load per process and settings


def config_default(name: str) -> Any:
    """DecodeConfig's default for `name`, so adapter fields never drift from the decoder's own defaults."""
    return DecodeConfig.model_fields[name].default


class SamplingFields(BaseModel):
    """Generation settings both adapters expose as fields (defaults read from DecodeConfig, so they never drift).

    None = as HF `generate` would: the model's generation_config, else HF's defaults (hsd_rag.generation_defaults).
    """

    do_sample: bool | None = Field(default=None, description="Sample or not; None: temperature / generation_config.")
    temperature: float | None = Field(
        default=config_default("temperature"), ge=0.0, description="0 = greedy; > 0 samples (losslessly)."
    )
    top_p: float | None = Field(default=config_default("top_p"), gt=0.0, le=1.0, description="Nucleus sampling mass.")
    top_k: int | None = Field(default=config_default("top_k"), ge=0, description="Keep the k most likely tokens; 0 = off.")
    min_p: float | None = Field(
        default=None, ge=0.0, le=1.0, description="Drop tokens below min_p x the top token's probability."
    )
    repetition_penalty: float | None = Field(
        default=None, gt=0.0, description="HF's repetition penalty over prompt + output (1.0 = off)."
    )
    method: Method | None = Field(
        default=None,
        description="Draft source: vanilla, ngram, eagle, hybrid, hybrid-fixed. None = decoder.default_method.",
    )
    budget: int | Literal["auto"] = Field(
        default=config_default("budget"), description='Draft tokens verified per target forward, or "auto".'
    )
    seed: int | None = Field(default=None, description="Seed for sampling; None uses torch's global generator.")


class ModelFields(BaseModel):
    """How an adapter chooses its model, as `HuggingFacePipeline.from_model_id` does; loaded on first use."""

    model_config = ConfigDict(protected_namespaces=())  # `model_kwargs` is the anchors' name for it

    model: str | None = Field(
        default=None,
        description='A hub id ("org/name"), a local model directory or a .gguf file; None = the embedded '
        "default SmolLM2-135M-Instruct. Loaded on first use through HybridSpecDecoder.from_pretrained and "
        "shared by every adapter in the process that asks for the same settings.",
    )
    head: str | None = Field(
        default=HEAD_AUTO,
        description='EAGLE head: "auto" = the head shipped for the default model (none for other models), '
        'None or "none" = no head, else an EAGLE-3 / EAGLE-1/2 checkpoint directory or hub id.',
    )
    device: str | None = Field(
        default=None, description='"cuda", "cpu", "mps", ...; None = CUDA when available.'
    )
    dtype: str | None = Field(
        default=None,
        description='"float32", "bfloat16", ...; None / "auto" = float32 on CPU, bfloat16 on CUDA.',
    )
    model_kwargs: dict[str, Any] | None = Field(
        default=None, description="Extra keyword arguments for transformers' from_pretrained (revision, ...)."
    )
    timeout: float | None = Field(
        default=None,
        gt=0,
        description="Generation deadline per call, in seconds: once it passes, the answer stops after the "
        'current token and comes back as generated so far, with finish_reason "timeout". Checked between '
        "tokens, so waiting for the model and the first forward are not cut short. None = no deadline.",
    )

    @classmethod
    def from_model_id(
        cls,
        model_id: str,
        *,
        head: str | None = HEAD_AUTO,
        device: str | None = None,
        dtype: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Self:
        """Load `model_id` (hub id, local directory or .gguf) now, as `HuggingFacePipeline.from_model_id` does,
        so a wrong id fails here; `kwargs` are the adapter's other fields (max_new_tokens, temperature, ...)."""
        adapter = cls(model=model_id, head=head, device=device, dtype=dtype, model_kwargs=model_kwargs, **kwargs)
        decoder_for(adapter)  # loads the model now; the adapter's first call gets the same (shared) decoder
        return adapter


def looks_local(model: str) -> bool:
    """A path rather than a hub id (see `hsd_rag.loading.looks_like_path`)."""
    return looks_like_path(model)


def check_model_source(model: str | None, adapter: str) -> None:
    """Fail at construction, not at the first call, when a local model path does not exist."""
    if model is not None and looks_local(model) and not Path(model).expanduser().exists():
        raise ValueError(
            f"{adapter}: model {model!r} does not exist. Pass a local model directory, a .gguf file, a hub "
            'id ("org/name"), or leave model unset for the embedded default.'
        )


def default_decoder() -> HybridSpecDecoder:
    """The embedded default model, loaded on first use and shared by every adapter in the process (one copy)."""
    global _default_decoder
    with _default_lock:
        if _default_decoder is None:
            _default_decoder = HybridSpecDecoder.from_pretrained()
        return _default_decoder


def decoder_for(fields: ModelFields) -> HybridSpecDecoder:
    """The decoder an adapter's model fields ask for: loaded once per process and settings, then shared."""
    head = None if fields.head in (None, HEAD_NONE) else fields.head
    extra = dict(fields.model_kwargs or {})
    settings = (fields.model, head, fields.device, fields.dtype)
    if settings == (None, HEAD_AUTO, None, None) and not extra:
        return default_decoder()
    key = (*settings, tuple(sorted((k, repr(v)) for k, v in extra.items())))
    with _default_lock:  # one load at a time: two threads asking for the same model get one copy
        if key not in _decoders:
            _decoders[key] = HybridSpecDecoder.from_pretrained(
                fields.model, head=head, device=fields.device, dtype=fields.dtype, **extra
            )
        return _decoders[key]


def model_name(decoder: HybridSpecDecoder | None, model: str | None = None) -> str:
    """A short model name for metadata and traces, without loading the model to find it."""
    if decoder is None:
        if model is None:
            return DEFAULT_MODEL_NAME
        return Path(model).name if looks_local(model) else model
    name = getattr(decoder.model, "name_or_path", "") or type(decoder.model).__name__
    # a local path (e.g. the cached default model) says less than its folder name; a hub id stays whole
    return Path(name).name if Path(name).is_absolute() else name


def call_timeout(kwargs: dict[str, Any], default: float | None, adapter: str) -> float | None:
    """Pop the per-call `timeout` (seconds) from `kwargs`, else the field's; a bad one raises ValueError."""
    timeout = kwargs.pop(TIMEOUT_KWARG, default)
    number = isinstance(timeout, int | float) and not isinstance(timeout, bool)
    if timeout is not None and (not number or timeout <= 0):
        raise ValueError(f"{adapter}: timeout must be a positive number of seconds or None, got {timeout!r}.")
    return timeout


class DeadlineStream:
    """A decoder token stream with a deadline: once `timeout` seconds have passed since the call, it stops
    after the current token, frees the decoder, and `result` holds what was generated, stop_reason "timeout".

    The decoder has no deadline of its own, so it is enforced here, between tokens. Stats of a cut answer are
    what the tokens tell (count, target forwards, accepted drafts per source); drafted counts and the time
    split are only known for a finished generation.
    """

    clock: Callable[[], float] = staticmethod(time.monotonic)  # seconds; tests swap in a counting clock

    def __init__(self, stream: GenerationStream, timeout: float | None, prompt_tokens: Callable[[], int]):
        self._stream = stream
        self._timeout = timeout
        self._prompt_tokens = prompt_tokens
        self._started = self.clock()
        self.result: GenerationResult | None = None

    def close(self) -> None:
        self._stream.close()

    def __enter__(self) -> DeadlineStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self) -> Iterator[TokenPiece]:
        if self._timeout is None:
            yield from self._stream
            self.result = self._stream.result
            return
        deadline = self._started + self._timeout
        pieces: list[TokenPiece] = []
        iterator = iter(self._stream)
        try:
            for piece in iterator:
                pieces.append(piece)
                yield piece
                if self.clock() >= deadline:
                    break
            else:
                self.result = self._stream.result
                return
        finally:
            iterator.close()  # ends the decode loop and releases the decoder
        self.result = self._cut_result(pieces)

    def _cut_result(self, pieces: list[TokenPiece]) -> GenerationResult:
        accepted: Counter = Counter()
        for piece in pieces:
            if piece.source != "target":
                accepted.update(piece.source.split("+"))
        stats = GenerationStats(
            steps=pieces[-1].step + 1 if pieces else 0,
            new_tokens=len(pieces),
            prompt_tokens=self._prompt_tokens(),
            accepted_by_source=accepted,
            total_s=self.clock() - self._started,
            stop_reason=TIMEOUT_STOP_REASON,
        )
        text = "".join(piece.text for piece in pieces)
        return GenerationResult(text, [p.token_id for p in pieces], [p.source for p in pieces], stats)


def split_call_kwargs(kwargs: Mapping[str, Any], adapter: str) -> tuple[dict[str, Any], Any]:
    """Per-call kwargs -> (generation overrides, documents); an unknown name raises ValueError naming it."""
    overrides = dict(kwargs)
    documents = overrides.pop(DOCUMENTS_KWARG, None)
    if MAX_TOKENS_ALIAS in overrides:
        if "max_new_tokens" in overrides:
            raise ValueError(f"{adapter}: pass max_new_tokens or max_tokens, not both.")
        overrides["max_new_tokens"] = overrides.pop(MAX_TOKENS_ALIAS)
    unknown = sorted(set(overrides) - set(GENERATION_KWARGS))
    if unknown:
        valid = ", ".join((*GENERATION_KWARGS, MAX_TOKENS_ALIAS, DOCUMENTS_KWARG))
        raise ValueError(
            f"{adapter} got unknown argument(s) {', '.join(unknown)}; valid per-call arguments: {valid}."
        )
    return overrides, documents


def document_texts(documents: Any) -> list[str]:
    """Strings, LangChain Documents or LlamaIndex nodes (also NodeWithScore) -> their texts, in order."""
    if documents is None:
        return []
    if isinstance(documents, str) or not isinstance(documents, Iterable):
        documents = [documents]
    texts = []
    for document in documents:
        if isinstance(document, str):
            texts.append(document)
        elif isinstance(getattr(document, "page_content", None), str):  # langchain_core Document
            texts.append(document.page_content)
        elif callable(getattr(document, "get_content", None)):  # llama_index nodes, Documents, NodeWithScore
            texts.append(document.get_content())
        else:
            raise TypeError(
                f"documents must be strings, LangChain Documents or LlamaIndex nodes, got {type(document).__name__}"
            )
    return texts


def raw_response(result: GenerationResult, name: str) -> dict[str, Any]:
    """An OpenAI-shaped raw response: what LlamaIndex's `TokenCountingHandler` reads ("usage" with prompt /
    completion token counts), the finish reason, and every stat of ours under its own key."""
    stats = result.stats
    return {
        "model": name,
        "usage": {
            "prompt_tokens": stats.prompt_tokens,
            "completion_tokens": stats.new_tokens,
            "total_tokens": stats.prompt_tokens + stats.new_tokens,
        },
        "finish_reason": FINISH_REASONS.get(stats.stop_reason, stats.stop_reason),
        "hsd_rag_stats": stats.to_dict(),
    }


def usage(stats: GenerationStats) -> dict[str, int]:
    return {
        "input_tokens": stats.prompt_tokens,
        "output_tokens": stats.new_tokens,
        "total_tokens": stats.prompt_tokens + stats.new_tokens,
    }


def result_metadata(result: GenerationResult, name: str) -> dict[str, Any]:
    """What a response reports: finish reason, τ, steps, drafts accepted per source, and every stat."""
    stats = result.stats
    return {
        "model_name": name,
        "finish_reason": FINISH_REASONS.get(stats.stop_reason, stats.stop_reason),
        "stop_reason": stats.stop_reason,
        "tau": stats.tau,
        "steps": stats.steps,
        "accepted_by_source": dict(stats.accepted_by_source),
        "drafted_by_source": dict(stats.drafted_by_source),
        "usage": usage(stats),
        "hsd_rag_stats": stats.to_dict(),
    }


async def iterate_in_thread(make_iterator: Callable[[], Iterator[T]]) -> AsyncIterator[T]:
    """Run a sync generation in ONE worker thread and hand its items to the event loop as they come.

    Why one thread: torch's inference mode is thread-local, so a generation must not hop between the executor
    threads that a `next()`-per-item bridge would use; and the event loop stays free while the model runs.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancelled = threading.Event()
    done = object()

    def post(item, error=None) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (item, error))
        except RuntimeError:  # the loop has closed: nobody is listening any more
            cancelled.set()

    def work() -> None:
        try:
            iterator = make_iterator()
            try:
                for item in iterator:
                    if cancelled.is_set():
                        break
                    post(item)
            finally:
                close = getattr(iterator, "close", None)
                if close is not None:
                    close()  # releases the decoder (and runs the drafter's cleanup) when stopped early
        except BaseException as error:  # re-raised in the consumer
            post(done, error)
        else:
            post(done)

    worker = loop.run_in_executor(None, contextvars.copy_context().run, work)  # keeps tracing context
    try:
        while True:
            item, error = await queue.get()
            if item is done:
                if error is not None:
                    raise error
                break
            yield item
        await worker
    finally:
        cancelled.set()


async def generate_in_thread(start: Callable[[], GenerationStream]) -> GenerationResult | None:
    """Run a whole generation in one worker thread, for `ainvoke`-style calls.

    Cancelling the awaiting task stops the generation within one step (the worker checks between tokens and
    closes the stream), instead of leaving `asyncio.to_thread` to compute every remaining token.
    """
    loop = asyncio.get_running_loop()
    cancelled = threading.Event()

    def work() -> GenerationResult | None:
        with start() as stream:
            for _ in stream:
                if cancelled.is_set():
                    return None
        return stream.result

    try:
        return await loop.run_in_executor(None, contextvars.copy_context().run, work)
    finally:
        cancelled.set()


# Call kwargs that shape the output (bound by bind_tools / with_structured_output / function calling, or per call).
STRUCTURE_KWARGS = ("tools", "tool_choice", "parallel_tool_calls", "response_format")


def pop_structure(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Take the output-shaping kwargs out of a call's kwargs (the rest are generation settings)."""
    return {k: kwargs.pop(k) for k in STRUCTURE_KWARGS if k in kwargs}


def structured_request(tokenizer, chat: list[dict[str, Any]], structure: dict[str, Any], settings: dict[str, Any]):
    """(prompt, whether the answer's tool calls are parsed) for `chat` with any bound tools rendered into it; a
    response format (JSON schema, tool-call grammar, ...) goes into `settings` (hsd_rag.constrain.tool_calls)."""
    from hsd_rag.constrain import tool_calls

    prompt, response_format, expects_calls = tool_calls.prepare_request(
        tokenizer,
        chat,
        structure.get("tools"),
        structure.get("tool_choice"),
        bool(structure.get("parallel_tool_calls")),
        structure.get("response_format"),
    )
    if response_format is not None:
        settings["response_format"] = response_format
    return prompt, expects_calls
