"""`FolderLoader`: a document folder as LangChain Documents, DirectoryLoader-style, never crashing on a file.

Supported: .txt, .md, .html/.htm (tags stripped with the stdlib parser, script/style dropped), and .pdf when
`pypdf` is installed, one Document per page with `page` (0-based, as LangChain's `PyPDFLoader` numbers them)
and `total_pages` in its metadata. Every Document's `source` is its path relative to the folder,
"/"-separated, so an index stays valid when the folder moves. Every other or unreadable file is skipped, listed in `skipped` and
announced by one `SkippedFileWarning` per load. Hidden files and folders (".git", ".DS_Store") are ignored.

It is a plain `BaseLoader`: `FolderLoader(folder).load()` feeds any LangChain vector store, splitter or the
indexing API. `FolderIndex` also calls `files()` and `load_file()` itself, so that files whose bytes did not
change since the last update are not parsed again.
"""

from __future__ import annotations

import importlib.util
import io
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from hsd_rag.retrieval.optional import missing_message

try:
    from langchain_core.document_loaders import BaseLoader
    from langchain_core.documents import Document
except ImportError as error:
    raise ImportError(missing_message("langchain-core", "FolderLoader")) from error

TEXT_EXTENSIONS = frozenset({".txt", ".md"})
HTML_EXTENSIONS = frozenset({".html", ".htm"})
PDF_EXTENSIONS = frozenset({".pdf"})
SUPPORTED_EXTENSIONS = TEXT_EXTENSIONS | HTML_EXTENSIONS | PDF_EXTENSIONS
PDF_INSTALL_HINT = "pip install pypdf"
BINARY_SNIFF_BYTES = 8192  # a NUL byte in the first 8 KiB marks a binary file, as git and grep decide it
MAX_LISTED_SKIPS = 10  # the warning names this many skipped files, then counts the rest


class SkippedFileWarning(UserWarning):
    """Some files of a document folder were not loaded; the loader's `skipped` says which and why."""


class NoDocumentsError(ValueError):
    """A document folder has nothing that could be loaded."""


class UnreadableFileError(ValueError):
    """A file cannot be turned into text; the message is the reason (binary, not UTF-8, no text ...)."""


@dataclass(frozen=True)
class SkippedFile:
    source: str
    reason: str

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}"


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
        raise UnreadableFileError("binary content")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise UnreadableFileError(f"not UTF-8 text ({error.reason} at byte {error.start})") from error


def _pdf_pages(raw: bytes) -> list[str]:
    if importlib.util.find_spec("pypdf") is None:
        raise UnreadableFileError(f"PDF support needs `{PDF_INSTALL_HINT}`")
    import pypdf

    try:
        return [page.extract_text() or "" for page in pypdf.PdfReader(io.BytesIO(raw)).pages]
    except Exception as error:  # pypdf raises many types on malformed or encrypted files
        raise UnreadableFileError(f"PDF could not be read ({type(error).__name__}: {error})") from error


def read_document(source: str, raw: bytes) -> list[Document]:
    """The Documents of one file's bytes (one per PDF page that has text); raises `UnreadableFileError`."""
    suffix = Path(source).suffix.lower()
    if suffix in PDF_EXTENSIONS:
        pages = _pdf_pages(raw)
        documents = [
            Document(
                page_content=text, metadata={"source": source, "page": number, "total_pages": len(pages)}
            )
            for number, text in enumerate(pages)
            if text.strip()
        ]
    elif suffix in HTML_EXTENSIONS:
        documents = [Document(page_content=html_to_text(_decode(raw)), metadata={"source": source})]
    elif suffix in TEXT_EXTENSIONS:
        documents = [Document(page_content=_decode(raw), metadata={"source": source})]
    else:
        raise UnreadableFileError(f"unsupported extension {suffix or '(none)'}")
    documents = [d for d in documents if d.page_content.strip()]
    if not documents:
        raise UnreadableFileError("no text")
    return documents


def supported_extensions_message() -> str:
    pdf = "" if importlib.util.find_spec("pypdf") else f" (.pdf needs `{PDF_INSTALL_HINT}`)"
    return f"supported extensions: {', '.join(sorted(SUPPORTED_EXTENSIONS))}{pdf}"


def warn_skipped(skipped: list[SkippedFile], folder: Path, stacklevel: int = 3) -> None:
    listed = "; ".join(str(s) for s in skipped[:MAX_LISTED_SKIPS])
    more = f"; and {len(skipped) - MAX_LISTED_SKIPS} more" if len(skipped) > MAX_LISTED_SKIPS else ""
    warnings.warn(
        f"Skipped {len(skipped)} file(s) in {folder}: {listed}{more}",
        SkippedFileWarning,
        stacklevel=stacklevel,
    )


class FolderLoader(BaseLoader):
    """Every supported file under `folder`, recursively and in sorted order, as Documents."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).expanduser()
        self.skipped: list[SkippedFile] = []  # files the latest load could not read, with the reason

    def files(self) -> list[tuple[str, Path]]:
        """(source, path) of every non-hidden file; symlinked folders are not followed.

        Raises FileNotFoundError / NotADirectoryError for a bad folder path.
        """
        if not self.folder.exists():
            raise FileNotFoundError(f"Document folder not found: {self.folder}")
        if not self.folder.is_dir():
            raise NotADirectoryError(f"Expected a folder of documents, got a file: {self.folder}")
        found = []
        for root, dirs, names in os.walk(self.folder):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(names):
                if not name.startswith("."):
                    path = Path(root) / name
                    found.append((path.relative_to(self.folder).as_posix(), path))
        return found

    def load_file(self, source: str, raw: bytes) -> list[Document]:
        """Documents of one file given its bytes (see `read_document`)."""
        return read_document(source, raw)

    def lazy_load(self) -> Iterator[Document]:
        self.skipped = []
        for source, path in self.files():
            try:
                if path.suffix.lower() not in SUPPORTED_EXTENSIONS:  # not even read
                    raise UnreadableFileError(f"unsupported extension {path.suffix.lower() or '(none)'}")
                documents = self.load_file(source, path.read_bytes())
            except UnreadableFileError as reason:
                self.skipped.append(SkippedFile(source, str(reason)))
                continue
            except OSError as error:
                self.skipped.append(SkippedFile(source, f"could not be read ({error.strerror or error})"))
                continue
            yield from documents
        if self.skipped:
            warn_skipped(self.skipped, self.folder)
