"""LlamaIndex instrumentation in tests: collect the ChatResponse of every LLM chat end event while in use.

A query engine returns text only; the LLM's chat end event carries the ChatResponse with its `raw` usage/stats.
"""

from __future__ import annotations


class ChatEndEvents:
    """`with ChatEndEvents() as responses:` — every LLMChatEndEvent's response, in order."""

    def __enter__(self) -> list:
        from llama_index.core.instrumentation import get_dispatcher
        from llama_index.core.instrumentation.event_handlers import BaseEventHandler
        from llama_index.core.instrumentation.events.llm import LLMChatEndEvent

        responses = []

        class Handler(BaseEventHandler):
            def handle(self, event, **kwargs):
                if isinstance(event, LLMChatEndEvent):
                    responses.append(event.response)

        self.dispatcher, self.handler = get_dispatcher(), Handler()
        self.dispatcher.add_event_handler(self.handler)
        return responses

    def __exit__(self, *exc) -> None:
        self.dispatcher.event_handlers.remove(self.handler)
