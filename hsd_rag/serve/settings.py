"""Server settings: limits, defaults and the deadline, validated once at startup (`hsd-rag serve` flags map here)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from hsd_rag.config import Method


class ServerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_name: str | None = None
    """Name clients pass as `model` and /v1/models lists; None = the model's own name (its folder or hub id)."""
    api_key: str | None = None
    """When set, /v1/* requires `Authorization: Bearer <api_key>`; /health and /metrics stay open."""
    max_queue: int = Field(64, ge=0)
    """Requests that may wait while one generates; one more gets 429 with Retry-After."""
    request_timeout_s: float = Field(600.0, gt=0)
    """Deadline per request, queueing included (a request's `timeout` field can only shorten it)."""
    drain_timeout_s: float = Field(30.0, ge=0)
    """On shutdown, how long running and queued requests may take to finish before they are cancelled."""
    max_prompt_tokens: int | None = Field(None, gt=0)
    """Longest prompt accepted; None = the model's context window."""
    max_documents: int = Field(64, ge=0)
    """Most `documents` per request."""
    max_documents_chars: int = Field(400_000, ge=0)
    """Most characters in all of a request's `documents` together (~100k tokens of English)."""
    max_body_bytes: int = Field(8 * 1024 * 1024, gt=0)
    """Largest request body; larger ones get 413 before they are read."""
    default_max_tokens: int = Field(512, gt=0)
    """Tokens generated when a request gives no max_tokens (capped by the room left in the context window)."""
    default_temperature: float = Field(1.0, ge=0.0)
    """Temperature when a request gives none: OpenAI's default is 1 (sampling); 0 makes the server greedy."""
    default_method: Method | None = None
    """Decoding method when a request gives none; None = the decoder's default (hybrid with a head, else ngram)."""
    default_budget: int | Literal["auto"] = "auto"
    """Draft budget when a request gives none."""
    answer_history: bool = True
    """Draft from earlier answers (any client's generated tokens; outputs never change, only speed). False
    isolates requests completely, e.g. to check that no request's drafts depend on another's (load_test.py)."""
