"""What the LangChain and LlamaIndex adapters share: the default decoder, call kwargs, documents and stats.

Kept free of both frameworks (documents are read by duck typing) so each adapter imports only its own.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, Field

from hsd_rag.config import DecodeConfig, Method
from hsd_rag.decoder import GenerationStream, HybridSpecDecoder
from hsd_rag.loading import DEFAULT_MODEL_NAME
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
# Our stop reasons -> the finish_reason vocabulary chat frameworks already know ("stop" / "length").
FINISH_REASONS = {"eos": "stop", "stop_string": "stop", "length": "length", "context_window": "length"}
INSTALL_HINT = "pip install 'hsd-rag[rag]'"

T = TypeVar("T")

_default_decoder: HybridSpecDecoder | None = None
_default_lock = threading.Lock()


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


def default_decoder() -> HybridSpecDecoder:
    """The embedded default model, loaded on first use and shared by every adapter in the process (one copy)."""
    global _default_decoder
    with _default_lock:
        if _default_decoder is None:
            _default_decoder = HybridSpecDecoder.from_pretrained()
        return _default_decoder


def model_name(decoder: HybridSpecDecoder | None) -> str:
    """A short model name for metadata and traces, without loading the default model to find it."""
    if decoder is None:
        return DEFAULT_MODEL_NAME
    name = getattr(decoder.model, "name_or_path", "") or type(decoder.model).__name__
    # a local path (e.g. the cached default model) says less than its folder name; a hub id stays whole
    return Path(name).name if Path(name).is_absolute() else name


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
