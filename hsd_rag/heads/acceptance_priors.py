"""How often a head's drafts are accepted, per (depth, head-probability bucket): priors stored beside the head.

`hsd-rag eval-head --write-priors` measures them with real EAGLE decoding on prompts the head never trained on
and writes acceptance_priors.json next to the checkpoint; `load_head` attaches them to the loaded head as
`head.acceptance_priors`, and the EAGLE drafter's calibrator (hsd_rag.drafters.eagle_calibration) starts every
request from them. A bucket counts a draft only once it was decided, i.e. its parent was accepted.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

PROB_EDGES = (0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)  # upper bounds; last bucket to 1
MAX_DEPTH = 8  # depths beyond this share the last depth's buckets
PRIORS_FILE = "acceptance_priors.json"


def bucket_midpoints(edges=PROB_EDGES) -> list[float]:
    """A representative head probability per bucket (the fallback prior mean)."""
    bounds = (0.0, *edges, 1.0)
    return [(lo + hi) / 2 for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]


@dataclass
class AcceptancePriors:
    """Measured acceptance of a head's drafts per (depth, head-probability bucket), stored beside the head."""

    prob_edges: list[float]
    accepted: list[list[int]]  # [MAX_DEPTH][buckets] drafts accepted (their parent having been accepted)
    verified: list[list[int]]  # [MAX_DEPTH][buckets] drafts verified with their parent accepted
    source: str = ""  # how they were measured (command, prompts)

    @classmethod
    def empty(cls, source: str = "") -> AcceptancePriors:
        buckets = len(PROB_EDGES) + 1
        return cls(list(PROB_EDGES), [[0] * buckets for _ in range(MAX_DEPTH)],
                   [[0] * buckets for _ in range(MAX_DEPTH)], source)

    def add(self, other: AcceptancePriors) -> None:
        for mine, theirs in ((self.accepted, other.accepted), (self.verified, other.verified)):
            for row, other_row in zip(mine, theirs, strict=True):
                for i, n in enumerate(other_row):
                    row[i] += n

    def rate(self, depth_index: int, bucket: int) -> float | None:
        verified = self.verified[depth_index][bucket]
        return self.accepted[depth_index][bucket] / verified if verified else None

    def save(self, directory: Path) -> Path:
        path = Path(directory) / PRIORS_FILE
        path.write_text(json.dumps(asdict(self), indent=1))
        return path

    @classmethod
    def load(cls, directory: Path) -> AcceptancePriors | None:
        path = Path(directory) / PRIORS_FILE
        if not path.exists():
            return None
        priors = cls(**json.loads(path.read_text()))
        if list(priors.prob_edges) != list(PROB_EDGES) or len(priors.verified) != MAX_DEPTH:
            return None  # measured with other buckets: re-run `hsd-rag eval-head --write-priors`
        return priors
