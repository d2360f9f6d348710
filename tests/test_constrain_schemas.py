"""A schema-invalid output is impossible by construction: hypothesis generates JSON schemas, a random tiny model
samples against them with adversarial drafts, and every output must parse and validate (jsonschema).

The schemas are bounded (string lengths, integer ranges, array sizes, two levels of nesting), so every
output completes well within `MAX_NEW`: a truncated output would be a failure of the test, not an excuse.
"""

from __future__ import annotations

import json

import jsonschema
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.constrain_fixtures import MODEL_VOCAB, json_decoder
from tests.fake_drafters import RandomTreeDrafter

MAX_NEW = 400
NAMES = st.text(alphabet="abcdefghij", min_size=1, max_size=4)
WORDS = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789 .-", min_size=0, max_size=5)


@st.composite
def integers(draw):
    low = draw(st.integers(-50, 50))
    return {"type": "integer", "minimum": low, "maximum": low + draw(st.integers(0, 500))}


LEAVES = st.one_of(
    integers(),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.integers(0, 6).map(lambda n: {"type": "string", "maxLength": n}),
    st.lists(WORDS, min_size=1, max_size=4, unique=True).map(lambda words: {"enum": words}),
    WORDS.map(lambda word: {"const": word}),
)


@st.composite
def objects(draw, values):
    names = draw(st.lists(NAMES, min_size=1, max_size=4, unique=True))
    properties = {name: draw(values) for name in names}
    required = [name for name in names if draw(st.booleans())]
    return {"type": "object", "properties": properties, "required": required}


def arrays(items):
    return st.tuples(items, st.integers(0, 2), st.integers(0, 2)).map(
        lambda t: {"type": "array", "items": t[0], "minItems": t[1], "maxItems": t[1] + t[2]}
    )


VALUES = st.one_of(LEAVES, arrays(LEAVES), objects(LEAVES), LEAVES.flatmap(
    lambda a: LEAVES.map(lambda b: {"anyOf": [a, b]})
))
SCHEMAS = objects(st.one_of(VALUES, arrays(objects(LEAVES))))

_DECODER = json_decoder("qwen2", seed=9, layers=2, hidden=32)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schema=SCHEMAS, seed=st.integers(0, 10_000), temperature=st.sampled_from([0.0, 0.7, 1.5]))
def test_every_output_is_valid_under_its_schema(schema, seed, temperature):
    drafter = RandomTreeDrafter(MODEL_VOCAB, seed=seed, width=3, depth=4)
    _DECODER.drafter_factories = {"ngram": lambda d, cfg: drafter}
    torch.manual_seed(seed)
    result = _DECODER.generate([0, 5, 6], response_format=schema, method="ngram", budget=6,
                               temperature=temperature, seed=seed, max_new_tokens=MAX_NEW)
    assert result.stats.stop_reason == "eos", (schema, result.text)
    jsonschema.validate(json.loads(result.text), schema)
