"""Every relative link in the README and the manual (docs/*.md, benchmarks/README.md) leads somewhere: the file
exists, and a ``#anchor`` names a heading of the target file as GitHub slugs it (or an explicit ``<a id>``)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_FENCE = re.compile(r"^\s*(```|~~~)")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
# [text](target) and ![alt](target), with an optional "title"; the text may hold one level of brackets.
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_HTML_ANCHOR = re.compile(r"<a\s+(?:id|name)=\"([^\"]+)\"", re.IGNORECASE)
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def documents() -> list[Path]:
    """The markdown files whose links are checked."""
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "README.md"]


def _prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks, with inline code spans blanked (links inside code are not links)."""
    lines, in_fence = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            in_fence = not in_fence
            continue
        if not in_fence:
            lines.append(_CODE_SPAN.sub(lambda m: " " * len(m.group(0)), line))
    return lines


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its rendered text lower-cased, every character other than a letter, digit,
    underscore, hyphen or space dropped, and spaces turned into hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link renders as its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor a markdown file offers: its headings' slugs (a repeated slug gets -1, -2, ...) and HTML ids."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    in_fence = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if _FENCE.match(line):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        found.update(_HTML_ANCHOR.findall(line))
        heading = _HEADING.match(line)
        if heading:
            slug = github_slug(heading.group(2))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def broken_links(path: Path, root: Path = REPO) -> list[str]:
    """``'FILE: TARGET (why)'`` (FILE relative to ``root``) for each relative link of ``path`` that does not
    resolve."""
    broken = []
    for line in _prose_lines(path.read_text(encoding="utf-8")):
        for target in _LINK.findall(line):
            if _SCHEME.match(target):
                continue  # http(s), mailto: not checked here (no network in the tests)
            file_part, _, anchor = target.partition("#")
            destination = (path.parent / file_part).resolve() if file_part else path
            if not destination.exists():
                broken.append(f"{path.relative_to(root)}: {target} (no such file)")
            elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
                broken.append(f"{path.relative_to(root)}: {target} (no heading with this anchor)")
    return broken


def test_every_relative_link_and_anchor_resolves():
    broken = [entry for path in documents() for entry in broken_links(path)]
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_checker_finds_broken_files_and_anchors(tmp_path):
    (tmp_path / "target.md").write_text("# A title\n\n## Upcycling memory: `upcycle_memory.py`\n\n## A title\n")
    source = tmp_path / "source.md"
    source.write_text(
        "[ok](target.md) [ok](target.md#a-title) [ok](target.md#a-title-1) "
        "[ok](target.md#upcycling-memory-upcycle_memorypy) [ok](#own) [ok](https://example.com/missing)\n"
        "[bad](missing.md) [bad](target.md#no-such-heading) `[in code](missing.md)`\n"
        "```\n[in a fence](missing.md)\n```\n## Own\n"
    )
    assert broken_links(source, root=tmp_path) == [
        "source.md: missing.md (no such file)",
        "source.md: target.md#no-such-heading (no heading with this anchor)",
    ]


def test_github_slugs_of_the_headings_linked_here():
    assert github_slug("The paper's review budget: a 5% review recovers a third") == (
        "the-papers-review-budget-a-5-review-recovers-a-third"
    )
    assert github_slug("From the web UI (LlamaBoard)") == "from-the-web-ui-llamaboard"
    assert github_slug("Measured on an H200 (2026-11-30)") == "measured-on-an-h200-2026-11-30"
    assert github_slug("GGUF for llama.cpp") == "gguf-for-llamacpp"
