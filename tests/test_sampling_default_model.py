"""Sampling on the real default model (SmolLM2-135M-Instruct with its shipped EAGLE-3 head).

Two checks, kept small because every sample costs a prefill and a forward of a real 135M model:
- the first-token and first-two-token marginals of the default method (hybrid: n-gram + shipped head) against
  the model's own distribution, computed exactly from its logits (top-k 4 keeps the table at 16 cells);
- `method="vanilla"` with `seed=None` reproduces `generate(do_sample=True)` token for token under the same
  torch seed (see tests/test_generate_sampling_match.py for why only draft-free steps can match).
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from tests.fidelity import P_FLOOR, SEED, fidelity_p, report, sequence_law

pytestmark = pytest.mark.slow
MESSAGES = [{"role": "user", "content": "Name one colour of the rainbow. Answer with one word."}]
SAMPLING = dict(temperature=1.0, top_k=4, top_p=1.0)
SAMPLES = 160


def test_default_method_samples_the_models_first_two_tokens(default_decoder):
    dec = default_decoder
    prompt = dec.encode_prompt(MESSAGES)
    law = sequence_law(dec.model, prompt, 2, **SAMPLING)
    likely = sorted(law, key=law.get, reverse=True)[:4]
    # n-gram drafts for the likely answers: each document holds the prompt's tail, then one likely answer
    documents = [dec.tokenizer.decode(prompt[-4:] + list(seq)) for seq in likely]
    assert len(marginal_cells := {seq[0] for seq in law}) >= 2, marginal_cells  # something to sample
    samples, depths = [], Counter()
    for i in range(SAMPLES):
        res = dec.generate(MESSAGES, documents=documents, max_new_tokens=2, seed=SEED * 10_000 + i, **SAMPLING)
        samples.append(tuple(res.token_ids))
        depths.update(res.stats.accepted_by_depth)
    p_value = fidelity_p(samples, law, lengths=(1, 2))
    line = report("default-model-hybrid", p_value, accepted_steps=sum(n for d, n in depths.items() if d >= 1))
    assert p_value > P_FLOOR, line
    assert depths[1] > 0, depths  # drafts were accepted, so acceptance ran on the real model


def test_vanilla_sampling_reproduces_generate_on_the_default_model(default_decoder):
    dec = default_decoder
    ids = torch.tensor([dec.encode_prompt(MESSAGES)])
    for seed in range(3):
        torch.manual_seed(seed)
        out = dec.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=8,
                                 temperature=0.8, top_k=20, top_p=0.95)
        torch.manual_seed(seed)
        res = dec.generate(MESSAGES, method="vanilla", max_new_tokens=8, temperature=0.8, top_k=20, top_p=0.95)
        assert res.token_ids == out[0, ids.shape[1] :].tolist(), seed
