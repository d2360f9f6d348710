"""Read a document folder into plain text, recursively, never crashing on a file it cannot read.

Supported: .txt, .md, .html/.htm (tags stripped with the stdlib parser, script/style dropped), and .pdf when
`pypdf` is installed. Every other or unreadable file is skipped, listed in the report and announced by one
`SkippedFileWarning` per load. Hidden files and folders (".git", the index folder, ".DS_Store") are ignored.

Callers that already hold a file's content hash pass it in `known`: an unchanged file is then not parsed again,
which is what keeps incremental index updates cheap.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

TEXT_EXTENSIONS = frozenset({".txt", ".md"})
HTML_EXTENSIONS = frozenset({".html", ".htm"})
PDF_EXTENSIONS = frozenset({".pdf"})
SUPPORTED_EXTENSIONS = TEXT_EXTENSIONS | HTML_EXTENSIONS | PDF_EXTENSIONS
PDF_INSTALL_HINT = "pip install pypdf"
BINARY_SNIFF_BYTES = 8192  # a NUL byte in the first 8 KiB marks a binary file, as git and grep decide it
MAX_LISTED_SKIPS = 10  # the warning names this many skipped files, then counts the rest


class SkippedFileWarning(UserWarning):
    """Some files of a document folder were not loaded; `LoadReport.skipped` says which and why."""


class NoDocumentsError(ValueError):
    """A document folder has nothing that could be loaded."""


@dataclass(frozen=True)
class LoadedDocument:
    source: str  # path relative to the folder, "/"-separated: stable when the folder moves
    text: str
    sha256: str  # of the file's bytes


@dataclass(frozen=True)
class SkippedFile:
    source: str
    reason: str


@dataclass
class LoadReport:
    documents: list[LoadedDocument] = field(default_factory=list)  # new or changed files, parsed
    unchanged: list[str] = field(default_factory=list)  # sources whose hash matched `known`, not parsed
    skipped: list[SkippedFile] = field(default_factory=list)


class _Unreadable(Exception):
    """Internal: carries the reason a file is skipped."""


class _HtmlText(HTMLParser):
    """Visible text of an HTML page, with line breaks where block elements start and end."""

    INVISIBLE = frozenset({"script", "style", "noscript", "template"})
    BLOCKS = frozenset(
        {
            "p",
            "div",
            "br",
            "li",
            "tr",
            "table",
            "section",
            "article",
            "header",
            "footer",
            "pre",
            "blockquote",
            "h1",
            "h2",
            "h3",
            "h4",
            "h5",
            "h6",
            "title",
            "ul",
            "ol",
            "dd",
            "dt",
            "hr",
        }
    )

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.hidden_depth = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in self.INVISIBLE:
            self.hidden_depth += 1
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.INVISIBLE:
            self.hidden_depth = max(self.hidden_depth - 1, 0)
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.hidden_depth:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    parser = _HtmlText()
    parser.feed(html)
    parser.close()
    lines = (re.sub(r"[ \t\r\f\v]+", " ", line).strip() for line in "".join(parser.parts).split("\n"))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _decode(raw: bytes) -> str:
    if b"\x00" in raw[:BINARY_SNIFF_BYTES]:
        raise _Unreadable("binary content")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise _Unreadable(f"not UTF-8 text ({error.reason} at byte {error.start})") from error


def _pdf_text(raw: bytes) -> str:
    if importlib.util.find_spec("pypdf") is None:
        raise _Unreadable(f"PDF support needs `{PDF_INSTALL_HINT}`")
    import pypdf

    try:
        reader = pypdf.PdfReader(io.BytesIO(raw))
        return "\n\n".join(page.extract_text() or "" for page in reader.pages)
    except Exception as error:  # pypdf raises many types on malformed or encrypted files
        raise _Unreadable(f"PDF could not be read ({type(error).__name__}: {error})") from error


def extract_text(suffix: str, raw: bytes) -> str:
    """Plain text of a file's bytes given its extension; raises `_Unreadable` with the reason."""
    if suffix in PDF_EXTENSIONS:
        text = _pdf_text(raw)
    elif suffix in HTML_EXTENSIONS:
        text = html_to_text(_decode(raw))
    elif suffix in TEXT_EXTENSIONS:
        text = _decode(raw)
    else:
        raise _Unreadable(f"unsupported extension {suffix or '(none)'}")
    if not text.strip():
        raise _Unreadable("no text")
    return text


def _files(folder: Path) -> list[Path]:
    """All non-hidden files under `folder`, sorted so that loads are reproducible; symlinked folders not followed."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [Path(root) / name for name in sorted(files) if not name.startswith(".")]
    return found


def _warn(skipped: list[SkippedFile], folder: Path) -> None:
    listed = "; ".join(f"{s.source}: {s.reason}" for s in skipped[:MAX_LISTED_SKIPS])
    more = f"; and {len(skipped) - MAX_LISTED_SKIPS} more" if len(skipped) > MAX_LISTED_SKIPS else ""
    warnings.warn(
        f"Skipped {len(skipped)} file(s) in {folder}: {listed}{more}", SkippedFileWarning, stacklevel=3
    )


def supported_extensions_message() -> str:
    pdf = "" if importlib.util.find_spec("pypdf") else f" (.pdf needs `{PDF_INSTALL_HINT}`)"
    return f"supported extensions: {', '.join(sorted(SUPPORTED_EXTENSIONS))}{pdf}"


def load_folder(
    folder: str | Path, known: Mapping[str, str] | None = None, allow_empty: bool = False
) -> LoadReport:
    """Load every supported file under `folder`; files whose hash equals `known[source]` are only listed.

    Raises FileNotFoundError / NotADirectoryError for a bad path and, unless `allow_empty`, `NoDocumentsError`
    when nothing could be loaded.
    """
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"Document folder not found: {folder}")
    if not folder.is_dir():
        raise NotADirectoryError(f"Expected a folder of documents, got a file: {folder}")
    known = known or {}
    report = LoadReport()
    for path in _files(folder):
        source = path.relative_to(folder).as_posix()
        suffix = path.suffix.lower()
        try:
            if suffix not in SUPPORTED_EXTENSIONS:
                raise _Unreadable(f"unsupported extension {suffix or '(none)'}")
            raw = path.read_bytes()
            digest = hashlib.sha256(raw).hexdigest()
            if known.get(source) == digest:
                report.unchanged.append(source)
                continue
            report.documents.append(LoadedDocument(source, extract_text(suffix, raw), digest))
        except _Unreadable as reason:
            report.skipped.append(SkippedFile(source, str(reason)))
        except OSError as error:
            report.skipped.append(SkippedFile(source, f"could not be read ({error.strerror or error})"))
    if report.skipped:
        _warn(report.skipped, folder)
    if not allow_empty and not report.documents and not report.unchanged:
        raise NoDocumentsError(f"No readable documents in {folder}; {supported_extensions_message()}.")
    return report
