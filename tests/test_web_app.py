"""The example web app (examples/web_app.py), served in-process on 127.0.0.1 with a tiny random model.

The streamed tokens must be exactly what the decoder generates, each with its draft source; a bad question must
come back as an HTTP 400 with a message, and a failure midway as an `error` event, never a dead connection.
"""

from __future__ import annotations

import json
import re
import threading
import urllib.error
import urllib.request
import zlib
from urllib.parse import quote

import numpy as np
import pytest
from langchain_core.embeddings import Embeddings

from examples.web_app import make_server
from hsd_rag.app import ask
from hsd_rag.retrieval import FolderIndex
from hsd_rag.tree import SOURCE_EAGLE, SOURCE_NGRAM, TokenTree
from tests.tiny_models import smollm2_chat_decoder

SMOLLM2_VOCAB = 49152
SHORT = 12  # new tokens per answer: several draft steps, cheap on two cores
DRAFT_DEPTH = 3  # the oracle's chain: one token per label below
ORACLE_LABELS = (SOURCE_NGRAM, SOURCE_EAGLE, SOURCE_NGRAM | SOURCE_EAGLE)
QUESTION = "Who designed the Eiffel Tower?"
DOCS = {
    "eiffel.md": "The Eiffel Tower in Paris was designed by the engineering company of Gustave Eiffel.",
    "moon.md": "The Moon is the only natural satellite of the Earth.",
    "dna.txt": "DNA carries the genetic instructions of all known organisms.",
}
TIMEOUT_S = 60


class WordEmbedder(Embeddings):
    """Hashed bag of words: retrieval good enough for three tiny files, without loading a sentence model."""

    dimension = 64

    def embed_documents(self, texts):
        vectors = np.zeros((len(texts), self.dimension), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()):
                vectors[row, zlib.crc32(word.encode()) % self.dimension] += 1
        return vectors.tolist()

    def embed_query(self, text):
        return self.embed_documents([text])[0]


class OracleDrafter:
    """Drafts the known answer, labelling its tokens n-gram, EAGLE, both in turn, so every colour is streamed."""

    name = "oracle"

    def __init__(self, truth: list[int]):
        self.truth = truth  # prompt + the greedy answer

    def start(self, prompt_ids, documents):
        pass

    def propose(self, context):
        tree = TokenTree.root(context.token_ids[-1])
        parent = 0
        upcoming = self.truth[len(context.token_ids) : len(context.token_ids) + DRAFT_DEPTH]
        for token, label in zip(upcoming, ORACLE_LABELS, strict=False):
            parent = tree.add(parent, token, 1.0, label)
        return tree

    def observe(self, outcome):
        pass

    def close(self):
        pass


class FailingDrafter(OracleDrafter):
    def propose(self, context):
        raise RuntimeError("drafter broke")


@pytest.fixture(scope="module")
def decoder():
    """A ~3M-parameter random Llama over the real SmolLM2 tokenizer (ask() needs its chat template)."""
    return smollm2_chat_decoder()


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    folder = tmp_path_factory.mktemp("docs")
    for name, text in DOCS.items():
        (folder / name).write_text(text, encoding="utf-8")
    return FolderIndex.build(folder, embedding=WordEmbedder(), save=False)


@pytest.fixture(scope="module")
def server(decoder, index):
    server = make_server(decoder, index, port=0, k=2, max_new_tokens=SHORT)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(TIMEOUT_S)


def get(server, path: str) -> tuple[int, str, str]:
    """(status, content type, body) of a GET, also for error statuses."""
    try:
        with urllib.request.urlopen(server.url + path.lstrip("/"), timeout=TIMEOUT_S) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read().decode()


def events(body: str) -> list[tuple[str, dict]]:
    """Parse a Server-Sent Events body into (event name, JSON data) pairs."""
    parsed = []
    for block in body.split("\n\n"):
        if block:
            fields = dict(line.split(": ", 1) for line in block.split("\n"))
            parsed.append((fields["event"], json.loads(fields["data"])))
    return parsed


def test_page_and_assets_are_served(server, index):
    status, content_type, page = get(server, "/")
    assert status == 200 and content_type.startswith("text/html")
    assert 'id="ask"' in page and 'id="answer"' in page and 'id="stats"' in page
    for source in ("src-ngram", "src-eagle", "src-both", "src-target"):  # the legend
        assert source in page
    assert str(index.folder) in page and "{{folder}}" not in page
    status, content_type, script = get(server, "/static/app.js")
    assert status == 200 and content_type.startswith("text/javascript") and "/api/ask" in script
    assert get(server, "/static/style.css")[0] == 200
    status, _, body = get(server, "/nothing-here")
    assert status == 404 and "error" in json.loads(body)


def test_answer_streams_every_token_with_its_source_then_stats(server, decoder, index, monkeypatch):
    messages = ask(decoder, index, QUESTION, k=2).messages  # ask() generates nothing until iterated
    expected = decoder.generate(messages, method="vanilla", max_new_tokens=SHORT)
    truth = decoder.encode_prompt(messages) + expected.token_ids
    monkeypatch.setattr(decoder, "drafter_factories", {"ngram": lambda dec, cfg: OracleDrafter(truth)})
    monkeypatch.setitem(server.generation, "method", "ngram")
    monkeypatch.setitem(server.generation, "budget", DRAFT_DEPTH)

    status, content_type, body = get(server, f"/api/ask?q={quote(QUESTION)}")
    assert status == 200 and content_type.startswith("text/event-stream")
    stream = events(body)
    names = [name for name, _ in stream]
    assert names == ["token"] * (len(names) - 1) + ["done"]
    tokens = [data for name, data in stream if name == "token"]
    assert [t["token_id"] for t in tokens] == expected.token_ids  # lossless through the page too
    assert "".join(t["text"] for t in tokens) == expected.text
    assert {t["source"] for t in tokens} == {"ngram", "eagle", "ngram+eagle", "target"}

    done = stream[-1][1]
    assert done["text"] == expected.text
    assert done["stats"]["new_tokens"] == len(tokens)
    assert done["stats"]["tau"] > 1 and done["stats"]["tokens_per_s"] > 0
    for source in ("ngram", "eagle"):
        assert done["stats"]["accepted_by_source"][source] > 0
    assert {"prefill_s", "draft_s", "verify_s", "other_s"} <= set(done["stats"])
    assert "τ" in done["summary"]
    assert done["sources"][0]["source"] == "eiffel.md" and done["sources"][0]["text"] == DOCS["eiffel.md"]


@pytest.mark.parametrize("query", ["", "?q=", "?q=%20%20"])
def test_empty_question_is_a_400_with_a_message(server, query):
    status, content_type, body = get(server, f"/api/ask{query}")
    assert status == 400 and content_type.startswith("application/json")
    assert json.loads(body) == {"error": "The question is empty."}


def test_bad_settings_are_a_400(server, monkeypatch):
    monkeypatch.setitem(server.generation, "max_new_tokens", 0)
    status, _, body = get(server, f"/api/ask?q={quote(QUESTION)}")
    assert status == 400 and "max_new_tokens" in json.loads(body)["error"]


def test_failure_midway_is_an_error_event_and_the_server_keeps_serving(server, decoder, monkeypatch):
    monkeypatch.setattr(decoder, "drafter_factories", {"ngram": lambda dec, cfg: FailingDrafter([])})
    monkeypatch.setitem(server.generation, "method", "ngram")
    status, _, body = get(server, f"/api/ask?q={quote(QUESTION)}")
    assert status == 200  # the stream had started: the failure arrives as an event
    assert events(body)[-1] == ("error", {"error": "Generation failed: drafter broke"})
    monkeypatch.undo()
    status, _, body = get(server, f"/api/ask?q={quote(QUESTION)}")
    assert status == 200 and events(body)[-1][0] == "done"


def test_a_browser_leaving_midway_does_not_block_the_next_answer(server):
    with urllib.request.urlopen(f"{server.url}api/ask?q={quote(QUESTION)}", timeout=TIMEOUT_S) as response:
        assert response.readline().startswith(b"event: token")  # then hang up mid-answer
    status, _, body = get(server, f"/api/ask?q={quote(QUESTION)}")
    assert status == 200 and events(body)[-1][0] == "done"
