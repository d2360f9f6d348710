"""LangChain's own integration contract (langchain-tests `ChatModelIntegrationTests`) on the default model.

The real SmolLM2-135M-Instruct, offline, greedy. Capability flags are the truth: tool calling, tool_choice,
structured output and JSON mode are implemented (constrained decoding); images, audio, PDFs and per-call model
overrides are not. Tests the 135M model is too weak to pass are marked xfail below, each with its reason; none
of them is a missing feature.
"""

from __future__ import annotations

import pytest
from langchain_tests.integration_tests import ChatModelIntegrationTests

from tests.langchain_capabilities import HybridSpecLLMCapabilities

pytestmark = pytest.mark.slow

MAX_NEW_TOKENS = 64  # a short answer, or a tool call whose arguments hold CJK text (several tokens a character)

# A 135M model decoding greedily repeats itself inside free-text JSON string values ("a cat is a cat, a cat
# is ..."), so a joke whose `setup` and `punchline` are unbounded strings never closes within the token budget.
# The constraint keeps every emitted prefix valid; the answer is just unfinished. Extraction from a passage, where
# the model copies, completes (tests/test_constrain_default_model.py).
LOOPS_IN_FREE_TEXT_STRINGS = pytest.mark.xfail(
    reason="SmolLM2-135M loops inside unbounded free-text JSON strings under greedy decoding (an unfinished "
    "answer, never an invalid one)",
    strict=False,
)
# The pydantic Joke (field descriptions in its schema) loops; the TypedDict and JSON-schema jokes complete.
SCHEMA_TYPES = [pytest.param("pydantic", marks=LOOPS_IN_FREE_TEXT_STRINGS), "typeddict", "json_schema"]
# Without tool_choice the model decides; a 135M model never trained on tool use rarely chooses a call.
DOES_NOT_CHOOSE_TOOLS = pytest.mark.xfail(
    reason="with tool_choice='auto' SmolLM2-135M (no tool-use training) answers in text instead of calling the tool",
    strict=False,
)


class TestHybridSpecLLMIntegration(HybridSpecLLMCapabilities, ChatModelIntegrationTests):
    @pytest.fixture(autouse=True)
    def _decoder(self, default_decoder):
        self.decoder = default_decoder

    @property
    def chat_model_params(self) -> dict:
        return {"decoder": self.decoder, "max_new_tokens": MAX_NEW_TOKENS}

    # ---- known model-quality failures (see the marks above) ------------------------------------------------

    # langchain-tests requires an overridden standard test to carry an xfail mark itself; the marks are
    # non-strict, so the schema types that complete show as XPASS and the pydantic one as XFAIL.
    @LOOPS_IN_FREE_TEXT_STRINGS
    @pytest.mark.parametrize("schema_type", SCHEMA_TYPES)
    def test_structured_output(self, model, schema_type) -> None:
        super().test_structured_output(model, schema_type)

    @LOOPS_IN_FREE_TEXT_STRINGS
    @pytest.mark.parametrize("schema_type", SCHEMA_TYPES)
    async def test_structured_output_async(self, model, schema_type) -> None:
        await super().test_structured_output_async(model, schema_type)

    @LOOPS_IN_FREE_TEXT_STRINGS
    def test_structured_output_pydantic_2_v1(self, model) -> None:
        super().test_structured_output_pydantic_2_v1(model)

    @LOOPS_IN_FREE_TEXT_STRINGS
    def test_json_mode(self, model) -> None:
        super().test_json_mode(model)

    @DOES_NOT_CHOOSE_TOOLS
    @pytest.mark.parametrize("model", [{}, {"output_version": "v1"}], indirect=True)
    def test_agent_loop(self, model) -> None:
        super().test_agent_loop(model)
