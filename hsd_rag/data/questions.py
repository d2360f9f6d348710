"""Questions paired with the corpus article that answers them.

English: FanOutQA dev sub-questions (single-hop, human-written, with answers) whose evidence article is in the
offline corpus. French and Spanish: no such question set exists offline, so the questions are *templated* from
article titles ("Que sais-tu de {title} ?") and have no reference answer.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from hsd_rag.data.sources import FANOUTQA_DEV_FILE, QUESTIONS_PACKAGE, Article, package_file

# Several phrasings per language, picked by article, so the prompts do not all share one n-gram prefix.
QUESTION_TEMPLATES = {
    "fr": ("Que sais-tu de {title} ?", "Présente brièvement {title}.", "Que faut-il savoir sur {title} ?"),
    "es": ("¿Qué sabes de {title}?", "Describe brevemente {title}.", "¿Qué hay que saber sobre {title}?"),
}
BOOLEAN_ANSWERS = {True: "Yes", False: "No"}


@dataclass(frozen=True)
class QuestionSeed:
    """A question before its documents are assembled."""

    id: str
    question: str
    answer: str | None
    gold: int  # index of the answering article in the corpus tuple


def answer_text(answer: object) -> str:
    """FanOutQA answers are str, numbers, bools, lists or dicts; render each as a short string."""
    if isinstance(answer, bool):
        return BOOLEAN_ANSWERS[answer]
    if isinstance(answer, list):
        return ", ".join(answer_text(item) for item in answer)
    if isinstance(answer, dict):
        return "; ".join(f"{key}: {answer_text(value)}" for key, value in answer.items())
    return str(answer)


def _subquestions(node: dict) -> list[dict]:
    found = []
    for child in node.get("decomposition", []):
        found.append(child)
        found.extend(_subquestions(child))
    return found


def fanoutqa_questions(corpus: Sequence[Article]) -> list[QuestionSeed]:
    """Dev sub-questions whose evidence article is in `corpus` (558), each distinct question once (540).

    A few sub-questions repeat across parent questions ("What is the capital of China?"); keeping one copy stops a
    prompt from landing on both sides of a train / held-out split.
    """
    position = {article.key: i for i, article in enumerate(corpus)}
    parents = json.loads(package_file(QUESTIONS_PACKAGE, FANOUTQA_DEV_FILE).read_text(encoding="utf-8"))
    seeds, seen = [], set()
    for parent in parents:
        for sub in _subquestions(parent):
            title = (sub.get("evidence") or {}).get("title")
            question = sub["question"].strip()
            if title not in position or question.lower() in seen:
                continue
            seen.add(question.lower())
            seeds.append(QuestionSeed(sub["id"], question, answer_text(sub["answer"]), position[title]))
    return seeds


def templated_questions(corpus: Sequence[Article], lang: str) -> list[QuestionSeed]:
    """One templated question per article; the phrasing rotates with the article's position."""
    templates = QUESTION_TEMPLATES[lang]
    return [
        QuestionSeed(
            f"{lang}:{article.key}", templates[i % len(templates)].format(title=article.title), None, i
        )
        for i, article in enumerate(corpus)
    ]
