"""Raw text corpora: plain-text files, JSONL with a `text` field, or directories of them, read as a stream."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from chatforge import ChatforgeError
from chatforge.data.jsonl import read_jsonl

TEXT_SUFFIXES = (".txt", ".md", ".jsonl")


def corpus_files(paths: list[str | Path]) -> list[Path]:
    """Expand directories (recursively, sorted) and check that something is there."""
    if not paths:
        raise ChatforgeError("no corpus given")
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
            if not found:
                raise ChatforgeError(f"{p}: directory holds no .txt, .md or .jsonl file")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise ChatforgeError(f"{p}: corpus file not found")
    return files


def iter_documents(path: Path) -> Iterator[str]:
    """Documents of one file: each JSONL record's `text`, or a text file split on blank lines."""
    if path.stat().st_size == 0:
        raise ChatforgeError(f"{path}: corpus file is empty")
    if path.suffix == ".jsonl":
        for lineno, record in read_jsonl(path):
            if not isinstance(record.get("text"), str):
                raise ChatforgeError(f"{path}:{lineno}: record has no string field 'text'")
            yield record["text"]
        return
    with open(path, "rb") as f:
        paragraph: list[str] = []
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ChatforgeError(f"{path}:{lineno}: not UTF-8 (byte {e.start} of the line)") from None
            if line.strip():
                paragraph.append(line)
            elif paragraph:
                yield "".join(paragraph).rstrip("\n")
                paragraph = []
        if paragraph:
            yield "".join(paragraph).rstrip("\n")


def iter_corpus(paths: list[str | Path]) -> Iterator[str]:
    for f in corpus_files(paths):
        yield from iter_documents(f)
