"""Build the demo corpora: per-language train / held-out jsonl files and their dataset_info.json."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

from tqdm.auto import tqdm

from .debian import fetch_package
from .langfilter import keep_language
from .sources import Document, help_language_dir, iter_help_pages, load_fortunes, load_help_page

logger = logging.getLogger(__name__)

FORTUNES_PACKAGE = "fortunes"
GENERAL_ENGLISH = "en_general"
# Fortunes are a sentence or two; grouping neighbours gives documents of help-page size.
FORTUNE_DOCUMENT_CHARS = 1000
MANIFEST = "corpora.json"
# The role of an original language kept for evaluation only (the paper's unseen original languages): only its
# held-out pages are written, and it gets no dataset_info.json entry, so no recipe can train on or replay it.
UNSEEN = "unseen"


@dataclass(frozen=True)
class CorpusOptions:
    """Everything that changes the content of a built corpus (a change invalidates the cache)."""

    heldout_fraction: float = 0.1
    max_documents: int | None = None
    max_train_chars: int | None = None
    max_heldout_chars: int | None = None


@dataclass(frozen=True)
class CorpusSpec:
    """One corpus to build: ``name`` is used in file and dataset names, ``role`` is ``new``, ``old`` or ``unseen``
    (an old language evaluated only: see :data:`UNSEEN`)."""

    name: str
    package: str
    langid_code: str
    role: str


def help_corpus(code: str, role: str) -> CorpusSpec:
    """The LibreOffice help of language ``code`` (as Debian names it: ``hu``, ``pt-br``, ``en-us``)."""
    code = code.strip().lower()
    package_code = "en-us" if code == "en" else code
    return CorpusSpec(code.replace("-", "_"), f"libreoffice-help-{package_code}", code.split("-")[0], role)


def general_english_corpus() -> CorpusSpec:
    return CorpusSpec(GENERAL_ENGLISH, FORTUNES_PACKAGE, "en", "old")


def splits(spec: CorpusSpec) -> tuple[str, ...]:
    """The files a corpus has: an unseen language only its held-out pages. Only those pages, not the whole package,
    because the train pages of the other languages are translations of its other pages."""
    return ("heldout",) if spec.role == UNSEEN else ("train", "heldout")


def _unit_hash(salt: str, doc_id: str) -> float:
    """A deterministic number in [0, 1) for a document id; independent for different salts."""
    digest = hashlib.sha256(f"{salt}:{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_heldout(doc_id: str, fraction: float) -> bool:
    """Held-out membership depends only on the id, so every language holds out the same help pages."""
    return _unit_hash("split", doc_id) < fraction


def shuffled(doc_ids: Iterable[str]) -> list[str]:
    """Ids in a deterministic pseudo-random order, so that a size cap samples every help module."""
    return sorted(doc_ids, key=lambda doc_id: _unit_hash("order", doc_id))


def _filter_page(lang_dir: Path, langid_code: str, page: Path) -> tuple[Document, int, int]:
    """Load one page, keep its paragraphs in ``langid_code``; also return the paragraph and char counts before."""
    document = load_help_page(lang_dir, page)
    kept = Document(document.doc_id, tuple(keep_language(document.paragraphs, langid_code)))
    return kept, len(document.paragraphs), sum(len(p) for p in document.paragraphs)


def _cap(documents: Sequence[Document], max_chars: int | None) -> list[Document]:
    kept, total = [], 0
    for document in documents:
        if max_chars is not None and total >= max_chars:
            break
        kept.append(document)
        total += sum(len(p) for p in document.paragraphs)
    return kept


def _write_jsonl(path: Path, documents: Sequence[Document], separator: str) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for document in documents:
            handle.write(json.dumps({"text": separator.join(document.paragraphs), "id": document.doc_id}, ensure_ascii=False) + "\n")
    tmp.replace(path)  # a killed run never leaves a truncated file that a later run would take as done


def _group_fortunes(fortunes: Sequence[Document]) -> list[Document]:
    groups: list[Document] = []
    current: list[Document] = []
    for fortune in fortunes:
        current.append(fortune)
        if sum(len(f.paragraphs[0]) for f in current) >= FORTUNE_DOCUMENT_CHARS:
            groups.append(Document(current[0].doc_id, tuple(f.paragraphs[0] for f in current)))
            current = []
    if current:
        groups.append(Document(current[0].doc_id, tuple(f.paragraphs[0] for f in current)))
    return groups


def _help_documents(spec: CorpusSpec, unpacked: Path, options: CorpusOptions, workers: int) -> tuple[list[Document], dict]:
    lang_dir = help_language_dir(unpacked)
    pages = {page.relative_to(lang_dir).as_posix(): page for page in iter_help_pages(lang_dir)}
    order = shuffled(pages)[: options.max_documents]
    work = partial(_filter_page, lang_dir, spec.langid_code)
    paths = [pages[doc_id] for doc_id in order]
    progress = {"total": len(paths), "desc": f"{spec.name}: parse + langid", "unit": "page"}
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(tqdm(pool.map(work, paths, chunksize=16), **progress))
    else:
        results = [work(path) for path in tqdm(paths, **progress)]
    documents = [document for document, _, _ in results if document.paragraphs]
    stats = {
        "pages": len(results),
        "pages_with_text": len(documents),
        "paragraphs": sum(n for _, n, _ in results),
        "paragraphs_kept": sum(len(d.paragraphs) for d in documents),
        "chars": sum(c for _, _, c in results),
        "chars_kept": sum(len(p) for d in documents for p in d.paragraphs),
    }
    return documents, stats


def _fortune_documents(spec: CorpusSpec, unpacked: Path, options: CorpusOptions) -> tuple[list[Document], dict]:
    fortunes = load_fortunes(unpacked)
    if options.max_documents is not None:
        keep_ids = set(shuffled(f.doc_id for f in fortunes)[: options.max_documents])
        fortunes = [f for f in fortunes if f.doc_id in keep_ids]
    kept = [f for f in tqdm(fortunes, desc=f"{spec.name}: langid", unit="fortune") if keep_language(f.paragraphs, spec.langid_code)]
    stats = {
        "fortunes": len(fortunes),
        "fortunes_kept": len(kept),
        "chars": sum(len(f.paragraphs[0]) for f in fortunes),
        "chars_kept": sum(len(f.paragraphs[0]) for f in kept),
    }
    return kept, stats


def build_corpus(spec: CorpusSpec, output_dir: Path, cache_dir: Path, options: CorpusOptions, workers: int) -> dict:
    """Build ``{name}_train.jsonl`` and ``{name}_heldout.jsonl`` for one corpus; return its statistics."""
    unpacked = fetch_package(spec.package, cache_dir)
    if spec.package == FORTUNES_PACKAGE:
        documents, stats = _fortune_documents(spec, unpacked, options)
    else:
        documents, stats = _help_documents(spec, unpacked, options, workers)

    by_id = {d.doc_id: d for d in documents}
    ordered = [by_id[doc_id] for doc_id in shuffled(by_id)]
    train = [d for d in ordered if not is_heldout(d.doc_id, options.heldout_fraction)]
    heldout = [d for d in ordered if is_heldout(d.doc_id, options.heldout_fraction)]
    if spec.package == FORTUNES_PACKAGE:
        # Split single fortunes first (so the split is fine-grained), then group each side.
        train, heldout = _group_fortunes(train), _group_fortunes(heldout)
        separator = "\n\n"
    else:
        separator = "\n"
    train, heldout = _cap(train, options.max_train_chars), _cap(heldout, options.max_heldout_chars)
    if not train or not heldout:
        raise ValueError(f"{spec.name}: the split left no train or no held-out text ({stats}); raise max_documents")

    _write_jsonl(output_dir / f"{spec.name}_heldout.jsonl", heldout, separator)
    if spec.role == UNSEEN:
        (output_dir / f"{spec.name}_train.jsonl").unlink(missing_ok=True)  # left by a build with another role
        train = []
    else:
        _write_jsonl(output_dir / f"{spec.name}_train.jsonl", train, separator)
    for split, docs in (("train", train), ("heldout", heldout)):
        stats[f"{split}_documents"] = len(docs)
        stats[f"{split}_chars"] = sum(len(separator.join(d.paragraphs)) for d in docs)
    return stats


def dataset_entries(specs: Sequence[CorpusSpec]) -> dict[str, dict]:
    """dataset_info.json entries (LLaMA-Factory pre-training format) with the MoE-LPR ``language`` tag; none for
    unseen languages."""
    entries = {}
    for spec in specs:
        if spec.role == UNSEEN:
            continue
        for split in ("train", "heldout"):
            entries[f"{spec.name}_{split}"] = {
                "file_name": f"{spec.name}_{split}.jsonl",
                "columns": {"prompt": "text"},
                "language": spec.role,
            }
    return entries


def build_corpora(
    specs: Sequence[CorpusSpec],
    output_dir: Path,
    cache_dir: Path,
    options: CorpusOptions = CorpusOptions(),
    workers: int | None = None,
) -> dict[str, dict]:
    """Build every corpus in ``specs`` (skipping those already built with the same options) and
    write/update ``dataset_info.json`` in ``output_dir``; return the manifest (options + statistics)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    workers = workers or os.cpu_count() or 1
    manifest_path = output_dir / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    for spec in specs:
        record = {"spec": asdict(spec), "options": asdict(options)}
        done = all((output_dir / f"{spec.name}_{split}.jsonl").exists() for split in splits(spec))
        previous = manifest.get(spec.name, {})
        if done and {k: previous.get(k) for k in record} == record:
            logger.info("%s: already built in %s, skipping", spec.name, output_dir)
            continue
        stats = build_corpus(spec, output_dir, cache_dir, options, workers)
        manifest[spec.name] = {**record, "stats": stats}
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
        logger.info(
            "%s: kept %d of %d chars (%.0f%%); train %d docs / %d chars, held-out %d docs / %d chars",
            spec.name, stats["chars_kept"], stats["chars"], 100 * stats["chars_kept"] / max(stats["chars"], 1),
            stats["train_documents"], stats["train_chars"], stats["heldout_documents"], stats["heldout_chars"],
        )

    info_path = output_dir / "dataset_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    for spec in specs:
        if spec.role == UNSEEN:  # an entry left by a build that gave the language another role
            for split in ("train", "heldout"):
                info.pop(f"{spec.name}_{split}", None)
    info.update(dataset_entries(specs))
    info_path.write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    return manifest
