"""Query latency of the n-gram drafter over a large per-request index.

Why: the drafter runs on the CPU between two target forwards, so its `propose` must stay far below a forward's
time whatever the amount of retrieved text. The corpus is synthetic but shaped like tokenized RAG chunks: a
Zipf unigram distribution (frequent tokens have thousands of distinct continuations, the hard case for the
frequency ranking) with recurring phrases, and an answer that alternates copied document spans with fresh text.
The decode loop is simulated with greedy acceptance against the known answer so the stream grows and the
calibrator learns exactly as in generation.
"""

from __future__ import annotations

import itertools
import random
import statistics
import time

from hsd_rag.drafters.base import DraftContext, StepOutcome
from hsd_rag.drafters.ngram import NgramDrafter
from hsd_rag.tree import TokenTree

VOCAB = 32_000  # a typical small-LLM BPE vocabulary
ZIPF_EXPONENT = 1.1  # unigram frequency ~ rank ** -exponent, as in natural-language token streams
DOCUMENT_TOKENS = 500  # tokens per retrieved chunk
PHRASE_POOL = 2_000  # distinct recurring phrases shared by the documents
PHRASE_LENGTHS = (3, 16)  # min, max tokens per phrase
PHRASE_PROBABILITY = 0.3  # chance that the next piece of a document is a recurring phrase
FRESH_RUN = (1, 8)  # min, max tokens of fresh Zipf text between phrases
PROMPT_TOKENS = 64  # question tokens before the answer
COPY_PROBABILITY = 0.5  # chance that the next piece of the answer is copied from a document
COPY_LENGTHS = (4, 24)  # min, max tokens per copied span
BUDGET = 16  # draft nodes per proposal
PERCENTILE = 95  # reported tail latency
MS_PER_S = 1e3


def _zipf_sampler(vocab: int, exponent: float, rng: random.Random):
    cumulative = list(itertools.accumulate(rank ** -exponent for rank in range(1, vocab + 1)))
    population = range(vocab)
    return lambda k: rng.choices(population, cum_weights=cumulative, k=k)


def synthetic_request(indexed_tokens: int, vocab: int, answer_tokens: int, seed: int):
    """(prompt, documents, answer) token lists with the statistics described in the module docstring."""
    rng = random.Random(seed)
    sample = _zipf_sampler(vocab, ZIPF_EXPONENT, rng)
    phrases = [sample(rng.randint(*PHRASE_LENGTHS)) for _ in range(PHRASE_POOL)]
    corpus: list[int] = []
    while len(corpus) < indexed_tokens:
        if rng.random() < PHRASE_PROBABILITY:
            corpus.extend(rng.choice(phrases))
        else:
            corpus.extend(sample(rng.randint(*FRESH_RUN)))
    corpus = corpus[:indexed_tokens]
    documents = [corpus[i : i + DOCUMENT_TOKENS] for i in range(0, indexed_tokens, DOCUMENT_TOKENS)]
    answer: list[int] = []
    while len(answer) < answer_tokens:
        if rng.random() < COPY_PROBABILITY:
            document = rng.choice(documents)
            start = rng.randrange(len(document))
            answer.extend(document[start : start + rng.randint(*COPY_LENGTHS)])
        else:
            answer.extend(sample(rng.randint(*FRESH_RUN)))
    return sample(PROMPT_TOKENS), documents, answer[:answer_tokens]


def _greedy_accept(tree: TokenTree, upcoming: list[int]) -> list[int]:
    """Accepted node ids (root first) when the target's next tokens are `upcoming`."""
    accepted = [0]
    for token in upcoming:
        child = next((c for c in tree.children(accepted[-1]) if tree.tokens[c] == token), None)
        if child is None:
            break
        accepted.append(child)
    return accepted


def measure_query_time(indexed_tokens: int = 100_000, vocab: int = VOCAB, queries: int = 500,
                       seed: int = 0, budget: int = BUDGET) -> dict:
    """Mean / p95 / max wall time (ms) of `NgramDrafter.propose` over `queries` simulated decode steps."""
    prompt, documents, answer = synthetic_request(indexed_tokens, vocab, answer_tokens=queries * COPY_LENGTHS[1],
                                                  seed=seed)
    drafter = NgramDrafter()
    began = time.perf_counter()
    drafter.start(prompt, documents)
    build_s = time.perf_counter() - began
    tokens = list(prompt)
    position = 0  # answer tokens emitted so far
    times: list[float] = []
    drafts: list[int] = []
    accepted_drafts: list[int] = []
    for _ in range(queries):
        if position + 1 >= len(answer):
            break
        context = DraftContext(token_ids=tokens, prompt_length=len(prompt), budget=budget)
        began = time.perf_counter()
        tree = drafter.propose(context)
        times.append(time.perf_counter() - began)
        accepted = _greedy_accept(tree, answer[position:])
        new_tokens = [tree.tokens[node] for node in accepted[1:]]
        new_tokens.append(answer[position + len(new_tokens)])  # the bonus token
        drafter.observe(StepOutcome(tree=tree, accepted_nodes=accepted, new_tokens=new_tokens))
        tokens.extend(new_tokens)
        position += len(new_tokens)
        drafts.append(tree.num_drafts)
        accepted_drafts.append(len(accepted) - 1)
    automaton = drafter.automaton
    drafter.close()
    times_ms = sorted(t * MS_PER_S for t in times)
    return {
        "indexed_tokens": indexed_tokens,
        "num_states": automaton.num_states,
        "build_s": build_s,
        "queries": len(times_ms),
        "budget": budget,
        "mean_ms": statistics.fmean(times_ms),
        "p95_ms": times_ms[min(len(times_ms) - 1, len(times_ms) * PERCENTILE // 100)],
        "max_ms": times_ms[-1],
        "mean_drafts": statistics.fmean(drafts),
        "mean_accepted": statistics.fmean(accepted_drafts),
    }


if __name__ == "__main__":
    for key, value in measure_query_time().items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
