"""`structured-<lang>`: extract fields from the retrieved passages as JSON, under a JSON-schema constraint.

The held-out built-in RAG prompts (the same passages and questions as `builtin-<lang>`), asked to answer as a
`PassageFacts` object. Every method decodes under the same grammar, and so does the baseline: HF `generate`
with xgrammar's own logits processor, the constrained plain decode. Greedy outputs are compared with it token
for token like any other dataset; τ counts grammar-forced drafts ("grammar" in accepted_by_source) alongside
the n-gram and EAGLE ones.

String fields have a maxLength so that a model that starts repeating itself inside a string still closes the
object within the token budget (the constraint decides where it must stop, not a truncation).
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from hsd_rag.bench.runner import BenchCase
from hsd_rag.constrain.formats import JsonSchema

STRUCTURED_PREFIX = "structured-"
SUBJECT_CHARS = 60
ANSWER_CHARS = 160
INSTRUCTION = (
    "\n\nReply with a JSON object with the keys: subject (what the passages are about), answer (the answer to "
    "the question, copied from the passages) and year (a year the answer mentions, or null)."
)


class PassageFacts(BaseModel):
    """What the benchmark asks the model to extract from the passages."""

    subject: str = Field(max_length=SUBJECT_CHARS)
    answer: str = Field(max_length=ANSWER_CHARS)
    year: int | None = Field(ge=0, le=2100)


RESPONSE_FORMAT = JsonSchema(json_schema=PassageFacts.model_json_schema())


def load_structured_cases(name: str, limit: int | None) -> list[BenchCase]:
    """`structured-en` / `-fr` / `-es`: the held-out built-in prompts with the extraction instruction."""
    from hsd_rag.bench.datasets import HELDOUT_FRACTION
    from hsd_rag.data import format_messages, load_builtin, split

    _, examples = split(load_builtin(name[len(STRUCTURED_PREFIX) :]), HELDOUT_FRACTION)
    cases = []
    for example in examples[:limit]:
        messages = format_messages(example)
        messages[-1] = {**messages[-1], "content": messages[-1]["content"] + INSTRUCTION}
        cases.append(BenchCase(example.id, name, messages, list(example.documents), RESPONSE_FORMAT))
    return cases


def constrained_hf_processors(decoder, response_format) -> list:
    """HF `generate` logits processors for the constrained plain decode (xgrammar's own, same grammar)."""
    if response_format is None:
        return []
    from xgrammar.contrib.hf import LogitsProcessor

    from hsd_rag.constrain.engine import engine_for
    from hsd_rag.constrain.formats import to_response_format

    return [LogitsProcessor(engine_for(decoder).compile(to_response_format(response_format)))]
