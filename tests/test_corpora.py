"""The corpus builder: help-page and fortune parsing, the language filter, the page-aligned split, caching,
and (where apt-get is available) the real Debian packages."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import langid
import pytest

from moelpr_lab.corpora import (
    CorpusError,
    CorpusOptions,
    build_corpora,
    general_english_corpus,
    help_corpus,
    is_heldout,
)
from moelpr_lab.corpora.cli import main as corpora_main
from moelpr_lab.corpora.debian import download_deb, extract_deb
from moelpr_lab.corpora.langfilter import identify, keep_language
from moelpr_lab.corpora.sources import parse_fortunes, parse_help_page

HUNGARIAN = [
    "A dokumentum mentéséhez válassza a Fájl menü Mentés parancsát, majd adja meg a fájl nevét és helyét.",
    "Ebben a párbeszédablakban megadhatja, hogy a táblázat celláiban milyen formátumban jelenjenek meg a számok.",
    "Kattintson a gombra, ha a kijelölt szöveget egy új bekezdésbe szeretné áthelyezni a dokumentumon belül.",
]
ENGLISH = [
    "Choose Tools - Options to open the dialog where you can change the default settings of the program.",
    "This command inserts a new sheet before the current sheet and moves the following sheets to the right.",
    "Specifies whether the selected cells are protected against changes when the document is saved.",
]
TURKISH = "Belgeyi kaydetmek için Dosya menüsünden Kaydet komutunu seçin ve dosyanın adını girin."
GREEK = "Για να αποθηκεύσετε το έγγραφο, επιλέξτε την εντολή Αποθήκευση από το μενού Αρχείο."


def help_page(title: str, paragraphs: list[str]) -> str:
    """A page shaped like LibreOffice 7.4's help HTML: chrome around a DisplayArea, a code listing,
    a platform switch whose non-default variants are hidden, and a debug footer."""
    body = "\n".join(f'<p id="par_{i}" class="paragraph" dir="auto">{text}</p>' for i, text in enumerate(paragraphs))
    return f"""<!DOCTYPE html>
<html lang="xx" dir="ltr"><head><title>{title}</title><script>var x = 1;</script></head>
<body>
<header id="TopLeftHeader"><a class="logo" href="x"><p dir="auto">LibreOffice 7.4 Help</p></a></header>
<aside class="leftside"><div class="index-label" dir="auto">Index</div></aside>
<div id="DisplayArea">
<h1 id="hd_1" dir="auto">{title}</h1>
{body}
<p class="paragraph">Press <span class="switchinline"><span hidden="true" class="MAC">Command+S</span><span hidden="true" id="default">Ctrl+S</span></span> now.</p>
<div class="bascode"><pre class="language-visual-basic"><code>Sub Main
  MsgBox "Hello"
End Sub</code></pre></div>
<table><tr><td><p class="tablecontent">Cell   one<br>still cell <a href="y">one</a></p></td></tr></table>
</div>
<footer><div id="DEBUG"><p dir="auto">This page is: /text/shared/x.xhp</p></div></footer>
</body></html>
"""


def test_help_page_keeps_visible_prose_only():
    paragraphs = parse_help_page(help_page("Saving", ["First  paragraph\n with <a href='z'>a link</a>.", "Second."]))
    assert paragraphs == ["Saving", "First paragraph with a link.", "Second.", "Press now.", "Cell one", "still cell one"]


def test_fortunes_are_split_on_percent_lines_and_lose_overstrike():
    text = "First fortune,\nsecond line.\n\t\t-- Someone\n%\nB\x08Bold and _\x08u_\x08nderlined.\n%\n%\nLast.\n"
    assert parse_fortunes(text) == ["First fortune,\nsecond line.\n\t\t-- Someone", "Bold and underlined.", "Last."]


def test_identify_agrees_with_langid_classify():
    texts = HUNGARIAN + ENGLISH + [TURKISH, GREEK, "", "12345"]
    assert identify(texts) == [langid.classify(text)[0] for text in texts]
    assert identify([HUNGARIAN[0], ENGLISH[0], TURKISH, GREEK]) == ["hu", "en", "tr", "el"]


def test_keep_language_drops_untranslated_paragraphs_in_order():
    mixed = [HUNGARIAN[0], ENGLISH[0], HUNGARIAN[1], ENGLISH[1]]
    assert keep_language(mixed, "hu") == [HUNGARIAN[0], HUNGARIAN[1]]
    assert keep_language(mixed, "en") == [ENGLISH[0], ENGLISH[1]]


def test_split_depends_only_on_the_id():
    ids = [f"text/module/page{i}.html" for i in range(2000)]
    held = [doc_id for doc_id in ids if is_heldout(doc_id, 0.1)]
    assert held == [doc_id for doc_id in ids if is_heldout(doc_id, 0.1)]
    assert 0.07 < len(held) / len(ids) < 0.13
    assert set(held) <= {doc_id for doc_id in ids if is_heldout(doc_id, 0.3)}


def help_corpus_tree(cache: Path, code: str, package: str, pages: dict[str, list[str]]) -> None:
    """Lay out an already unpacked help package in the builder's cache, as ``dpkg-deb -x`` leaves it."""
    root = cache / "unpacked" / package
    lang_dir = root / "usr/share/libreoffice/help" / code
    for page_id, paragraphs in pages.items():
        (lang_dir / page_id).parent.mkdir(parents=True, exist_ok=True)
        (lang_dir / page_id).write_text(help_page(paragraphs[0], paragraphs), encoding="utf-8")
    (root / "usr/share/libreoffice/help/media/files").mkdir(parents=True)  # the package's non-page directory
    (root / ".extracted").touch()


def fortunes_tree(cache: Path, count: int) -> None:
    root = cache / "unpacked" / "fortunes"
    fortunes_dir = root / "usr/share/games/fortunes"
    fortunes_dir.mkdir(parents=True)
    quips = [f"{ENGLISH[i % 3]} Number {i} of the collection." for i in range(count)]
    (fortunes_dir / "wisdom").write_text("\n%\n".join(quips) + "\n%\n")
    (fortunes_dir / "wisdom.dat").write_bytes(b"\x00\x01binary index")
    (fortunes_dir / "wisdom.u8").symlink_to("wisdom")
    (fortunes_dir / "ascii-art").write_text("  /\\_/\\\n ( o.o )\n%\n")
    (root / ".extracted").touch()


@pytest.fixture
def synthetic_cache(tmp_path: Path) -> Path:
    cache = tmp_path / "cache"
    page_ids = [f"text/swriter/guide/page{i:02d}.html" for i in range(40)]
    hu_pages = {pid: [f"Oldal {i}", HUNGARIAN[i % 3], ENGLISH[i % 3], HUNGARIAN[(i + 1) % 3]] for i, pid in enumerate(page_ids)}
    en_pages = {pid: [f"Page {i}", ENGLISH[i % 3], ENGLISH[(i + 1) % 3]] for i, pid in enumerate(page_ids)}
    help_corpus_tree(cache, "hu", "libreoffice-help-hu", hu_pages)
    help_corpus_tree(cache, "en-US", "libreoffice-help-en-us", en_pages)
    fortunes_tree(cache, 300)
    return cache


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


SPECS = [help_corpus("hu", "new"), help_corpus("en", "old"), general_english_corpus()]


def test_build_corpora_filters_splits_and_registers(synthetic_cache, tmp_path):
    out = tmp_path / "corpora"
    manifest = build_corpora(SPECS, out, synthetic_cache, CorpusOptions(heldout_fraction=0.25), workers=2)

    hu_train, hu_held = read_jsonl(out / "hu_train.jsonl"), read_jsonl(out / "hu_heldout.jsonl")
    en_train, en_held = read_jsonl(out / "en_train.jsonl"), read_jsonl(out / "en_heldout.jsonl")
    assert hu_held and hu_train
    # The same pages are held out in every language, and never trained on.
    assert {r["id"] for r in hu_held} == {r["id"] for r in en_held}
    assert not {r["id"] for r in hu_train} & {r["id"] for r in hu_held}
    assert len(hu_train) + len(hu_held) == 40
    # Untranslated (English) paragraphs are gone from the Hungarian text, Hungarian ones stay.
    hu_text = "\n".join(r["text"] for r in hu_train + hu_held)
    assert not any(sentence in hu_text for sentence in ENGLISH)
    assert all(sentence in hu_text for sentence in HUNGARIAN)
    assert "MsgBox" not in hu_text and "LibreOffice 7.4 Help" not in hu_text
    assert all(sentence in "\n".join(r["text"] for r in en_train) for sentence in ENGLISH)
    # Fortunes: ascii-art and the .u8 symlink are not read, so every quip appears exactly once.
    general = read_jsonl(out / "en_general_train.jsonl") + read_jsonl(out / "en_general_heldout.jsonl")
    general_text = "\n\n".join(r["text"] for r in general)
    assert all(general_text.count(f"Number {i} of") == 1 for i in range(300))
    assert "o.o" not in general_text
    assert manifest["hu"]["stats"]["paragraphs"] == 40 * 8  # h1, 4 <p>, the switch <p>, 2 lines of the table cell
    info = json.loads((out / "dataset_info.json").read_text())
    assert info["hu_train"] == {"file_name": "hu_train.jsonl", "columns": {"prompt": "text"}, "language": "new"}
    assert info["en_heldout"]["language"] == "old" and info["en_general_train"]["language"] == "old"


def test_build_corpora_is_cached_and_rebuilds_when_options_change(synthetic_cache, tmp_path):
    out = tmp_path / "corpora"
    build_corpora(SPECS[:1], out, synthetic_cache, CorpusOptions(), workers=1)
    first = (out / "hu_train.jsonl").stat().st_mtime_ns
    build_corpora(SPECS[:1], out, synthetic_cache, CorpusOptions(), workers=1)
    assert (out / "hu_train.jsonl").stat().st_mtime_ns == first

    capped = CorpusOptions(max_documents=20, max_train_chars=400)
    manifest = build_corpora(SPECS[:1], out, synthetic_cache, capped, workers=1)
    train = read_jsonl(out / "hu_train.jsonl")
    assert manifest["hu"]["stats"]["pages"] == 20
    # The cap stops after the document that reaches it.
    assert sum(len(r["text"]) for r in train[:-1]) < 400 <= sum(len(r["text"]) for r in train)


def test_cli_reports_bad_options_in_one_line(capsys):
    with pytest.raises(SystemExit):
        corpora_main(["--heldout_fraction", "1.5"])
    assert "--heldout_fraction must be between 0 and 1" in capsys.readouterr().err


needs_dpkg = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb is not installed")
needs_apt = pytest.mark.skipif(shutil.which("apt-get") is None, reason="apt-get is not installed (not Debian)")


@needs_dpkg
def test_extract_deb_unpacks_a_real_package_once(tmp_path):
    tree = tmp_path / "pkg"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN/control").write_text(
        "Package: moelpr-test\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@example.org>\nDescription: test\n"
    )
    (tree / "usr/share/games/fortunes").mkdir(parents=True)
    (tree / "usr/share/games/fortunes/wisdom").write_text("Hello.\n%\n")
    deb = tmp_path / "moelpr-test_1.0_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(tree), str(deb)], check=True, capture_output=True)

    target = extract_deb(deb, tmp_path / "unpacked")
    assert (target / "usr/share/games/fortunes/wisdom").read_text() == "Hello.\n%\n"
    (target / "usr/share/games/fortunes/wisdom").write_text("changed")
    extract_deb(deb, target)  # done before: left alone
    assert (target / "usr/share/games/fortunes/wisdom").read_text() == "changed"


@needs_apt
def test_unknown_package_gives_a_clear_error(tmp_path):
    with pytest.raises(CorpusError, match="no-such-package-moelpr"):
        download_deb("no-such-package-moelpr", tmp_path)


@needs_apt
@needs_dpkg
def test_real_debian_packages(tmp_path):
    """Downloads libreoffice-help-hu, -en-us and fortunes (about 6 MB) and builds small corpora from them."""
    out = tmp_path / "corpora"
    specs = [help_corpus("hu", "new"), help_corpus("en", "old"), general_english_corpus()]
    manifest = build_corpora(specs, out, tmp_path / "cache", CorpusOptions(max_documents=150), workers=2)
    hu, en = manifest["hu"]["stats"], manifest["en"]["stats"]
    assert hu["pages"] == en["pages"] == 150
    # Part of the Hungarian help is untranslated English that the filter drops; the English original keeps nearly all.
    assert 0.3 < hu["chars_kept"] / hu["chars"] < 0.95 < en["chars_kept"] / en["chars"]
    hu_held, en_held = read_jsonl(out / "hu_heldout.jsonl"), read_jsonl(out / "en_heldout.jsonl")
    assert all(is_heldout(r["id"], CorpusOptions.heldout_fraction) for r in hu_held + en_held)
    assert {r["id"] for r in hu_held} & {r["id"] for r in en_held}
    assert identify([r["text"] for r in hu_held]) == ["hu"] * len(hu_held)
    general = read_jsonl(out / "en_general_train.jsonl")
    assert manifest["en_general"]["stats"]["fortunes"] == 150 and general
