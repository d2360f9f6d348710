"""Sampling without drafts draws exactly what HF `generate(do_sample=True)` draws from the same random state.

Where the randomness can be matched: with `seed=None` the decoder samples from torch's global generator, and a
step without drafts (a one-node tree) consumes it exactly as `generate` does, one `torch.multinomial` over the
warped distribution per token. So `method="vanilla"` must reproduce `generate`'s tokens for every seed, which
pins the warpers (temperature, top-k, top-p), their order and the use of the random stream to HF's.

Where it cannot: a step with drafts draws one uniform per drafted node to accept or reject it and then the bonus
token from the residual distribution, so the same random numbers map to different tokens (only the *law* of the
output is the target's, which tests/test_sampling_fidelity.py checks); token-for-token equality with `generate`
under sampling is impossible by construction for any speculative method.
"""

from __future__ import annotations

import pytest
import torch

from hsd_rag import HybridSpecDecoder
from tests.tiny_models import IdTokenizer, tiny_model

PROMPT = [0, 5, 6, 7]
NEW_TOKENS = 24
SEEDS = range(6)
SETTINGS = [
    dict(temperature=1.0, top_k=0, top_p=1.0),
    dict(temperature=0.7, top_k=0, top_p=0.9),
    dict(temperature=1.3, top_k=5, top_p=1.0),
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: a thread pool only adds hand-offs (and costs a lot on a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def hf_sample(model, prompt, seed: int, temperature: float, top_k: int, top_p: float) -> list[int]:
    torch.manual_seed(seed)
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=NEW_TOKENS,
                         min_new_tokens=0, temperature=temperature, top_k=top_k, top_p=top_p)
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_vanilla_sampling_reproduces_generate(arch):
    model = tiny_model(arch, seed=2)
    dec = HybridSpecDecoder(model, IdTokenizer())
    distinct = set()
    for setting in SETTINGS:
        for seed in SEEDS:
            expected = hf_sample(model, PROMPT, seed, **setting)
            torch.manual_seed(seed)
            res = dec.generate(PROMPT, method="vanilla", max_new_tokens=NEW_TOKENS, **setting)
            assert res.token_ids == expected, (setting, seed)
            distinct.add(tuple(expected))
    assert len(distinct) > len(SEEDS)  # the seeds really gave different samples


def test_seeded_sampling_is_reproducible_and_independent_of_the_global_state():
    model = tiny_model("llama", seed=2)
    dec = HybridSpecDecoder(model, IdTokenizer())
    runs = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        runs.append(dec.generate(PROMPT, method="ngram", temperature=1.0, seed=11, max_new_tokens=NEW_TOKENS,
                                 documents=[" ".join(map(str, PROMPT * 3))]).token_ids)
    assert runs[0] == runs[1]
