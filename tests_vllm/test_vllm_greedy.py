"""vLLM with our proposer, end to end: greedy outputs equal HF `generate`'s, and our drafts were accepted.

Small on purpose (2 RAG prompts, 48 tokens, the default 135M model, eager, 256 MiB of KV cache).
"""

from __future__ import annotations

import pytest

vllm = pytest.importorskip("vllm", reason="runs in .venv-vllm (make vllm-test)")

NEW_TOKENS = 48
PASSAGES = [
    ("The Eiffel Tower was designed by the engineering company of Gustave Eiffel and built from 1887 to 1889 "
     "as the entrance arch to the 1889 World's Fair in Paris.", "Who designed the Eiffel Tower and when was it built?"),
    ("La tour Eiffel est une tour de fer puddlé de 330 mètres de hauteur située à Paris, à l'extrémité "
     "nord-ouest du parc du Champ-de-Mars en bordure de la Seine.", "Où se trouve la tour Eiffel ?"),
]


def rag_prompt(passage: str, question: str) -> list[dict]:
    content = f"Use the following pieces of context to answer the question.\n{passage}\nQuestion: {question}"
    return [{"role": "user", "content": content}]


@pytest.fixture(scope="module")
def prompts(model_dir) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [
        tokenizer.apply_chat_template(rag_prompt(*p), add_generation_prompt=True, tokenize=True, return_dict=False)
        for p in PASSAGES
    ]


@pytest.fixture(scope="module")
def hf_outputs(model_dir, prompts) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outputs = []
    for ids in prompts:
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=model.config.eos_token_id)
        outputs.append(out[0, len(ids):].tolist())
    return outputs


def test_greedy_with_our_proposer_equals_hf_generate(model_dir, prompts, hf_outputs):
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from hsd_rag.engines.vllm.launch import speculative_config

    llm = LLM(model=model_dir, dtype="float32", enforce_eager=True, max_model_len=2048,
              kv_cache_memory_bytes=256 * 2**20, speculative_config=speculative_config("hsd", 8), seed=0,
              disable_log_stats=False)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS)
        results = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], params, use_tqdm=False)
        metrics = {m.name: m for m in llm.get_metrics()}
    finally:
        llm.llm_engine.engine_core.shutdown()  # stop the engine process now, not at interpreter exit
    for result, expected in zip(results, hf_outputs, strict=True):
        assert list(result.outputs[0].token_ids) == expected
    # The outputs only prove something if our drafts were in play: vLLM verified and accepted some of them.
    assert metrics["vllm:spec_decode_num_draft_tokens"].value > 0
    assert metrics["vllm:spec_decode_num_accepted_tokens"].value > 0
