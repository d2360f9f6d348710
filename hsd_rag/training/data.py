"""Training conversations: from a jsonl file or the built-in offline recipe, answered by the target itself.

A head learns to predict *the target's* next tokens, so every answer it trains on should be the target's own
greedy output. Prompts without an answer are answered by the target through `HybridSpecDecoder.generate(...,
method="ngram")` (token-identical to plain greedy decoding, and faster on RAG prompts). Generated answers are
appended to a jsonl cache as they come, keyed by a hash of the prompt and the generation settings, so an
interrupted or repeated run only generates what is missing.

jsonl input: one object per line with `messages` ([{role, content}, ...]); the last assistant turn is the answer
and the turns before it the prompt; with no assistant turn the target answers. Optional: `id`, `documents`
(texts the n-gram drafter may copy from while generating).

The built-in recipe (`recipe_prompts`): RAG prompts of the *train* side of the benchmark split
(`split(load_builtin(lang), HELDOUT_FRACTION)[0]`) plus general instructions templated from Wikipedia lead
sections (never an article that answers a held-out question) and from Python's `pydoc_data.topics`.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from hsd_rag.training.config import RecipeConfig

ASSISTANT = "assistant"
KEY_HEX_CHARS = 16
CACHE_SUBDIR = "training"
# Wikipedia passages used for general instructions: long enough to say something, short enough to stay cheap.
MIN_PASSAGE_CHARS = 300
MAX_PASSAGE_CHARS = 1500
PYDOC_EXCERPT_CHARS = 1200

WIKI_TEMPLATES_WITH_TEXT = (
    "Summarize the following text in two sentences.\n\n{text}",
    "Read the text below and list three key facts from it.\n\n{text}",
    "Explain to a curious child what {title} is, using the text below.\n\n{text}",
    "Write one question that the following text answers, then answer it.\n\n{text}",
)
WIKI_TEMPLATES_NO_TEXT = (
    "What is {title}? Answer in a few sentences.",
    "Write a short paragraph about {title}.",
)
PYDOC_TEMPLATES_WITH_TEXT = (
    "Explain the following part of the Python documentation in simple words.\n\n{text}",
)
PYDOC_TEMPLATES_NO_TEXT = (
    "Write a short Python example that illustrates the topic `{title}` and explain what it does.",
)
# Instructions to copy a passage, per language: whatever the target answers is its own distribution, and most of
# it is copying, the skill RAG answers need most from a head (they copy their documents) and learn too slowly.
COPY_TEMPLATES = {
    "en": (
        "Copy the following text word for word.\n\n{text}",
        "Quote the passage below exactly, without changing a word.\n\n{text}",
    ),
    "fr": (
        "Recopie le texte suivant mot pour mot.\n\n{text}",
        "Cite exactement le passage ci-dessous, sans changer un mot.\n\n{text}",
    ),
    "es": (
        "Copia el siguiente texto palabra por palabra.\n\n{text}",
        "Cita exactamente el pasaje siguiente, sin cambiar ninguna palabra.\n\n{text}",
    ),
}


@dataclass
class Conversation:
    """One training conversation: the prompt turns and the target's answer (None until generated)."""

    id: str
    messages: list[dict[str, str]]  # the prompt: every turn before the answer
    answer: str | None = None
    answer_ids: list[int] | None = None  # the exact target tokens when the target generated the answer
    documents: list[str] = field(default_factory=list)  # texts the n-gram drafter may copy from
    source: str = "jsonl"


# ---- jsonl input ---------------------------------------------------------------------------------------------


def _content_key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[
        :KEY_HEX_CHARS
    ]


def conversation_from_record(record: object, where: str = "record") -> Conversation:
    """A `Conversation` from one `{"messages": [...]}` object (the last assistant turn is the answer)."""
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list) or not record["messages"]:
        raise ValueError(f"{where}: expected an object with a non-empty `messages` list")
    messages = record["messages"]
    for message in messages:
        if not isinstance(message, dict) or not all(
            isinstance(message.get(k), str) for k in ("role", "content")
        ):
            raise ValueError(f"{where}: every message needs string `role` and `content`")
    last_answer = max((i for i, m in enumerate(messages) if m["role"] == ASSISTANT), default=None)
    prompt = messages if last_answer is None else messages[:last_answer]
    if not prompt:
        raise ValueError(f"{where}: the conversation starts with the assistant; there is no prompt to answer")
    documents = record.get("documents") or []
    return Conversation(
        id=str(record.get("id") or _content_key(messages)),
        messages=[{"role": m["role"], "content": m["content"]} for m in prompt],
        answer=None if last_answer is None else messages[last_answer]["content"],
        documents=[str(d) for d in documents],
        source=str(record.get("source", "jsonl")),
    )


def load_conversations(path: str | Path) -> list[Conversation]:
    """Conversations from a jsonl file; a malformed line raises `ValueError` naming its line number."""
    path = Path(path)
    conversations = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from error
                conversations.append(conversation_from_record(record, f"{path}:{number}"))
    return conversations


# ---- the built-in recipe -------------------------------------------------------------------------------------


def rag_prompts(languages: Sequence[str], limit: int | None = None, n_docs: int = 3) -> list[Conversation]:
    """RAG prompts from the train side of the benchmark split only (held-out ids never appear)."""
    from hsd_rag.bench.datasets import HELDOUT_FRACTION
    from hsd_rag.data import format_messages, load_builtin, split

    out = []
    for lang in languages:
        train, _ = split(load_builtin(lang, n_docs=n_docs), HELDOUT_FRACTION)
        for example in train[:limit]:
            out.append(
                Conversation(
                    id=f"rag-{lang}-{example.id}",
                    messages=format_messages(example),
                    documents=list(example.documents),
                    source=f"rag-{lang}",
                )
            )
    return out


def heldout_titles() -> set[str]:
    """Titles of the English articles that answer held-out benchmark questions (kept out of general prompts)."""
    from hsd_rag.bench.datasets import HELDOUT_FRACTION
    from hsd_rag.data import load_builtin, split

    _, heldout = split(load_builtin("en"), HELDOUT_FRACTION)
    return {example.gold_title for example in heldout if example.gold_title}


def _instruction(rng: random.Random, with_text: Sequence[str], no_text: Sequence[str], title: str, text: str):
    templates = (*with_text, *no_text)
    template = templates[rng.randrange(len(templates))]
    uses_text = "{text}" in template
    prompt = template.format(title=title, text=text)
    return prompt, [text] if uses_text else []


def wiki_instructions(count: int, seed: int = 0) -> list[Conversation]:
    """General instructions over English Wikipedia lead sections (not articles of held-out questions)."""
    if count == 0:
        return []
    from hsd_rag.data.sources import load_corpus

    excluded = heldout_titles()
    articles = [
        a
        for a in load_corpus("en")
        if a.title not in excluded and MIN_PASSAGE_CHARS <= len(a.text) <= MAX_PASSAGE_CHARS
    ]
    rng = random.Random(f"wiki:{seed}")
    out = []
    for article in rng.sample(articles, min(count, len(articles))):
        prompt, documents = _instruction(
            rng, WIKI_TEMPLATES_WITH_TEXT, WIKI_TEMPLATES_NO_TEXT, article.title, article.text
        )
        out.append(
            Conversation(
                id=f"wiki-{_content_key(prompt)}",
                messages=[{"role": "user", "content": prompt}],
                documents=documents,
                source="wiki",
            )
        )
    return out


def pydoc_instructions(count: int, seed: int = 0) -> list[Conversation]:
    """General instructions about Python from the standard library's `pydoc_data.topics`."""
    if count == 0:
        return []
    from pydoc_data.topics import topics

    rng = random.Random(f"pydoc:{seed}")
    names = sorted(topics)
    out = []
    for name in rng.sample(names, min(count, len(names))):
        excerpt = topics[name].strip()[:PYDOC_EXCERPT_CHARS]
        prompt, documents = _instruction(
            rng, PYDOC_TEMPLATES_WITH_TEXT, PYDOC_TEMPLATES_NO_TEXT, name, excerpt
        )
        out.append(
            Conversation(
                id=f"pydoc-{_content_key(prompt)}",
                messages=[{"role": "user", "content": prompt}],
                documents=documents,
                source="pydoc",
            )
        )
    return out


def copy_instructions(languages: Sequence[str], count: int, seed: int = 0) -> list[Conversation]:
    """Per language, `count` instructions to copy a gold passage of the train side of the benchmark split."""
    if count == 0:
        return []
    from hsd_rag.bench.datasets import HELDOUT_FRACTION
    from hsd_rag.data import load_builtin, split

    out = []
    for lang in languages:
        train, _ = split(load_builtin(lang), HELDOUT_FRACTION)
        passages = sorted({
            e.documents[e.gold_index]
            for e in train
            if e.gold_index is not None and MIN_PASSAGE_CHARS <= len(e.documents[e.gold_index]) <= MAX_PASSAGE_CHARS
        })
        rng = random.Random(f"copy:{lang}:{seed}")
        templates = COPY_TEMPLATES[lang]
        # templates alternate, so a larger `count` keeps the smaller one's prompts (and their cached answers)
        for i, text in enumerate(rng.sample(passages, min(count, len(passages)))):
            prompt = templates[i % len(templates)].format(text=text)
            out.append(
                Conversation(
                    id=f"copy-{lang}-{_content_key(prompt)}",
                    messages=[{"role": "user", "content": prompt}],
                    documents=[text],
                    source=f"copy-{lang}",
                )
            )
    return out


def recipe_prompts(config: RecipeConfig) -> list[Conversation]:
    """The built-in recipe's prompts (answers not generated yet)."""
    return [
        *rag_prompts(config.languages, config.rag_limit, config.n_docs),
        *wiki_instructions(config.general_wiki, config.seed),
        *pydoc_instructions(config.general_pydoc, config.seed),
        *copy_instructions(config.languages, config.copy_passages, config.seed),
    ]


# ---- answering with the target -------------------------------------------------------------------------------


def target_name(model) -> str:
    """A short filesystem-safe name of the target (its config's name or path, last component)."""
    name = getattr(model.config, "name_or_path", "") or type(model).__name__
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in Path(str(name)).name)
    return safe or type(model).__name__


def default_cache_path(model) -> Path:
    from hsd_rag.paths import cache_dir

    return cache_dir() / CACHE_SUBDIR / f"{target_name(model)}-answers.jsonl"


def _answer_key(conversation: Conversation, max_new_tokens: int, vocab_size: int) -> str:
    return _content_key(conversation.messages, max_new_tokens, vocab_size)


def _read_cache(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    records = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
            records[record["key"]] = record
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut short by an interrupted run is regenerated
    return records


def answer_missing(
    decoder,
    conversations: Iterable[Conversation],
    cache: str | Path | None = None,
    max_new_tokens: int = 128,
    budget: int = 8,
    progress: bool = True,
) -> list[Conversation]:
    """Fill in every missing answer with the target's greedy output (cached in a jsonl file)."""
    conversations = list(conversations)
    path = Path(cache) if cache is not None else default_cache_path(decoder.model)
    vocab_size = decoder.model.config.get_text_config().vocab_size
    records = _read_cache(path)
    todo = [c for c in conversations if c.answer is None]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as out:
        for conversation in tqdm(todo, desc="answering with the target", disable=not progress or not todo):
            key = _answer_key(conversation, max_new_tokens, vocab_size)
            record = records.get(key)
            if record is None:
                result = decoder.generate(
                    conversation.messages,
                    conversation.documents,
                    method="ngram",
                    budget=budget,
                    max_new_tokens=max_new_tokens,
                    temperature=0.0,
                )
                record = {"key": key, **asdict(conversation)}
                record.update(answer=result.text, answer_ids=list(result.token_ids))
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                out.flush()
                records[key] = record
            conversation.answer = record["answer"]
            conversation.answer_ids = list(record["answer_ids"])
    return conversations


def build_recipe_data(
    decoder, config: RecipeConfig | None = None, progress: bool = True
) -> list[Conversation]:
    """The built-in recipe's conversations, answered by the target (`decoder`: a HybridSpecDecoder)."""
    config = config or RecipeConfig()
    return answer_missing(
        decoder, recipe_prompts(config), config.cache, config.max_new_tokens, config.budget, progress
    )


# ---- tokens ------------------------------------------------------------------------------------------------


def encode(decoder, conversation: Conversation) -> tuple[list[int], list[int]]:
    """(prompt ids with the generation prompt, answer ids ending at end-of-turn) in target tokens."""
    prompt_ids = decoder.encode_prompt(conversation.messages)
    if conversation.answer_ids is not None:
        return prompt_ids, list(conversation.answer_ids)
    if conversation.answer is None:
        raise ValueError(f"conversation {conversation.id} has no answer: call answer_missing first")
    answer_ids = _templated_answer(decoder, conversation, prompt_ids)
    eos = decoder.eos_token_ids
    cut = next((i + 1 for i, t in enumerate(answer_ids) if t in eos), None)
    if cut is not None:
        return prompt_ids, answer_ids[:cut]
    return prompt_ids, answer_ids + sorted(eos)[:1]


def _templated_answer(decoder, conversation: Conversation, prompt_ids: list[int]) -> list[int]:
    """The answer's tokens as the chat template renders them after the prompt (else plain tokenization)."""
    tokenizer = decoder.tokenizer
    if getattr(tokenizer, "chat_template", None) is not None:
        full = tokenizer.apply_chat_template(
            [*conversation.messages, {"role": ASSISTANT, "content": conversation.answer}],
            tokenize=True,
            return_dict=False,
        )
        if list(full[: len(prompt_ids)]) == prompt_ids:
            return [int(t) for t in full[len(prompt_ids) :]]
    return list(tokenizer(conversation.answer, add_special_tokens=False).input_ids)
