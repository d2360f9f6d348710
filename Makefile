# The two commands of the README. Both set up .venv first (scripts/setup.sh, instant once done).
VENV ?= .venv
BIN := $(VENV)/bin
VLLM_VENV ?= .venv-vllm
QUESTION ?= Who designed the Eiffel Tower?

.PHONY: setup qa test lint web vllm-setup vllm-test

setup:
	@bash scripts/setup.sh

qa: setup  ## Ask the bundled documents a question with the embedded default model (offline)
	@$(BIN)/hsd-rag qa examples/docs "$(QUESTION)"

test: setup  ## The test suite and the tutorial notebooks (what CI runs)
	@HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q
	@HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q --nbmake notebooks/

web: setup  ## The example web page over examples/docs on http://127.0.0.1:8000/
	@$(BIN)/python examples/web_app.py examples/docs

lint: setup
	@$(BIN)/ruff check hsd_rag tests tests_vllm examples scripts

vllm-setup:  ## The separate vLLM venv (vLLM CPU build + SuffixDecoding + this package) for --peers / --engine vllm
	@HSD_RAG_VLLM_VENV=$(VLLM_VENV) bash scripts/setup_vllm.sh

vllm-test: vllm-setup  ## Proposer unit tests and one end-to-end vLLM greedy run, inside the vLLM venv
	@HF_HUB_OFFLINE=1 $(VLLM_VENV)/bin/python -m pytest -q tests_vllm
