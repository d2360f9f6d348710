"""Ask a folder of documents a question from the terminal, using the library API directly.

    python examples/qa_cli.py "Who designed the Eiffel Tower?" [--folder examples/docs]

The answer streams token by token; on a terminal each token is coloured by who proposed it (green: n-gram
from the documents, blue: EAGLE head, magenta: both, plain: the target's own bonus token). `hsd-rag qa` and
`make qa` do the same through `hsd_rag.app`, with more options.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hsd_rag import HybridSpecDecoder
from hsd_rag.app import NO_CONTEXT_NOTE, ask, format_stats
from hsd_rag.retrieval import FolderIndex

DEFAULT_FOLDER = Path(__file__).resolve().parent / "docs"
DEFAULT_QUESTION = "Who designed the Eiffel Tower?"
DEFAULT_MAX_NEW_TOKENS = 128  # a few sentences: enough for a factual answer, quick on a laptop CPU
COLOURS = {"ngram": "\033[42m", "eagle": "\033[44m"}  # ANSI backgrounds per draft source
BOTH_COLOUR = "\033[45m"  # a label like "ngram+eagle": several drafters proposed the token
RESET = "\033[0m"


def colour(source: str) -> str:
    if source == "target":
        return ""
    return COLOURS.get(source, BOTH_COLOUR)


def main() -> None:
    parser = argparse.ArgumentParser(description="Ask a folder of documents a question.")
    parser.add_argument("question", nargs="?", default=DEFAULT_QUESTION)
    parser.add_argument("--folder", default=DEFAULT_FOLDER, help="documents (default: examples/docs)")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    args = parser.parse_args()

    # 1. Index the folder (cached; later runs embed only new or changed files) and load the target model
    #    (the embedded SmolLM2-135M-Instruct: offline, no download).
    index = FolderIndex.open(args.folder)
    decoder = HybridSpecDecoder.from_pretrained()

    # 2. Retrieve passages and start the answer: they go into the prompt and become n-gram drafts.
    answer = ask(decoder, index, args.question, per_token=True, max_new_tokens=args.max_new_tokens)
    if not answer.chunks:
        print(NO_CONTEXT_NOTE)

    # 3. Stream: each piece is one token with the text it adds and its draft source.
    tty = sys.stdout.isatty()
    for piece in answer.stream:
        start = colour(piece.source) if tty else ""
        print(f"{start}{piece.text}{RESET if start else ''}", end="", flush=True)
    print()

    # 4. After the stream: stats (τ, speed, accepted drafts by source, time split) and the sources used.
    print(f"\n{format_stats(answer.stream.result.stats)}")
    for chunk in answer.chunks:
        print(f"source: {chunk.metadata.get('source')} (similarity {chunk.score:.2f})")


if __name__ == "__main__":
    main()
