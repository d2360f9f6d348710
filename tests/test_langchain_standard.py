"""LangChain's own chat-model contract (langchain-tests), on a tiny random model with SmolLM2's chat template."""

from __future__ import annotations

import pytest
from langchain_tests.unit_tests import ChatModelUnitTests

from tests.langchain_capabilities import HybridSpecLLMCapabilities
from tests.tiny_models import smollm2_chat_decoder

SMOLLM2_VOCAB = 49152


@pytest.fixture(scope="module")
def chat_decoder():
    """A ~3M-parameter random Llama over the real SmolLM2 tokenizer (so the chat template is the real one)."""
    return smollm2_chat_decoder()


class TestHybridSpecLLMStandard(HybridSpecLLMCapabilities, ChatModelUnitTests):
    """Capability flags are the truth: tools and structured output (constrained decoding); text in and out."""

    @pytest.fixture(autouse=True)
    def _decoder(self, chat_decoder):
        self.decoder = chat_decoder

    @property
    def chat_model_params(self) -> dict:
        return {"decoder": self.decoder}

    @property
    def standard_chat_model_params(self) -> dict:
        params = super().standard_chat_model_params
        del params["api_key"]  # a local model has none: HybridSpecLLM refuses one (test_model_selection.py)
        return params
