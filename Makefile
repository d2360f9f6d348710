# The two commands of the README. Both set up .venv first (scripts/setup.sh, instant once done).
VENV ?= .venv
BIN := $(VENV)/bin
QUESTION ?= Who designed the Eiffel Tower?

.PHONY: setup qa test lint

setup:
	@bash scripts/setup.sh

qa: setup  ## Ask the bundled documents a question with the embedded default model (offline)
	@$(BIN)/hsd-rag qa examples/docs "$(QUESTION)"

test: setup  ## The test suite (what CI runs)
	@HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

lint: setup
	@$(BIN)/ruff check hsd_rag tests examples
