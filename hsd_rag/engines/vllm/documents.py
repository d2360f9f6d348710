"""The `documents` request field on vLLM: extra texts that only that request's n-gram index sees.

The proposer runs in vLLM's worker process and is handed token rows only: no request id, no sampling params,
and vLLM refuses custom logits processors (the one per-request hook) when speculative decoding is on. What
both sides do know is the request's exact prompt token ids, so that is the key:

1. `DocumentsMiddleware` (ASGI, in vLLM's API server via `--middleware`) takes `documents` (a list of strings)
   out of a /v1/completions or /v1/chat/completions body, computes the prompt's token ids the way vLLM's
   serving layer does (chat template with the generation prompt, or the text prompt tokenized, or the ids as
   sent), tokenizes the documents, and drops them in an inbox directory under a hash of those prompt ids.
2. `DocumentInbox.take`, called by the proposer the first time it sees a request, hashes the prompt it
   finds in the row, reads and deletes the matching entry, and the request's drafter indexes the documents.

Isolation: an entry goes to the one request whose prompt has that hash. Two requests in flight with the very
same prompt cannot be told apart, so a second registration under a live key turns the entry into a tombstone
and neither request gets documents. A prompt tokenized differently from vLLM (an unusual chat template
setting) finds no entry: the request then drafts from its prompt alone, as without the field. Entries nobody
takes (a request rejected before it ran) expire after `ENTRY_TTL_S`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

DOCUMENTS_FIELD = "documents"
TOKENIZER_ENV = "HSD_RAG_VLLM_TOKENIZER"  # model dir whose tokenizer the middleware uses
DOCUMENTS_DIR_ENV = "HSD_RAG_VLLM_DOCUMENTS_DIR"  # the inbox (shared by the API server and the proposer)
ENTRY_TTL_S = 600.0
SWEEP_EVERY = 64  # takes between two sweeps of expired entries
ROUTES = {"/v1/completions": "completion", "/v1/chat/completions": "chat"}
MAX_DOCUMENTS_BYTES = 4 * 2**20  # per request: the inbox is a spool, not a document store


def prompt_key(prompt_ids: Sequence[int]) -> str:
    """Inbox key of a prompt: a hash of its token ids (identical on both sides of the process boundary)."""
    return hashlib.sha256(",".join(str(int(t)) for t in prompt_ids).encode()).hexdigest()


class DocumentInbox:
    """A directory of tokenized documents keyed by prompt; written by the middleware, read by the proposer."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._takes = 0

    def put(self, prompt_ids: Sequence[int], documents: Sequence[Sequence[int]]) -> None:
        """Register documents for the request with this prompt (a tombstone if that prompt is already in)."""
        path = self.root / f"{prompt_key(prompt_ids)}.json"
        entry = {DOCUMENTS_FIELD: [[int(t) for t in doc] for doc in documents]}
        if path.exists():
            entry = {"ambiguous": True}
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
        tmp.write_text(json.dumps(entry))
        tmp.replace(path)

    def take(self, prompt_ids: Sequence[int]) -> list[list[int]]:
        """The documents registered for this prompt (removing them), or [] when none or ambiguous."""
        self._takes += 1
        if self._takes % SWEEP_EVERY == 0:
            self.sweep()
        path = self.root / f"{prompt_key(prompt_ids)}.json"
        try:
            entry = json.loads(path.read_text())
            path.unlink()
        except (FileNotFoundError, json.JSONDecodeError):
            return []
        return [list(doc) for doc in entry.get(DOCUMENTS_FIELD, [])]

    def sweep(self, ttl_s: float = ENTRY_TTL_S) -> None:
        """Delete entries no request took within `ttl_s` seconds."""
        horizon = time.time() - ttl_s
        for path in self.root.glob("*.json"):
            try:
                if path.stat().st_mtime < horizon:
                    path.unlink()
            except FileNotFoundError:
                pass


class DocumentsMiddleware:
    """ASGI middleware for vLLM's OpenAI server: moves `documents` from the request body into the inbox."""

    def __init__(self, app):
        self.app = app
        self.inbox = DocumentInbox(Path(os.environ[DOCUMENTS_DIR_ENV]))
        self._tokenizer = None
        if os.environ.get(TOKENIZER_ENV):
            self._load_tokenizer()  # at server start, not inside the first request that carries documents

    async def __call__(self, scope, receive, send):
        kind = ROUTES.get(scope.get("path", "")) if scope.get("type") == "http" else None
        if kind is None or scope.get("method") != "POST":
            return await self.app(scope, receive, send)
        body = await _read_body(receive)
        try:
            request = json.loads(body) if body else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            request = None  # vLLM answers malformed JSON itself
        if isinstance(request, dict) and DOCUMENTS_FIELD in request:
            documents = request.pop(DOCUMENTS_FIELD)
            problem = _check_documents(documents)
            if problem:
                return await _error(send, problem)
            if documents:
                self._register(kind, request, documents)
            body = json.dumps(request).encode()
        return await self.app(_with_length(scope, len(body)), _replay(body, receive), send)

    def _register(self, kind: str, request: dict, documents: list[str]) -> None:
        tokenizer = self._load_tokenizer()
        doc_ids = [tokenizer(doc, add_special_tokens=False).input_ids for doc in documents]
        for prompt_ids in _prompts(tokenizer, kind, request):
            self.inbox.put(prompt_ids, doc_ids)

    def _load_tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(os.environ[TOKENIZER_ENV])
        return self._tokenizer


def _prompts(tokenizer, kind: str, request: dict) -> list[list[int]]:
    """The prompt token ids vLLM will run for this body (one per prompt of a batched completion)."""
    if kind == "chat":
        messages = request.get("messages") or []
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=request.get("add_generation_prompt", True),
            continue_final_message=request.get("continue_final_message", False), tokenize=True, return_dict=False,
        )
        return [list(ids)]
    prompt = request.get("prompt")
    add_special = request.get("add_special_tokens", True)
    if isinstance(prompt, str):
        return [tokenizer(prompt, add_special_tokens=add_special).input_ids]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return [prompt]
    if isinstance(prompt, list):
        return [p if isinstance(p, list) else tokenizer(p, add_special_tokens=add_special).input_ids for p in prompt]
    return []


def _check_documents(documents) -> str | None:
    if not isinstance(documents, list) or not all(isinstance(d, str) for d in documents):
        return f"'{DOCUMENTS_FIELD}' must be a list of strings"
    if sum(len(d.encode()) for d in documents) > MAX_DOCUMENTS_BYTES:
        return f"'{DOCUMENTS_FIELD}' holds more than {MAX_DOCUMENTS_BYTES} bytes; send fewer or shorter documents"
    return None


async def _read_body(receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


def _replay(body: bytes, receive):
    """The body once, then the client's own messages (a later `http.disconnect` must still reach vLLM)."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def _with_length(scope, length: int):
    headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
    headers.append((b"content-length", str(length).encode()))
    return {**scope, "headers": headers}


async def _error(send, message: str) -> None:
    body = json.dumps({"error": {"message": message, "type": "BadRequestError", "code": 400}}).encode()
    await send({"type": "http.response.start", "status": 400,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
