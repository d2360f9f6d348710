"""What one generation did: τ, steps, tokens per source, and where the wall time went."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields

RELIABILITY_BINS = 10  # equal-width bins of predicted acceptance in [0, 1]


@dataclass
class GenerationStats:
    """Counters of one generation. `steps` counts target forwards after the prefill.

    Token counts describe the returned output: `new_tokens == len(token_ids)`, and `accepted_by_source` /
    `accepted_by_depth` count only drafts that are in it (none after an EOS, max_new_tokens or a stop string),
    so `new_tokens == sum(d * accepted_by_depth[d]) + bonus tokens`. Times: `total_s` is the generation's own
    compute time (prefill + steps + text); `queue_s`, counted apart, is the time spent waiting for the model
    while other requests used it. Time the consumer of a stream spends between pieces is in neither.
    """

    steps: int = 0
    new_tokens: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # leading prompt tokens whose KV rows came from an earlier request (not prefilled)
    drafted_by_source: dict[str, int] = field(default_factory=Counter)  # draft nodes verified, per source label
    accepted_by_source: dict[str, int] = field(default_factory=Counter)  # accepted draft tokens, per source label
    accepted_by_depth: dict[int, int] = field(default_factory=Counter)  # steps whose accepted path reached depth d
    tree_nodes: int = 0  # draft nodes verified, all steps together
    # Calibration check per source label: for every decided draft (its parent was accepted), its predicted
    # acceptance (node score / parent score) binned in RELIABILITY_BINS: [sum of predictions, accepted, count].
    reliability: dict[str, list[list[float]]] = field(default_factory=dict)
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    other_s: float = 0.0
    total_s: float = 0.0
    queue_s: float = 0.0
    stop_reason: str = ""  # "eos", "length", "stop_string" or "context_window"

    def add_reliability(self, label: str, predicted: float, accepted: bool) -> None:
        bins = self.reliability.setdefault(label, [[0.0, 0, 0] for _ in range(RELIABILITY_BINS)])
        cell = bins[min(int(predicted * RELIABILITY_BINS), RELIABILITY_BINS - 1)]
        cell[0] += predicted
        cell[1] += int(accepted)
        cell[2] += 1

    @property
    def tau(self) -> float:
        """Mean tokens per target forward (accepted drafts + the bonus token)."""
        return self.new_tokens / self.steps if self.steps else 0.0

    @property
    def tokens_per_s(self) -> float:
        """Decode throughput, prefill excluded."""
        decode = self.total_s - self.prefill_s
        return self.new_tokens / decode if decode > 0 else 0.0

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        for key in ("drafted_by_source", "accepted_by_source", "accepted_by_depth"):
            out[key] = dict(out[key])
        out["tau"] = self.tau
        out["tokens_per_s"] = self.tokens_per_s
        return out


@dataclass
class GenerationResult:
    """The generated text and tokens (prompt excluded), each token's source label, and the stats."""

    text: str
    token_ids: list[int]
    token_sources: list[str]  # per generated token: "target" or the drafter names joined by "+"
    stats: GenerationStats
