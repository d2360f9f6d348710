"""HybridSpecDecoder: the public entry point and the decode loop.

The loop is written as numbered steps and never asks which drafter it has:
draft -> truncate to budget -> verify (one target forward) -> accept -> roll back cache -> update drafter.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from pydantic import ValidationError

from hsd_rag.budget import AUTO_MAX_BUDGET, fit_tree
from hsd_rag.config import METHODS, DecodeConfig
from hsd_rag.constrain.rule import grammar_rule
from hsd_rag.drafters.base import DraftContext, Drafter, NoDrafter, StepOutcome
from hsd_rag.drafters.registry import DRAFTER_FACTORIES, NEEDS_HEAD
from hsd_rag.logits_rules import LogitsRuleFactory, build_rules
from hsd_rag.stats import GenerationResult, GenerationStats
from hsd_rag.tree import SOURCE_TARGET, source_names
from hsd_rag.verify import (
    accept,
    cache_kwarg_name,
    forward_tree,
    keep_accepted,
    prefill,
)

Prompt = str | Sequence[dict] | Sequence[int] | torch.Tensor
DrafterFactory = Callable[["HybridSpecDecoder", DecodeConfig], Drafter]


class ContextWindowError(ValueError):
    """The prompt does not fit the model's context window."""


@dataclass
class TokenPiece:
    """One generated token as streamed: its id, the text it added, and who proposed it."""

    token_id: int
    text: str  # may be "" while a multi-byte character is incomplete
    source: str  # "target" (bonus token) or the drafter label(s), e.g. "ngram", "eagle", "ngram+eagle"
    step: int  # which target forward decided it


def _source_label(mask: int) -> str:
    return "+".join(source_names(mask)) or "target"


class GenerationStream:
    """Iterates text pieces; after the loop, `.result` holds the full `GenerationResult` with stats."""

    def __init__(self, pieces: Iterator[TokenPiece], finish: Callable[[], GenerationResult], per_token: bool):
        self._pieces = pieces
        self._finish = finish
        self._per_token = per_token
        self.result: GenerationResult | None = None

    def __iter__(self):
        if self._per_token:
            yield from self._pieces
        else:  # one text piece per target forward
            text, step = "", None
            for piece in self._pieces:
                if piece.step != step and text:
                    yield text
                    text = ""
                text += piece.text
                step = piece.step
            if text:
                yield text
        self.result = self._finish()


class HybridSpecDecoder:
    """Lossless speculative decoding for a Hugging Face causal LM, with drafts from documents and EAGLE heads.

    `generate` returns exactly what the target alone would produce: token-identical under greedy decoding,
    the same distribution under sampling.
    """

    drafter_factories: dict[str, DrafterFactory] = DRAFTER_FACTORIES
    # Per-request logits rules (repetition penalty, grammar constraints), applied in this order.
    logits_rule_factories: tuple[LogitsRuleFactory, ...] = (grammar_rule,)

    def __init__(self, model, tokenizer, *, head=None, default_method: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.head = head
        self.default_method = default_method or ("hybrid" if head is not None else "ngram")
        self._cache_arg = cache_kwarg_name(model)
        self._lock = threading.Lock()
        self.eos_token_ids = self._eos_ids()

    # ---- construction ------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        target=None,
        *,
        head="auto",
        dtype=None,
        device=None,
        **hf_kwargs,
    ) -> HybridSpecDecoder:
        """Load a target and optionally an EAGLE head.

        target: None = the embedded default SmolLM2-135M-Instruct; else a hub id, a local dir or a .gguf file.
        head: "auto" = the head shipped for the default target (none for other targets); None = no head;
        else an EAGLE-3 / EAGLE-1/2 checkpoint dir or hub id.
        """
        from hsd_rag.loading import load_target, shipped_head_dir

        model, tokenizer = load_target(target, dtype=dtype, device=device, **hf_kwargs)
        if head == "auto":
            head = shipped_head_dir() if target is None else None
        head_module = None
        if head is not None:
            from hsd_rag.heads.checkpoint import load_head

            head_module = load_head(head, model)
        return cls(model, tokenizer, head=head_module)

    def _eos_ids(self) -> set[int]:
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        if eos is None:
            eos = self.tokenizer.eos_token_id
        if eos is None:
            return set()
        return {int(e) for e in (eos if isinstance(eos, list | tuple) else [eos])}

    @property
    def context_window(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    # ---- public API --------------------------------------------------------------------------------------

    def generate(self, prompt: Prompt, documents: Sequence[str] | None = None, **kwargs) -> GenerationResult:
        """Generate an answer. `prompt`: chat messages, text, or token ids; `documents`: texts to draft from."""
        stream = self.stream_tokens(prompt, documents, **kwargs)
        for _ in stream:
            pass
        return stream.result

    def stream(self, prompt: Prompt, documents: Sequence[str] | None = None, **kwargs) -> GenerationStream:
        """Like `generate`, yielding text pieces (one per target forward) as they are decided."""
        return self._stream(prompt, documents, kwargs, per_token=False)

    def stream_tokens(self, prompt: Prompt, documents: Sequence[str] | None = None, **kwargs) -> GenerationStream:
        """Like `stream`, yielding one `TokenPiece` per generated token (with its draft source)."""
        return self._stream(prompt, documents, kwargs, per_token=True)

    def config(self, **kwargs) -> DecodeConfig:
        """Validate generation kwargs into a DecodeConfig (unknown names and bad values raise ValueError)."""
        kwargs.setdefault("method", self.default_method)
        try:
            cfg = DecodeConfig(**kwargs)
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'argument'}: {e['msg']}" for e in err.errors())
            raise ValueError(
                f"Invalid generation arguments ({problems}). Valid arguments: {', '.join(DecodeConfig.model_fields)}."
            ) from None
        if cfg.method not in self.available_methods():
            hint = (
                " It needs an EAGLE head: HybridSpecDecoder.from_pretrained(target, head=<dir or hub id>)."
                if cfg.method in NEEDS_HEAD and self.head is None
                else ""
            )
            raise ValueError(
                f"method={cfg.method!r} is not available.{hint} Available: {', '.join(self.available_methods())}."
            )
        return cfg

    def available_methods(self) -> list[str]:
        """Methods this decoder can run: drafts from an EAGLE head only when one is loaded."""
        return [
            m for m in METHODS
            if m == "vanilla" or (m in self.drafter_factories and (self.head is not None or m not in NEEDS_HEAD))
        ]

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """Chat messages get the chat template with the generation prompt; text is tokenized as is."""
        if isinstance(prompt, torch.Tensor):
            ids = prompt.reshape(-1).tolist()
        elif isinstance(prompt, str):
            ids = self.tokenizer(prompt).input_ids
        elif isinstance(prompt, Sequence) and prompt and isinstance(prompt[0], dict):
            if getattr(self.tokenizer, "chat_template", None) is None:
                raise ValueError("This tokenizer has no chat template; pass the prompt as text or token ids.")
            ids = self.tokenizer.apply_chat_template(
                list(prompt), add_generation_prompt=True, tokenize=True, return_dict=False
            )
        elif isinstance(prompt, Sequence) and all(isinstance(t, int) for t in prompt):
            ids = list(prompt)
        else:
            raise TypeError("prompt must be chat messages [{'role', 'content'}], a string, or token ids.")
        if not ids:
            raise ValueError("The prompt is empty.")
        return [int(t) for t in ids]

    def encode_documents(self, documents: Sequence[str] | None) -> list[list[int]]:
        if documents is None:
            return []
        if isinstance(documents, str):
            documents = [documents]
        return [self.tokenizer(d, add_special_tokens=False).input_ids for d in documents if d]

    # ---- the decode loop ---------------------------------------------------------------------------------

    def _stream(self, prompt, documents, kwargs, per_token: bool) -> GenerationStream:
        cfg = self.config(**kwargs)
        prompt_ids = self.encode_prompt(prompt)
        window = self.context_window
        if window is not None and len(prompt_ids) >= window:
            raise ContextWindowError(
                f"The prompt has {len(prompt_ids)} tokens but the model's context window is {window}: "
                "pass fewer or shorter documents, or a shorter question."
            )
        doc_ids = self.encode_documents(documents)
        state: dict = {}
        pieces = self._pieces(prompt_ids, doc_ids, cfg, state)
        return GenerationStream(pieces, lambda: state["result"], per_token)

    def _make_drafter(self, cfg: DecodeConfig) -> Drafter:
        if cfg.method == "vanilla":
            return NoDrafter()
        return self.drafter_factories[cfg.method](self, cfg)

    def _budget(self, cfg: DecodeConfig):
        """(max drafts per forward, cost profile or None): "auto" sizes each tree by expected tokens per second."""
        if cfg.budget == "auto":
            from hsd_rag.bench.tuning import cost_profile

            return AUTO_MAX_BUDGET, cost_profile(self)
        return cfg.budget, None

    def _steps(self, prompt_ids: list[int], doc_ids: list[list[int]], cfg: DecodeConfig, stats: GenerationStats):
        """Yield (new_tokens, source_masks) per target forward until max_new_tokens or EOS."""
        budget, profile = self._budget(cfg)
        min_score = 0.0 if profile is None else profile.min_useful_score(budget)
        window = self.context_window or (len(prompt_ids) + cfg.max_new_tokens + budget + 1)
        max_new = min(cfg.max_new_tokens, window - len(prompt_ids))
        generator = None
        if not cfg.greedy and cfg.seed is not None:
            generator = torch.Generator(device=self.model.device).manual_seed(cfg.seed)
        cache = self._new_cache()
        drafter = self._make_drafter(cfg)
        rules = build_rules(self.logits_rule_factories, self, cfg)
        try:
            drafter.start(prompt_ids, doc_ids)
            for rule in rules:
                rule.start(prompt_ids)
            t0 = time.perf_counter()
            # 0. prefill everything but the last prompt token, which becomes the first root
            prefill(self.model, cache, prompt_ids[:-1], self._cache_arg)
            stats.prefill_s = time.perf_counter() - t0
            tokens = list(prompt_ids)
            past = len(prompt_ids) - 1
            generated = 0
            while generated < max_new:
                t_step = time.perf_counter()
                # 1. draft a tree rooted at the pending token, 2. keep the best `budget` nodes
                step_budget = max(0, min(budget, max_new - generated - 1, window - past - 1))
                context = DraftContext(tokens, len(prompt_ids), step_budget, min_score)
                tree = drafter.propose(context)
                for rule in rules:
                    tree = rule.refine(tree)
                tree = tree.truncate(step_budget) if profile is None else fit_tree(tree, profile, step_budget)
                t_draft = time.perf_counter()
                # 3. verify every node in one target forward, 4. accept
                logits = forward_tree(self.model, cache, tree, past, self._cache_arg)
                for rule in rules:
                    logits = rule.apply(tree, logits, tokens)
                acc = accept(tree, logits, cfg, generator)
                t_verify = time.perf_counter()
                # 5. roll the cache back to the accepted path
                keep_accepted(cache, past, acc.nodes)
                past += len(acc.nodes)
                new_tokens = [tree.tokens[n] for n in acc.nodes[1:]] + [acc.bonus_token]
                sources = [tree.sources[n] for n in acc.nodes[1:]] + [SOURCE_TARGET]
                # 6. tell the drafter what the target decided
                drafter.observe(StepOutcome(tree, acc.nodes, new_tokens))
                for rule in rules:
                    rule.advance(new_tokens)
                tokens.extend(new_tokens)
                self._count(stats, tree, acc.nodes)
                stats.draft_s += t_draft - t_step
                stats.verify_s += t_verify - t_draft
                stats.other_s += time.perf_counter() - t_verify
                new_tokens, sources, stop = self._clip(new_tokens, sources, max_new - generated)
                generated += len(new_tokens)
                stats.new_tokens = generated
                yield new_tokens, sources
                if stop:
                    stats.stop_reason = "eos"
                    return
            stats.stop_reason = "length" if max_new == cfg.max_new_tokens else "context_window"
        finally:
            drafter.close()

    def _clip(self, new_tokens: list[int], sources: list[int], room: int):
        """Cut a step's tokens at the first EOS (kept, as HF generate keeps it) and at max_new_tokens."""
        for i, token in enumerate(new_tokens[:room]):
            if token in self.eos_token_ids:
                return new_tokens[: i + 1], sources[: i + 1], True
        return new_tokens[:room], sources[:room], False

    @staticmethod
    def _count(stats: GenerationStats, tree, accepted_nodes: list[int]) -> None:
        stats.steps += 1
        stats.tree_nodes += tree.num_drafts
        for node in range(1, len(tree)):
            for name in source_names(tree.sources[node]):
                stats.drafted_by_source[name] += 1
        for node in accepted_nodes[1:]:
            for name in source_names(tree.sources[node]):
                stats.accepted_by_source[name] += 1
        stats.accepted_by_depth[len(accepted_nodes) - 1] += 1

    def _new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def _pieces(self, prompt_ids, doc_ids, cfg: DecodeConfig, state: dict) -> Iterator[TokenPiece]:
        """Turn decided tokens into text pieces, honouring stop strings; store the final result in `state`."""
        stats = GenerationStats(prompt_tokens=len(prompt_ids))
        out_ids: list[int] = []
        out_sources: list[str] = []
        emitted = ""  # text already yielded
        stops = cfg.stop or []
        hold = max((len(s) for s in stops), default=1) - 1  # chars that could still become a stop string
        t0 = time.perf_counter()
        final_text = None
        steps = self._steps(prompt_ids, doc_ids, cfg, stats)
        with self._lock, torch.inference_mode():
            for step, (new_tokens, masks) in enumerate(steps):
                for token, mask in zip(new_tokens, masks, strict=True):
                    out_ids.append(token)
                    out_sources.append(_source_label(mask))
                    text = self.tokenizer.decode(out_ids, skip_special_tokens=True)
                    cut = min((i for s in stops if (i := text.find(s)) >= 0), default=None)
                    if cut is not None:
                        final_text = text[:cut]
                        if len(final_text) > len(emitted):
                            yield TokenPiece(token, final_text[len(emitted) :], out_sources[-1], step)
                        stats.stop_reason = "stop_string"
                        break
                    safe = len(text) - (hold if stops else 0)
                    if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next token
                        safe = min(safe, len(text) - 1)
                    delta = text[len(emitted) : max(safe, len(emitted))]
                    emitted += delta
                    yield TokenPiece(token, delta, out_sources[-1], step)
                if final_text is not None:
                    break
            steps.close()  # runs the drafter's cleanup now, also when a stop string ended the loop early
        if final_text is None:
            final_text = self.tokenizer.decode(out_ids, skip_special_tokens=True)
            if len(final_text) > len(emitted):  # flush held-back characters
                yield TokenPiece(out_ids[-1], final_text[len(emitted) :], out_sources[-1], stats.steps - 1)
        stats.total_s = time.perf_counter() - t0
        state["result"] = GenerationResult(final_text, out_ids, out_sources, stats)

