"""Turn the unpacked Debian packages into documents made of paragraphs.

LibreOffice's help packages ship one HTML file per help page under
``usr/share/libreoffice/help/<lang>/``; the page's path below that directory is the same in every
language, which is what lets the train / held-out split hold out the same pages everywhere.
Debian's ``fortunes`` ships plain-text files of ``%``-separated quips.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

HELP_ROOT = Path("usr/share/libreoffice/help")
FORTUNES_ROOT = Path("usr/share/games/fortunes")

# Page chrome (navigation, search box, debug footer) and code listings are not prose.
_SKIPPED_TAGS = frozenset({"head", "header", "aside", "footer", "nav", "script", "noscript", "style", "pre", "code"})
# Each of these starts a new paragraph; inline tags (span, a, em, ...) only continue the current one.
_BLOCK_TAGS = frozenset(
    {"p", "h1", "h2", "h3", "h4", "h5", "h6", "li", "ul", "ol", "td", "th", "tr", "table", "div", "br", "dt", "dd"}
)
_VOID_TAGS = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"})
# ASCII drawings, not prose.
_SKIPPED_FORTUNE_FILES = frozenset({"ascii-art"})
_OVERSTRIKE = re.compile(".\x08")


@dataclass(frozen=True)
class Document:
    """One unit of the split: a help page or a fortune, identified the same way in every language."""

    doc_id: str
    paragraphs: tuple[str, ...]


class _HelpPageParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._open: list[tuple[str, bool]] = []  # (tag, skipped) for every open non-void element
        self._buffer: list[str] = []

    def _skipping(self) -> bool:
        return any(skipped for _, skipped in self._open)

    def _flush(self) -> None:
        text = " ".join("".join(self._buffer).split())
        if text:
            self.paragraphs.append(text)
        self._buffer = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _BLOCK_TAGS:
            self._flush()
        if tag in _VOID_TAGS:
            return
        # `hidden` marks the platform variants (macOS, Windows, ...) of a phrase; only the default is shown.
        skipped = tag in _SKIPPED_TAGS or any(name == "hidden" for name, _ in attrs)
        self._open.append((tag, skipped))

    def handle_endtag(self, tag: str) -> None:
        if tag in _BLOCK_TAGS:
            self._flush()
        # Close the innermost element with this name (and anything left unclosed inside it).
        for depth in range(len(self._open) - 1, -1, -1):
            if self._open[depth][0] == tag:
                del self._open[depth:]
                break

    def handle_data(self, data: str) -> None:
        if not self._skipping():
            self._buffer.append(data)

    def close(self) -> None:
        super().close()
        self._flush()


def parse_help_page(html: str) -> list[str]:
    """Return the visible prose paragraphs of one LibreOffice help page, whitespace-normalised."""
    parser = _HelpPageParser()
    parser.feed(html)
    parser.close()
    return parser.paragraphs


def help_language_dir(unpacked: Path) -> Path:
    """The single ``help/<lang>`` directory of an unpacked ``libreoffice-help-*`` package.

    Besides it the package may hold ``help/media`` (screenshots), which has no ``text/`` pages.
    """
    root = unpacked / HELP_ROOT
    dirs = sorted(p for p in root.iterdir() if (p / "text").is_dir()) if root.is_dir() else []
    if len(dirs) != 1:
        raise ValueError(f"expected one language directory under {root}, found {[d.name for d in dirs]}")
    return dirs[0]


def iter_help_pages(lang_dir: Path) -> list[Path]:
    """All help pages below ``lang_dir``, sorted by their language-independent id."""
    return sorted((p for p in lang_dir.rglob("*.html") if p.is_file()), key=lambda p: p.relative_to(lang_dir).as_posix())


def load_help_page(lang_dir: Path, page: Path) -> Document:
    return Document(page.relative_to(lang_dir).as_posix(), tuple(parse_help_page(page.read_text(encoding="utf-8"))))


def parse_fortunes(text: str) -> list[str]:
    """Split a fortune file into fortunes: ``%`` lines separate them; overstrike (``x\\b``) is removed."""
    fortunes = []
    for block in re.split(r"^%$", _OVERSTRIKE.sub("", text), flags=re.MULTILINE):
        lines = [line.rstrip() for line in block.strip("\n").splitlines()]
        fortune = "\n".join(lines).strip()
        if fortune:
            fortunes.append(fortune)
    return fortunes


def load_fortunes(unpacked: Path) -> list[Document]:
    """Every fortune of the package as a one-paragraph document with id ``file/index``.

    The ``.u8`` names are symlinks to the same files and ``.dat`` are indexes, so only regular files
    without a suffix are read.
    """
    root = unpacked / FORTUNES_ROOT
    if not root.is_dir():
        raise ValueError(f"no fortune files under {root}")
    documents = []
    for path in sorted(root.iterdir()):
        if path.is_symlink() or not path.is_file() or path.suffix or path.name in _SKIPPED_FORTUNE_FILES:
            continue
        for index, fortune in enumerate(parse_fortunes(path.read_text(encoding="utf-8", errors="replace"))):
            documents.append(Document(f"{path.name}/{index}", (fortune,)))
    return documents
