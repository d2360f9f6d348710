"""The grammar engine behind constrained decoding: xgrammar, one compiler per decoder, grammars compiled once.

Why xgrammar (measured against llguidance 1.9.1 on the default SmolLM2 vocabulary, 49,152 tokens, one CPU
thread, `time.thread_time`, median of 200 runs; scripts in the issue-13 report):

| | xgrammar 0.2.9 | llguidance 1.9.1 |
|---|---|---|
| tokenizer info (once per model) | 0.13 s | 0.39 s |
| compile a 6-field JSON schema | 4.8 ms (cached after: 0.09 ms) | 1.2 ms (lazy; again 0.9 ms) |
| mask for one state | 2 us (max 0.1 ms) | 10 us (max 1.6 ms) |
| masks of all 33 nodes of a draft tree | 48 us (`traverse_draft_tree`, one C++ call) | 360 us (Python DFS) |
| rollback / fork | yes / yes | yes / yes (`deep_copy`) |
| forced tokens for drafting | `find_jump_forward_tokens` | `compute_ff_tokens` |
| install | 16 MB + `apache-tvm-ffi`; pulls `triton` (~1 GB) on Linux x86-64, unused on CPU | 7.7 MB, no deps |

Both leave torch/transformers/numpy untouched (`pip install --dry-run`). xgrammar wins on what runs every
step: it masks a whole draft tree along each node's own path in one call (the exact operation this package
needs), 7x faster than walking the tree in Python over llguidance, and it is the default grammar backend of
vLLM and SGLang. Its cost is the install footprint (triton); llguidance would be the choice where that matters
more than per-step time.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence

import torch

from hsd_rag.constrain.formats import Grammar, JsonObject, JsonSchema, Regex, StructuralTag

try:
    import xgrammar as xgr
except ImportError as error:  # an optional dependency: only constrained generations need it
    raise ImportError(
        "Constrained decoding (response_format, tools, with_structured_output) needs the optional package "
        "`xgrammar`: `pip install 'hsd-rag[structured]'` (or `pip install xgrammar`)."
    ) from error

COMPILER_THREADS = 2  # grammar compilation runs once per schema; more threads would only contend with decoding
JSON_OBJECT_SCHEMA = {"type": "object"}  # JSON mode: any object (compact, like JsonSchema's default)


class GrammarCompileError(ValueError):
    """A response format that the grammar engine cannot compile (bad schema, regex or EBNF)."""


class GrammarEngine:
    """A model's vocabulary as the grammar engine sees it, and a cache of compiled grammars.

    `vocab_size` is the width of the model's logits (it may exceed the tokenizer's vocabulary, padded rows are
    never allowed); `stop_token_ids` are the ids that end a generation: the only ones allowed once the output
    is complete.
    """

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Sequence[int]):
        if not stop_token_ids:
            raise ValueError(
                "Constrained decoding needs an end-of-sequence token: set model.generation_config.eos_token_id."
            )
        if not callable(getattr(tokenizer, "get_vocab", None)):
            raise ValueError(
                f"Constrained decoding needs a Hugging Face tokenizer (with get_vocab), got {type(tokenizer).__name__}."
            )
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self.info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=self.stop_token_ids
        )
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=COMPILER_THREADS, cache_enabled=True)
        # ids no grammar ever accepts (padding rows, special tokens): drafts of them are dropped without asking
        self.never_allowed = frozenset(self.info.special_token_ids) - frozenset(self.stop_token_ids)
        self._compiled: dict[str, xgr.CompiledGrammar] = {}
        self._lock = threading.Lock()

    def compile(self, fmt) -> xgr.CompiledGrammar:
        """The compiled grammar of a response format (compiled on first use, then cached)."""
        key = fmt.cache_key()
        with self._lock:
            compiled = self._compiled.get(key)
        if compiled is None:
            try:
                compiled = self._compile(fmt)
            except (RuntimeError, ValueError, TypeError) as error:
                raise GrammarCompileError(f"Cannot compile the {fmt.type} response format: {error}") from None
            with self._lock:
                self._compiled[key] = compiled
        return compiled

    def _compile(self, fmt) -> xgr.CompiledGrammar:
        if isinstance(fmt, JsonSchema):
            return self.compiler.compile_json_schema(fmt.json_schema, any_whitespace=fmt.any_whitespace)
        if isinstance(fmt, JsonObject):
            return self.compiler.compile_json_schema(JSON_OBJECT_SCHEMA, any_whitespace=fmt.any_whitespace)
        if isinstance(fmt, Regex):
            return self.compiler.compile_regex(fmt.pattern)
        if isinstance(fmt, Grammar):
            return self.compiler.compile_grammar(fmt.ebnf)
        if isinstance(fmt, StructuralTag):
            return self.compiler.compile_structural_tag({"type": "structural_tag", "format": fmt.format})
        raise TypeError(f"Unknown response format {fmt!r}")

    def matcher(self, compiled: xgr.CompiledGrammar) -> xgr.GrammarMatcher:
        """A fresh per-request matcher (its state: the tokens generated so far)."""
        return xgr.GrammarMatcher(compiled)

    def full_bitmask(self, rows: int, pinned: bool = False) -> torch.Tensor:
        """[rows, ceil(V/32)] int32 on the CPU, every token allowed; `pinned` for asynchronous copies to a GPU."""
        bitmask = xgr.allocate_token_bitmask(rows, self.vocab_size)
        return bitmask.pin_memory() if pinned else bitmask

    @staticmethod
    def reset_bitmask(bitmask: torch.Tensor) -> None:
        """Allow every token again (a reused buffer)."""
        xgr.reset_token_bitmask(bitmask)

    def apply_bitmask(self, logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
        """Set disallowed logits to -inf in place (xgrammar's CPU / CUDA kernels); returns `logits`."""
        if bitmask.device != logits.device:
            bitmask = bitmask.to(logits.device, non_blocking=True)  # host -> device copy, no host sync
        xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=self.vocab_size)
        if logits.shape[-1] > self.vocab_size:  # logits wider than the engine's vocabulary: never allowed
            logits[..., self.vocab_size :] = float("-inf")
        return logits


_engines: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_engines_lock = threading.Lock()


def logits_width(model) -> int:
    """The number of logits the model emits per position (its output embedding rows)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def engine_for(decoder) -> GrammarEngine:
    """The decoder's grammar engine, built on first use (~0.1-0.4 s for a 50k vocabulary) and kept with it."""
    with _engines_lock:
        engine = _engines.get(decoder)
        if engine is None:
            engine = GrammarEngine(decoder.tokenizer, logits_width(decoder.model), decoder.eos_token_ids)
            _engines[decoder] = engine
        return engine
