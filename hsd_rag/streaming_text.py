"""Generated token ids -> text pieces safe to show, in O(1) decoding work per token.

Decoding the whole output again for every token costs O(n^2) per request. Like HF's TextStreamer and vLLM's
incremental detokenizer, we decode only a short window: the tokens since the last piece was released plus the
ones before it as context (`decode(window)` minus `decode(context)` is the new text, leading-space rules
included). Text is held back while it may still change or end up cut:
- an incomplete UTF-8 character: the window's text ends with U+FFFD, or its last token is a byte-fallback token
  (`<0xE2>` in Llama-2/Mistral/Gemma SentencePiece vocabularies), whose byte group HF decodes as a whole;
- the last `len(stop) - 1` characters, which could still begin a stop string.
Stop strings are searched in the not-yet-released text only (released text can never start one), and the joined
pieces always equal the final text: `decode(all ids)`, cut before the first stop string.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
REPLACEMENT_CHAR = "\ufffd"


def byte_fallback_ids(tokenizer) -> frozenset[int]:
    """Ids of the `<0xXX>` byte tokens of a SentencePiece-style vocabulary (empty for byte-level BPE)."""
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if not callable(get_vocab):
        return frozenset()
    return frozenset(i for token, i in get_vocab().items() if BYTE_TOKEN.fullmatch(token))


class StreamingText:
    """Feed token ids with `push`; each returns the text now safe to show. `finish` returns the rest."""

    def __init__(self, tokenizer, stops: Sequence[str] | None = None, byte_ids: frozenset[int] = frozenset()):
        self.tokenizer = tokenizer
        self.stops = [s for s in (stops or []) if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1  # chars that could begin a stop string
        self.byte_ids = byte_ids
        self.ids: list[int] = []
        self.stopped = False  # a stop string was found; `text` ends before it
        self._context = 0  # window start: tokens before `_read` are context only
        self._read = 0  # tokens before this index have been turned into decided text
        self._context_text = ""
        self._pending = ""  # decided text not yet released (held back for stop strings)
        self._released: list[str] = []

    @property
    def text(self) -> str:
        """Everything released so far (the final text once `finish` ran or a stop string was found)."""
        return "".join(self._released)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """Add one generated token; returns the newly safe text (often "" while text is held back)."""
        if self.stopped:
            raise RuntimeError("StreamingText.push after a stop string ended the text.")
        self.ids.append(int(token_id))
        window = self._decode(self.ids[self._context :])
        fresh = window[len(self._context_text) :] if len(window) > len(self._context_text) else ""
        candidate = self._pending + fresh
        cut = min((i for s in self.stops if (i := candidate.find(s)) >= 0), default=None)
        if cut is not None:
            self.stopped = True
            return self._release(candidate[:cut])
        complete = fresh and not window.endswith(REPLACEMENT_CHAR) and self.ids[-1] not in self.byte_ids
        if not complete:
            return ""
        self._pending = candidate
        self._context, self._read = self._read, len(self.ids)
        self._context_text = self._decode(self.ids[self._context : self._read])
        safe = len(self._pending) - self.hold
        if safe <= 0:
            return ""
        piece, self._pending = self._pending[:safe], self._pending[safe:]
        return self._release(piece)

    def finish(self) -> str:
        """The text still held back, once no token follows; after it `text` is the final text."""
        if self.stopped:
            return ""
        released = self.text
        final = self._decode(self.ids)
        if not final.startswith(released):  # a tokenizer whose decode is not prefix-stable: never lose text
            final = released + self._pending + self._decode(self.ids[self._read :])
        return self._release(final[len(released) :])

    def _release(self, piece: str) -> str:
        if piece:
            self._released.append(piece)
        return piece
