"""HybridSpecLLM's capability flags for langchain-tests, shared by the unit and the integration suites.

The flags are the truth: tools, tool_choice, structured output and JSON mode are implemented (constrained
decoding); images, audio, PDFs and per-call model overrides are not.
"""

from __future__ import annotations

from hsd_rag.langchain import HybridSpecLLM


class HybridSpecLLMCapabilities:
    @property
    def chat_model_class(self):
        return HybridSpecLLM

    @property
    def has_tool_calling(self) -> bool:
        return True

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def has_structured_output(self) -> bool:
        return True

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @property
    def supports_model_override(self) -> bool:
        return False  # one HybridSpecLLM wraps one loaded model; a per-call `model=` raises ValueError
