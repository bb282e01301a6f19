"""Every pointer into docs/ARCHITECTURE.md resolves: "docs/ARCHITECTURE.md section N" in code and docs, and the
README's links to its headings; nothing points to a design file outside the repository."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"
SOURCES = [
    path
    for pattern in ("*.py", "*.md")
    for path in ROOT.rglob(pattern)
    if not {".venv", ".git", "results"} & set(path.relative_to(ROOT).parts)
]


def headings() -> dict[str, str]:
    """Section number ('3', '5.2') -> its heading text, from the '## N.' and '### N.M' lines."""
    found = re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? (.+)$", ARCHITECTURE.read_text(), flags=re.M)
    return dict(found)


def github_anchor(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def test_sections_are_numbered_in_order():
    numbers = [number for number in headings() if "." not in number]
    assert numbers == [str(i) for i in range(1, len(numbers) + 1)]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_section_reference_resolves(path):
    cited = re.findall(r"ARCHITECTURE\.md,? sections? (\d+(?:\.\d+)?)", path.read_text(errors="replace"))
    assert set(cited) <= set(headings()), f"{path} cites sections {sorted(set(cited) - set(headings()))}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_nothing_cites_a_design_file_the_repository_does_not_have(path):
    assert "DESIGN" + ".md" not in path.read_text(errors="replace")  # split: this file would match itself


def test_readme_links_into_the_document_resolve():
    anchors = {github_anchor(f"{number} {title}") for number, title in headings().items()}
    links = re.findall(r"\(docs/ARCHITECTURE\.md(?:#([\w-]+))?\)", (ROOT / "README.md").read_text())
    assert links, "the README links to docs/ARCHITECTURE.md"
    assert {link for link in links if link} <= anchors
