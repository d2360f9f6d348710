"""HybridSpecDecoder: the public entry point and the decode loop.

The loop is written as numbered steps and never asks which drafter it has:
draft -> truncate to budget -> verify (one target forward) -> accept -> roll back cache -> update drafter.

Each step runs holding the model's gate (hsd_rag.model_gate) and inside `torch.inference_mode()`; both are
released before the step's tokens are handed to the consumer, so a slow, paused or abandoned stream never
blocks another request, and inference mode never leaks into the caller's code.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from pydantic import ValidationError

from hsd_rag.attention_layout import AttentionLayout
from hsd_rag.budget import AUTO_MAX_BUDGET, fit_tree
from hsd_rag.config import METHODS, DecodeConfig
from hsd_rag.constrain.rule import grammar_rule
from hsd_rag.drafters.answer_history import AnswerHistory
from hsd_rag.drafters.base import DraftContext, Drafter, NoDrafter, StepOutcome, skip_prefix_features
from hsd_rag.drafters.registry import DRAFTER_FACTORIES, NEEDS_HEAD
from hsd_rag.generation_defaults import UNSUPPORTED_GENERATE_SETTINGS, check_supported, resolve
from hsd_rag.logits_rules import LogitsRuleFactory, build_rules
from hsd_rag.model_gate import gate_for
from hsd_rag.prefix_cache import PrefixCache, weights_key
from hsd_rag.repetition_penalty import repetition_penalty_rule
from hsd_rag.stats import GenerationResult, GenerationStats
from hsd_rag.streaming_text import StreamingText, byte_fallback_ids
from hsd_rag.tree import SOURCE_TARGET, source_names
from hsd_rag.verify import accept, cache_kwarg_name, forward_tree, prefill

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
    """Iterates text pieces; after the loop, `.result` holds the full `GenerationResult` with stats.

    Stopping early (`break`, `close()`, leaving a `with` block, or dropping the stream) ends the generation at
    once and frees its cache; no lock is ever held between pieces.
    """

    def __init__(self, pieces: Iterator[TokenPiece], state: dict, per_token: bool):
        self._pieces = pieces
        self._state = state
        self._per_token = per_token

    @property
    def result(self) -> GenerationResult | None:
        """The finished generation (None until the stream was iterated to its end)."""
        return self._state.get("result")

    def __iter__(self):
        try:
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
        finally:
            self._pieces.close()

    def close(self) -> None:
        """Stop the generation now (a no-op once it finished)."""
        self._pieces.close()

    def __enter__(self) -> GenerationStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class HybridSpecDecoder:
    """Lossless speculative decoding for a Hugging Face causal LM, with drafts from documents and EAGLE heads.

    `generate` returns exactly what `model.generate` would produce for the same settings: token-identical under
    greedy decoding, the same distribution under sampling. The checkpoint's `generation_config` supplies
    do_sample / temperature / top_k / top_p / min_p / repetition_penalty where the call leaves them unset, as
    in `generate`; generation_config settings hsd_rag does not implement raise ValueError (hsd_rag.
    generation_defaults). Full-attention and sliding-window layers (also interleaved, e.g. Gemma-2/3) work.

    Thread-safe: every decoder on one model shares the model's FIFO gate, taken one step at a time.
    `prefix_cache` (on by default) copies the KV rows of a prompt prefix an earlier request already prefilled
    instead of computing them again (hsd_rag.prefix_cache); False turns it off.
    """

    drafter_factories: dict[str, DrafterFactory] = DRAFTER_FACTORIES
    # Per-request logits rules (repetition penalty, grammar constraints), applied in this order.
    logits_rule_factories: tuple[LogitsRuleFactory, ...] = (repetition_penalty_rule, grammar_rule)

    def __init__(self, model, tokenizer, *, head=None, default_method: str | None = None,
                 answer_history: AnswerHistory | None = None, prefix_cache: PrefixCache | bool = True):
        self.model = model
        self.tokenizer = tokenizer
        self.head = head
        # earlier answers, an n-gram draft source (bounded; generated tokens only); per-call `answer_history=False`
        self.answer_history = answer_history if answer_history is not None else AnswerHistory()
        self.default_method = default_method or ("hybrid" if head is not None else "ngram")
        # KV rows of recent prompts, so a shared prefix (system prompt, template) is not prefilled again
        if prefix_cache is True:
            prefix_cache = PrefixCache()
        self.prefix_cache: PrefixCache | None = None if prefix_cache is False else prefix_cache
        # whether asking a costly source (the head) pays, learned across requests (drafters/source_gate.py)
        self.source_gates: dict = {}
        self.layout = AttentionLayout.of(model)  # unsupported attention kinds fail here, not mid-generation
        self.gate = gate_for(model)  # shared by every decoder on this model
        self._cache_arg = cache_kwarg_name(model)
        self._byte_ids = byte_fallback_ids(tokenizer)
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
        prefix_cache: PrefixCache | bool = True,
        **hf_kwargs,
    ) -> HybridSpecDecoder:
        """Load a target and optionally an EAGLE head.

        target: None = the embedded default SmolLM2-135M-Instruct; else a hub id, a local dir or a .gguf file.
        head: "auto" = the head shipped for the default target (none for other targets); None = no head;
        else an EAGLE-3 / EAGLE-1/2 checkpoint dir or hub id.
        prefix_cache: reuse the KV rows of prompt prefixes earlier requests prefilled (True: the default
        PrefixCache; False: off; or a PrefixCache of your own size).
        Other keywords go to `hsd_rag.loading.load_target` (e.g. `fast_cpu_kernels=False` keeps transformers' stock
        CPU kernels) and on to `from_pretrained`.
        """
        from hsd_rag.loading import load_target, shipped_head_dir

        model, tokenizer = load_target(target, dtype=dtype, device=device, **hf_kwargs)
        if head == "auto":
            head = shipped_head_dir() if target is None else None
        head_module = None
        if head is not None:
            from hsd_rag.heads.checkpoint import load_head

            head_module = load_head(head, model)
        return cls(model, tokenizer, head=head_module, prefix_cache=prefix_cache)

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
        """Generate an answer. `prompt`: chat messages, text, or token ids ([T] or [1, T]); `documents`: texts to
        draft from. Keyword arguments are DecodeConfig's; sampling settings left unset come from the model's
        generation_config exactly as in `model.generate` (see the class docstring)."""
        stream = self.stream_tokens(prompt, documents, **kwargs)
        for _ in stream:
            pass
        return stream.result

    def stream(self, prompt: Prompt, documents: Sequence[str] | None = None, **kwargs) -> GenerationStream:
        """Like `generate`, yielding text pieces (one per target forward) as they are decided.

        Nothing is held between pieces: a paused or abandoned stream blocks no other request, and `break`,
        `close()` or leaving `with dec.stream(...) as s:` ends the generation and frees its cache at once."""
        return self._stream(prompt, documents, kwargs, per_token=False)

    def stream_tokens(self, prompt: Prompt, documents: Sequence[str] | None = None, **kwargs) -> GenerationStream:
        """Like `stream`, yielding one `TokenPiece` per generated token (with its draft source)."""
        return self._stream(prompt, documents, kwargs, per_token=True)

    def config(self, **kwargs) -> DecodeConfig:
        """Validate generation kwargs into a DecodeConfig with every sampling setting decided (unset ones from
        the model's generation_config, as HF generate); unknown names and bad values raise ValueError."""
        kwargs.setdefault("method", self.default_method)
        hf_only = sorted(set(kwargs) & UNSUPPORTED_GENERATE_SETTINGS)
        if hf_only:
            raise ValueError(
                f"{', '.join(hf_only)}: transformers generate() setting(s) that hsd_rag does not implement. "
                f"Supported arguments: {', '.join(DecodeConfig.model_fields)}."
            )
        try:
            cfg = DecodeConfig(**kwargs)
        except ValidationError as err:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'argument'}: {e['msg']}" for e in err.errors())
            raise ValueError(
                f"Invalid generation arguments ({problems}). Valid arguments: {', '.join(DecodeConfig.model_fields)}."
            ) from None
        cfg = resolve(cfg, getattr(self.model, "generation_config", None), prompt_length=None)
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
            if prompt.dim() == 2 and prompt.shape[0] != 1 or prompt.dim() not in (1, 2):
                raise ValueError(
                    f"A token-id tensor prompt must be [T] or [1, T], got shape {list(prompt.shape)}: batched prompts "
                    "are not supported. Call generate once per prompt (concurrent calls from threads are fine)."
                )
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
        check_supported(getattr(self.model, "generation_config", None), not cfg.greedy, len(prompt_ids))
        window = self.context_window
        if window is not None and len(prompt_ids) >= window:
            raise ContextWindowError(
                f"The prompt has {len(prompt_ids)} tokens but the model's context window is {window}: "
                "pass fewer or shorter documents, or a shorter question."
            )
        doc_ids = self.encode_documents(documents)
        state: dict = {}
        return GenerationStream(self._pieces(prompt_ids, doc_ids, cfg, state), state, per_token)

    def _make_drafter(self, cfg: DecodeConfig) -> Drafter:
        if cfg.method == "vanilla":
            return NoDrafter()
        return self.drafter_factories[cfg.method](self, cfg)

    def _budget(self, cfg: DecodeConfig):
        """(max drafts per forward, the device's cost profile, whether the profile sizes each tree): "auto" sizes
        each tree by expected tokens per second; a fixed budget still uses the profile's drafting costs."""
        from hsd_rag.tuning import cost_profile

        if cfg.budget == "auto":
            return AUTO_MAX_BUDGET, cost_profile(self), True
        return cfg.budget, cost_profile(self), False

    @contextmanager
    def _computing(self, request: object, stats: GenerationStats):
        """Hold the model (FIFO, shared by every decoder on it) and inference mode for one step's work."""
        with self.gate.hold(request) as waited, torch.inference_mode():
            stats.queue_s += waited
            yield

    def _steps(self, prompt_ids: list[int], doc_ids: list[list[int]], cfg: DecodeConfig, stats: GenerationStats):
        """Yield (new_tokens, source_masks) per target forward until max_new_tokens or EOS."""
        budget, profile, auto = self._budget(cfg)
        min_score = profile.min_useful_score(budget) if auto else 0.0
        window = self.context_window or (len(prompt_ids) + cfg.max_new_tokens + budget + 1)
        max_new = min(cfg.max_new_tokens, window - len(prompt_ids))
        generator = None
        if not cfg.greedy and cfg.seed is not None:
            generator = torch.Generator(device=self.model.device).manual_seed(cfg.seed)
        drafter = self._make_drafter(cfg)
        rules = build_rules(self.logits_rule_factories, self, cfg)
        request = object()  # who holds the gate: feature hooks record only their own request's forwards
        try:
            with self._computing(request, stats):
                cache = self.layout.new_cache()
                drafter.start(prompt_ids, doc_ids)  # may attach feature hooks: must run holding the gate
                for rule in rules:
                    rule.start(prompt_ids)
                t0 = time.perf_counter()
                # 0. prefill everything but the last prompt token, which becomes the first root (after any
                # prefix an earlier request already prefilled)
                reuse = self.prefix_cache is not None and self.layout.keeps_every_row
                cached = self.prefix_cache.restore(prompt_ids[:-1], cache, weights_key(self.model)) if reuse else 0
                if cached:
                    skip_prefix_features(drafter, cached)
                prefill(self.model, cache, prompt_ids[cached:-1], self._cache_arg)
                if reuse:
                    self.prefix_cache.store(prompt_ids[:-1], cache)
                self.layout.trim(cache)
                stats.prefill_s = time.perf_counter() - t0
                stats.cached_prompt_tokens = cached
            tokens = list(prompt_ids)
            answer: list[int] = []  # what the caller gets (cut at EOS / max_new_tokens)
            past = len(prompt_ids) - 1
            generated = 0
            while generated < max_new:
                with self._computing(request, stats):
                    t_step = time.perf_counter()
                    # 1. draft a tree rooted at the pending token, 2. keep the best `budget` nodes
                    step_budget = max(0, min(budget, max_new - generated - 1, window - past - 1))
                    context = DraftContext(tokens, len(prompt_ids), step_budget, min_score, profile, auto)
                    tree = drafter.propose(context)
                    for rule in rules:
                        tree = rule.refine(tree)
                    tree = fit_tree(tree, profile, step_budget) if auto else tree.truncate(step_budget)
                    t_draft = time.perf_counter()
                    # 3. verify every node in one target forward, 4. accept
                    logits = forward_tree(self.model, cache, tree, past, self._cache_arg, self.layout)
                    for rule in rules:
                        logits = rule.apply(tree, logits, tokens)
                    acc = accept(tree, logits, cfg, generator)
                    t_verify = time.perf_counter()
                    # 5. roll the cache back to the accepted path
                    self.layout.keep_accepted(cache, len(tree), acc.nodes)
                    past += len(acc.nodes)
                    new_tokens = [tree.tokens[n] for n in acc.nodes[1:]] + [acc.bonus_token]
                    sources = [tree.sources[n] for n in acc.nodes[1:]] + [SOURCE_TARGET]
                    # 6. tell the drafter what the target decided
                    drafter.observe(StepOutcome(tree, acc.nodes, new_tokens))
                    for rule in rules:
                        rule.advance(new_tokens)
                    tokens.extend(new_tokens)
                    self._count_verified(stats, tree)
                    self._count_calibration(stats, tree, acc.nodes)
                    stats.draft_s += t_draft - t_step
                    stats.verify_s += t_verify - t_draft
                    stats.other_s += time.perf_counter() - t_verify
                new_tokens, sources, stop = self._clip(new_tokens, sources, max_new - generated)
                answer.extend(new_tokens)
                generated += len(new_tokens)
                yield new_tokens, sources  # the gate and inference mode are released here
                if stop:
                    stats.stop_reason = "eos"
                    self._remember(cfg, answer)
                    return
            stats.stop_reason = "length" if max_new == cfg.max_new_tokens else "context_window"
            self._remember(cfg, answer)
        finally:
            drafter.close()  # also when the consumer abandoned the stream (see FeatureCapture.detach)

    def _remember(self, cfg: DecodeConfig, answer_ids: list[int]) -> None:
        """A finished answer joins the earlier-answers index (only generated tokens, never prompts/documents)."""
        if cfg.answer_history:
            self.answer_history.add(answer_ids)

    def _clip(self, new_tokens: list[int], sources: list[int], room: int):
        """Cut a step's tokens at the first EOS (kept, as HF generate keeps it) and at max_new_tokens."""
        for i, token in enumerate(new_tokens[:room]):
            if token in self.eos_token_ids:
                return new_tokens[: i + 1], sources[: i + 1], True
        return new_tokens[:room], sources[:room], False

    @staticmethod
    def _count_verified(stats: GenerationStats, tree) -> None:
        """Per target forward: the step and every draft it verified (accepted ones are counted as emitted)."""
        stats.steps += 1
        stats.tree_nodes += tree.num_drafts
        for node in range(1, len(tree)):
            for name in source_names(tree.sources[node]):
                stats.drafted_by_source[name] += 1

    @staticmethod
    def _count_calibration(stats: GenerationStats, tree, accepted_nodes: list[int]) -> None:
        """Calibration check: every decided draft (its parent was accepted), predicted vs accepted."""
        accepted = set(accepted_nodes)
        for node in range(1, len(tree)):
            parent = tree.parents[node]
            if parent in accepted:
                parent_score = tree.scores[parent] if parent else 1.0
                predicted = min(1.0, tree.scores[node] / parent_score) if parent_score > 0 else 0.0
                stats.add_reliability(_source_label(tree.sources[node]), predicted, node in accepted)

    def _new_cache(self):
        """An empty KV cache this decoder's loop can roll back (see AttentionLayout)."""
        return self.layout.new_cache()

    def _pieces(self, prompt_ids, doc_ids, cfg: DecodeConfig, state: dict) -> Iterator[TokenPiece]:
        """Turn decided tokens into text pieces, honouring stop strings; store the final result in `state`.

        Stats count what the output holds: tokens cut by EOS, max_new_tokens or a stop string are not counted as
        accepted; `total_s` is compute time, without the time spent queued for the model (`queue_s`) or in the
        consumer's hands between pieces.
        """
        stats = GenerationStats(prompt_tokens=len(prompt_ids))
        text = StreamingText(self.tokenizer, cfg.stop, self._byte_ids)
        out_sources: list[str] = []
        busy, resumed = 0.0, time.perf_counter()
        steps = self._steps(prompt_ids, doc_ids, cfg, stats)
        try:
            for step, (new_tokens, masks) in enumerate(steps):
                kept_drafts = 0
                for token, mask in zip(new_tokens, masks, strict=True):
                    delta = text.push(token)
                    out_sources.append(_source_label(mask))
                    stats.new_tokens = len(text.ids)
                    for name in source_names(mask):
                        stats.accepted_by_source[name] += 1
                    kept_drafts += mask != SOURCE_TARGET
                    busy += time.perf_counter() - resumed
                    yield TokenPiece(token, delta, out_sources[-1], step)
                    resumed = time.perf_counter()
                    if text.stopped:
                        break
                stats.accepted_by_depth[kept_drafts] += 1
                if text.stopped:
                    stats.stop_reason = "stop_string"
                    break
        finally:
            steps.close()  # runs the drafter's cleanup now, also when a stop string or the consumer ended the loop
        rest = text.finish()
        busy += time.perf_counter() - resumed
        stats.total_s = max(0.0, busy - stats.queue_s)
        state["result"] = GenerationResult(text.text, list(text.ids), out_sources, stats)
        if rest:  # characters held back until the end (an incomplete character, a possible stop string)
            yield TokenPiece(text.ids[-1], rest, out_sources[-1], stats.steps - 1)
