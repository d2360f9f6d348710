"""GPU readiness: a decode step reads the device back only where it must.

On a GPU every read-back (`.item()`, `.tolist()`, `bool(tensor)`, ...) waits for the device's queue to drain, so
the loop may read back once per step for the acceptance decision, plus once for the EAGLE tree it hands to the
host (the tree is built on the host, where it is fused with the n-gram drafts); sampling adds the bonus token's
draw. These counts are the same on CPU, where a TorchFunctionMode sees every such call, the model's own included.
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from hsd_rag import HybridSpecDecoder
from hsd_rag.drafters.eagle import EagleDrafter
from hsd_rag.heads import Eagle3Head
from tests.tiny_models import IdTokenizer, tiny_model

READ_BACKS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu"}


class ReadBackCounter(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in READ_BACKS:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def decoder():
    model = tiny_model("llama", seed=4)
    torch.manual_seed(0)
    dec = HybridSpecDecoder(model, IdTokenizer(), head=Eagle3Head.from_target(model))
    # a GPU's EAGLE drafter never reads back between levels (early exit is a CPU-only shortcut)
    dec.drafter_factories = {
        **dec.drafter_factories,
        "eagle": lambda d, cfg: EagleDrafter(d.model, d.head, early_exit=False),
    }
    return dec


@pytest.mark.parametrize(
    ("method", "temperature", "per_step"),
    [("vanilla", 0.0, 1), ("ngram", 0.0, 1), ("eagle", 0.0, 2), ("vanilla", 0.8, 2), ("ngram", 0.8, 2),
     ("eagle", 0.8, 3)],
)
def test_read_backs_per_step(decoder, method, temperature, per_step):
    prompt = [0, 30, 31, 32, 30, 31, 32, 30, 31]
    with ReadBackCounter() as counter:
        result = decoder.generate(prompt, documents=["30 31 32 33 34"], method=method, budget=8,
                                  max_new_tokens=24, temperature=temperature, seed=0, answer_history=False)
    steps = result.stats.steps
    assert steps > 0
    assert counter.count <= per_step * steps, f"{counter.count} read-backs over {steps} steps"
