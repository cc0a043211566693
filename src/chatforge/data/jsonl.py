"""JSON Lines files: the one reader (every error names file:line) and the one writer (atomic) of the project."""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from chatforge import ChatforgeError
from chatforge.atomic import atomic_write_text


def read_jsonl(path: str | Path, what: str = "file") -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line, streamed; a missing file, a line that is not UTF-8,
    not JSON or not a JSON object raises naming `path:line` (`what` names the file in "not found")."""
    path = Path(path)
    if not path.is_file():
        raise ChatforgeError(f"{path}: {what} not found")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                raise ChatforgeError(f"{path}:{lineno}: not UTF-8 (byte {e.start} of the line)") from None
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ChatforgeError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise ChatforgeError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            yield lineno, record


def iter_jsonl(path: str | Path, what: str = "file") -> Iterator[tuple[str, dict[str, Any]]]:
    """("file:line", object) for each non-blank line: `read_jsonl` with the place validators name in errors."""
    for lineno, record in read_jsonl(path, what):
        yield f"{path}:{lineno}", record


def to_jsonl(records: Iterable[dict[str, Any]]) -> str:
    """One JSON object a line, UTF-8 kept readable (not \\u-escaped)."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    """Write the records atomically: the file appears whole or not at all."""
    atomic_write_text(path, to_jsonl(records))
