"""PDF documents in a folder: text extracted with pypdf (the `pdf` extra, part of `dev`), or skipped with the
install command when pypdf is missing — both paths tested whatever this environment has installed.

The PDF is written in-process: two pages in the standard Helvetica font, with a correct cross-reference table.
"""

from __future__ import annotations

import importlib.util

import pytest

from hsd_rag.retrieval import loaders
from hsd_rag.retrieval.loaders import FolderLoader, SkippedFileWarning

PAGES = ["The Varnholt Bridge opened in 1931.", "It carries the old coastal railway across the Tessel river."]


def tiny_pdf(pages: list[str]) -> bytes:
    """A minimal valid PDF 1.4 with one line of text per page."""
    count = len(pages)
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [" + b" ".join(b"%d 0 R" % (4 + 2 * i) for i in range(count)) + b"] /Count %d >>"
        % count,
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
    ]
    for i, text in enumerate(pages):
        escaped = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)").encode("latin-1")
        stream = b"BT /F1 12 Tf 72 720 Td (" + escaped + b") Tj ET"
        objects.append(
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> "
            b"/Contents %d 0 R >>" % (5 + 2 * i)
        )
        objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "bridge.pdf").write_bytes(tiny_pdf(PAGES))
    (tmp_path / "notes.txt").write_text("A plain note.")
    return tmp_path


def test_pdf_text_is_extracted_page_by_page(folder):
    assert importlib.util.find_spec("pypdf"), "pypdf is part of the dev extra: pip install -e '.[dev]'"
    loader = FolderLoader(folder)
    documents = loader.load()
    assert not loader.skipped
    pages = [d for d in documents if d.metadata["source"] == "bridge.pdf"]  # one Document per page, in order
    assert [d.metadata["page"] for d in pages] == list(range(len(PAGES)))
    assert [" ".join(d.page_content.split()) for d in pages] == PAGES


def test_unreadable_pdf_is_skipped_with_the_reason(folder):
    assert importlib.util.find_spec("pypdf"), "pypdf is part of the dev extra: pip install -e '.[dev]'"
    (folder / "broken.pdf").write_bytes(b"%PDF-1.4\nthis is not a pdf body")
    loader = FolderLoader(folder)
    with pytest.warns(SkippedFileWarning, match="broken.pdf"):
        loader.load()
    (skipped,) = loader.skipped
    assert skipped.source == "broken.pdf" and skipped.reason.startswith("PDF could not be read")


def test_without_pypdf_the_pdf_is_skipped_with_the_install_command(folder, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        loaders.importlib.util, "find_spec", lambda name, *a: None if name == "pypdf" else real_find_spec(name, *a)
    )
    loader = FolderLoader(folder)
    with pytest.warns(SkippedFileWarning, match="pip install pypdf"):
        documents = loader.load()
    assert [d.metadata["source"] for d in documents] == ["notes.txt"]
    assert loader.skipped[0].source == "bridge.pdf"
