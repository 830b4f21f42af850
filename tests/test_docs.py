"""Every document the code cites is in the repository, and so is every section it names.

The convention: a citation is ``docs/<file>.md``, optionally followed by ``, <section title>`` where the
title is a heading of that file (e.g. "docs/method.md, GRPO loss").
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CITATION = re.compile(r"docs/([\w.-]+?\.md)(, )?")


def scanned_files() -> list[Path]:
    """The Python sources of the packages, benchmarks and tests, and the recipes; not this file."""
    files = [p for folder in ("eksft", "rl", "benchmarks", "tests") for p in (ROOT / folder).rglob("*.py")]
    files += list((ROOT / "recipes").glob("*.yaml"))
    return sorted(p for p in files if p != Path(__file__).resolve())


def headings(doc: Path) -> list[str]:
    """The titles of the Markdown headings of ``doc``, longest first (so a title is matched whole)."""
    titles = [m[1].strip() for m in re.finditer(r"^#{1,6}\s+(.+)$", doc.read_text(encoding="utf-8"), re.M)]
    return sorted(titles, key=len, reverse=True)


def citation_problems(text: str, docs: Path = DOCS) -> list[str]:
    """What is wrong with the ``docs/`` citations in ``text``: a document or a section that does not exist."""
    text = " ".join(text.split())  # a citation may be wrapped over two lines
    problems = []
    for match in CITATION.finditer(text):
        doc = docs / match[1]
        if not doc.is_file():
            problems.append(f"docs/{match[1]} does not exist")
        elif match[2] and not any(text[match.end():].startswith(title) for title in headings(doc)):
            problems.append(f"docs/{match[1]}, {text[match.end():][:40]!r}...: no such heading in {headings(doc)}")
    return problems


def test_cited_documents_and_sections_exist():
    texts = {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8") for p in scanned_files()}
    assert sum(bool(CITATION.search(t)) for t in texts.values()) >= 3  # the scan sees the citations
    assert {name: problems for name, t in texts.items() if (problems := citation_problems(t))} == {}


def test_no_citation_of_a_design_document_outside_the_repository():
    design = "DESIGN" + ".md"  # spelled apart so that this file does not cite it
    assert [str(p.relative_to(ROOT)) for p in scanned_files() if design in p.read_text(encoding="utf-8")] == []


@pytest.mark.parametrize("text,problem", [
    ("(docs/method.md, GRPO loss).", None),
    ("see docs/method.md, Token selection\n    and ties: k = floor(ratio n)", None),
    ("see docs/architecture.md.", None),
    ("see docs/method.md, Grpo loss.", "no such heading"),
    ("see docs/nowhere.md", "does not exist"),
])
def test_the_check_finds_what_it_should(text, problem):
    found = citation_problems(text)
    assert found == [] if problem is None else (len(found) == 1 and problem in found[0])


CODE_PATH = re.compile(r"`((?:eksft|rl|benchmarks|recipes|tests|scripts|docker)/[\w./-]+\.(?:py|yaml|sh|md))`")


@pytest.mark.parametrize("doc", sorted(DOCS.glob("*.md")) + [ROOT / "README.md"], ids=lambda p: p.name)
def test_files_the_documents_point_to_exist(doc):
    """A document that names `eksft/...py` (or another file of the tree) names a file that is there."""
    named = set(CODE_PATH.findall(doc.read_text(encoding="utf-8")))
    assert named or doc.name == "README.md"
    assert sorted(p for p in named if not (ROOT / p).exists()) == []
