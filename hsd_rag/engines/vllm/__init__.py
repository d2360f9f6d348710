"""vLLM as the engine for scale, with our n-gram drafter inside it as a speculative-decoding proposer.

Modules (none imports vLLM at import time, so the package loads in the project's venv too):
- `proposer`: `HsdNgramProposer`, loaded by vLLM (`method="custom_class"`) inside its worker process;
- `request_state`, `chain`, `answer_index`: the proposer's parts (per-request drafter, chain choice, earlier answers);
- `documents`: the `documents` request field, carried from vLLM's API server to the proposer;
- `model_dir`, `launch`: a vLLM-loadable model directory, and `serve()` (vLLM's OpenAI server from .venv-vllm).
See docs/VLLM.md.
"""
