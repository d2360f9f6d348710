"""Question answering over a folder of documents: retrieve chunks, then stream a speculative answer.

Shared by `hsd-rag qa` and the examples (CLI and web page). The retrieved chunks go into the prompt and into
the n-gram index of exactly this generation, so copying from them is drafted.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from hsd_rag.decoder import GenerationStream, HybridSpecDecoder

DEFAULT_K = 3  # chunks in the prompt: SmolLM2's 8k window holds more, but a 135M model answers best with few
NO_CONTEXT_NOTE = "(no document matched the question; answering without context)"


@dataclass
class Answer:
    """A streaming answer and the chunks it was grounded on."""

    stream: GenerationStream  # iterate for pieces; `.result` afterwards
    chunks: list  # RetrievedChunk objects, best first
    messages: list[dict]


def ask(decoder: HybridSpecDecoder, index, question: str, k: int = DEFAULT_K, per_token: bool = False,
        **generation) -> Answer:
    """Retrieve `k` chunks for `question` and start streaming the answer (nothing is generated until iterated)."""
    from hsd_rag.data import format_prompt

    question = question.strip()
    if not question:
        raise ValueError("The question is empty.")
    chunks = index.search(question, k=k)
    texts = [c.text for c in chunks]
    content = format_prompt(question, texts) if texts else question
    messages = [{"role": "user", "content": content}]
    start = decoder.stream_tokens if per_token else decoder.stream
    return Answer(start(messages, documents=texts, **generation), chunks, messages)


def format_stats(stats) -> str:
    sources = ", ".join(f"{k} {v}" for k, v in sorted(stats.accepted_by_source.items())) or "none"
    return (
        f"{stats.new_tokens} tokens in {stats.steps} target forwards (τ = {stats.tau:.2f}), "
        f"{stats.tokens_per_s:.1f} tokens/s; drafted tokens accepted: {sources}; "
        f"time: prefill {stats.prefill_s:.2f}s, draft {stats.draft_s:.2f}s, verify {stats.verify_s:.2f}s, "
        f"other {stats.other_s:.2f}s"
    )


def answer_question(args) -> int:
    """`hsd-rag qa FOLDER [QUESTION]`: print the answer as it streams, then its stats and sources."""
    from hsd_rag.retrieval import FolderIndex

    index = FolderIndex.open(args.folder)
    report = index.last_report
    new = len(report.added) + len(report.changed) if report else 0
    print(f"[index] {len(index.sources)} files, {new} new or changed; "
          f"{len(report.skipped) if report else 0} skipped", file=sys.stderr)
    if report:
        for skipped in report.skipped:
            print(f"[index] skipped {skipped}", file=sys.stderr)
    head = None if args.head in (None, "none") else args.head
    decoder = HybridSpecDecoder.from_pretrained(args.target, head=head, device=args.device, dtype=args.dtype)
    generation = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      budget=args.budget if args.budget == "auto" else int(args.budget))
    if args.method:
        generation["method"] = args.method
    questions = [args.question] if args.question else _interactive()
    for question in questions:
        answer = ask(decoder, index, question, k=args.k, **generation)
        if not answer.chunks:
            print(NO_CONTEXT_NOTE)
        for piece in answer.stream:
            print(piece, end="", flush=True)
        print()
        print(f"\n[stats] {format_stats(answer.stream.result.stats)}", file=sys.stderr)
        for i, chunk in enumerate(answer.chunks, 1):
            print(f"[source {i}] {chunk.metadata.get('source')} (score {chunk.score:.2f})", file=sys.stderr)
    return 0


def _interactive():
    while True:
        try:
            question = input("\nquestion> ").strip()
        except EOFError:
            return
        if question:
            yield question
