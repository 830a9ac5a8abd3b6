"""Texts of a jsonl corpus (one ``{"text": ...}`` object per line), read lazily."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from .errors import MoELPRUserError


class MalformedJsonl(MoELPRUserError, ValueError):
    """A line of a jsonl corpus that is not an object with the text field."""

    exit_status = 1


def iter_jsonl_texts(path: Path, text_field: str = "text") -> Iterator[str]:
    """The ``text_field`` of every non-empty line of ``path``, in file order, one line in memory at a time."""
    with Path(path).open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise MalformedJsonl(f"{path}:{number} is not a JSON object") from None
            if not isinstance(record, dict) or text_field not in record:
                raise MalformedJsonl(f"{path}:{number} has no {text_field!r} field")
            yield record[text_field]
