"""The user docs hold together: every relative link in README.md and docs/*.md resolves
(file and, for Markdown targets, the ``#anchor`` heading), and no page cites the design
notes outside the project (METHODS.md, ../shared, shared/design); docs/methods.md is the
project's own reference. Pure text checks, no network."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# [text](target) and ![alt](target); reference-style [text]: target lines.
_INLINE = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFDEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*(\S+)", re.MULTILINE)
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
_CODE = re.compile(r"`[^`\n]*`")
_FORBIDDEN = re.compile(r"METHODS\.md|\.\./shared|shared/design")


def _prose(text: str) -> str:
    """The page without fenced code blocks and inline code (links there are not links)."""
    return _CODE.sub("", _FENCE.sub("", text))


def _links(text: str) -> list[str]:
    prose = _prose(text)
    return _INLINE.findall(prose) + _REFDEF.findall(prose)


def _slug(heading: str) -> str:
    """GitHub's heading anchor: lower case, markup and punctuation dropped, spaces to '-'."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    """Anchors of a Markdown page, numbered for repeated headings as GitHub does."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    for line in _FENCE.sub("", page.read_text(encoding="utf-8")).splitlines():
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = _slug(match.group(1))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def _is_relative(target: str) -> bool:
    return not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:|^//", target)


def _broken(page: Path) -> list[str]:
    problems = []
    for target in _links(page.read_text(encoding="utf-8")):
        if not _is_relative(target):
            continue
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        if not dest.exists():
            problems.append(f"{target}: no file {dest}")
            continue
        if anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            problems.append(f"{target}: no heading #{anchor} in {dest.name}")
    return problems


def test_slug_matches_github_rule_on_known_headings():
    assert _slug("Your own models, data and checkpoints") == "your-own-models-data-and-checkpoints"
    assert _slug("The `Objective`") == "the-objective"
    assert _slug("Sharpness-aware training (SAM)") == "sharpness-aware-training-sam"


def test_link_checker_catches_a_missing_file_and_anchor(tmp_path):
    page = tmp_path / "a.md"
    (tmp_path / "b.md").write_text("# Real heading\n", encoding="utf-8")
    page.write_text(
        "[ok](b.md#real-heading) [gone](c.md) [bad](b.md#nope) `[code](d.md)` "
        "[web](https://example.org/x.md)\n```\n[fenced](e.md)\n```\n",
        encoding="utf-8",
    )
    problems = _broken(page)
    assert len(problems) == 2
    assert any("c.md" in p for p in problems) and any("#nope" in p for p in problems)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    assert _broken(page) == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_citation_of_design_notes(page):
    hits = [
        f"line {n}: {line.strip()}"
        for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1)
        if _FORBIDDEN.search(line)
    ]
    assert hits == [], "cite docs/methods.md, not the design notes"
