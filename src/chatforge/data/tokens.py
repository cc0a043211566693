"""Token data: a corpus tokenized once into memory-mapped shards, and batches of random windows from them.

    CACHE/<key>/index.json  train-00000.bin ...  val-00000.bin ...

`key` hashes the corpus contents, the tokenizer and the split settings, so a re-run with the same inputs
reuses the shards and any change re-tokenizes. Documents are streamed (never a whole corpus in memory),
encoded in batches by the tokenizers library's parallel `encode_batch`, each prefixed with the BOS token,
and sent whole to the validation split when a hash of their text falls under `val_fraction`.

Batches are a pure function of (seed, step): resuming at step N needs no sampler state, and the windows
of a step are the same whatever the number of ranks or accumulation micro-steps they are split over.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from chatforge import ChatforgeError
from chatforge.checkpoint import atomic_write_text, file_hash
from chatforge.data.corpus import corpus_files, iter_documents
from chatforge.tokenizer import Tokenizer

DATA_VERSION = 1
SHARD_TOKENS = 1 << 28  # 256M tokens: 512 MB as uint16
ENCODE_CHARS = 1 << 20  # documents are encoded in batches of about this many characters


def tokenizer_hash(tokenizer: Tokenizer) -> str:
    return hashlib.sha256(tokenizer.tok.to_str().encode()).hexdigest()[:16]


def corpus_hash(paths: list[str | Path]) -> str:
    """Hash of the corpus contents in reading order (names and locations do not matter)."""
    files = corpus_files(paths)
    seen = tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if seen not in _corpus_hashes:  # a large corpus is read once per process, however often it is asked for
        h = hashlib.sha256()
        for f in files:
            h.update(file_hash(f).encode())
        _corpus_hashes[seen] = h.hexdigest()[:16]
    return _corpus_hashes[seen]


_corpus_hashes: dict[tuple, str] = {}


def data_key(paths: list[str | Path], tokenizer: Tokenizer, val_fraction: float,
             shard_tokens: int = SHARD_TOKENS) -> str:
    spec = {"version": DATA_VERSION, "corpus": corpus_hash(paths), "tokenizer": tokenizer_hash(tokenizer),
            "val_fraction": val_fraction, "shard_tokens": shard_tokens}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


class TokenSplit:
    """The shards of one split, memory-mapped, read as one sequence of windows."""

    def __init__(self, root: Path, files: list[str], dtype: str) -> None:
        self.shards = [np.memmap(root / f, dtype=dtype, mode="r") for f in files]
        self.tokens = sum(len(s) for s in self.shards)

    def num_windows(self, context: int) -> int:
        return sum(max(len(s) - context, 0) for s in self.shards)

    def windows(self, starts: np.ndarray, context: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets [len(starts), context] for global window indices `starts`."""
        counts = np.array([max(len(s) - context, 0) for s in self.shards])
        bounds = np.cumsum(counts)
        shard_of = np.searchsorted(bounds, starts, side="right")
        rows = np.empty((len(starts), context + 1), dtype=np.int64)
        for i, (shard, start) in enumerate(zip(shard_of, starts)):
            offset = start - (bounds[shard] - counts[shard])
            rows[i] = self.shards[shard][offset:offset + context + 1]
        rows_t = torch.from_numpy(rows)
        return rows_t[:, :-1], rows_t[:, 1:]


@dataclass
class TokenData:
    root: Path
    index: dict
    train: TokenSplit
    val: TokenSplit | None

    @classmethod
    def open(cls, root: str | Path) -> "TokenData":
        root = Path(root)
        try:
            index = json.loads((root / "index.json").read_text())
        except (OSError, json.JSONDecodeError):
            raise ChatforgeError(f"{root}: not a token cache (index.json missing or unreadable)") from None
        if index.get("version") != DATA_VERSION:
            raise ChatforgeError(f"{root}/index.json: token cache version {index.get('version')!r}, "
                                 f"this chatforge reads version {DATA_VERSION}; delete the directory to rebuild it")
        val = TokenSplit(root, index["val"], index["dtype"]) if index["val"] else None
        return cls(root, index, TokenSplit(root, index["train"], index["dtype"]), val)


def tokenize_corpus(paths: list[str | Path], tokenizer: Tokenizer, cache_dir: str | Path,
                    val_fraction: float = 0.01, shard_tokens: int = SHARD_TOKENS,
                    progress: bool = True) -> TokenData:
    """Token shards for a corpus, built once and reused from `cache_dir/<key>` afterwards."""
    if not 0 <= val_fraction < 1:
        raise ChatforgeError(f"val_fraction: must be in [0, 1), got {val_fraction}")
    key = data_key(paths, tokenizer, val_fraction, shard_tokens)
    root = Path(cache_dir) / key
    if (root / "index.json").is_file():
        return TokenData.open(root)
    tmp = root.with_name(f"{key}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        index = _write_shards(paths, tokenizer, tmp, val_fraction, shard_tokens, progress)
        index["key"] = key
        atomic_write_text(tmp / "index.json", json.dumps(index, indent=2))
        try:
            os.rename(tmp, root)
        except OSError:  # another process built the same shards first: theirs are identical
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return TokenData.open(root)


class _ShardWriter:
    def __init__(self, root: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.root, self.split, self.dtype, self.shard_tokens = root, split, dtype, shard_tokens
        self.files: list[str] = []
        self.tokens = 0
        self._fh = None
        self._room = 0

    def write(self, ids: np.ndarray) -> None:
        self.tokens += len(ids)
        while len(ids):
            if self._room == 0:
                self._next_shard()
            part, ids = ids[:self._room], ids[self._room:]
            self._fh.write(part.astype(self.dtype).tobytes())
            self._room -= len(part)

    def _next_shard(self) -> None:
        self.close()
        name = f"{self.split}-{len(self.files):05d}.bin"
        self.files.append(name)
        self._fh = open(self.root / name, "wb")
        self._room = self.shard_tokens

    def close(self) -> None:
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None


def _write_shards(paths: list[str | Path], tokenizer: Tokenizer, root: Path, val_fraction: float,
                  shard_tokens: int, progress: bool) -> dict:
    from tqdm import tqdm

    files = corpus_files(paths)
    total_bytes = sum(f.stat().st_size for f in files)
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32)
    writers = {s: _ShardWriter(root, s, dtype, shard_tokens) for s in ("train", "val")}
    separator = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.pad_id
    docs = {"train": 0, "val": 0}
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=None if progress else True, leave=False)
    for batch in _document_batches(files):
        for text, ids in zip(batch, tokenizer.encode_batch(batch)):
            split = "val" if zlib.crc32(text.encode()) % 10_000 < val_fraction * 10_000 else "train"
            writers[split].write(np.array([separator, *ids], dtype=np.int64))
            docs[split] += 1
        bar.update(sum(len(t) for t in batch))
    bar.close()
    for w in writers.values():
        w.close()
    if writers["train"].tokens == 0 and writers["val"].tokens == 0:
        raise ChatforgeError(f"{', '.join(map(str, paths))}: the corpus holds no text")
    if val_fraction > 0 and writers["val"].tokens == 0:
        _move_tail_to_val(root, writers, val_fraction)
    return {"version": DATA_VERSION, "dtype": dtype.name, "vocab_size": tokenizer.vocab_size,
            "files": [str(f) for f in files], "bytes": total_bytes, "documents": docs,
            "train": writers["train"].files, "val": writers["val"].files,
            "train_tokens": writers["train"].tokens, "val_tokens": writers["val"].tokens}


def _document_batches(files: list[Path]) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for f in files:
        for doc in iter_documents(f):
            batch.append(doc)
            size += len(doc)
            if size >= ENCODE_CHARS:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


def _move_tail_to_val(root: Path, writers: dict[str, _ShardWriter], val_fraction: float) -> None:
    """Too few documents for the hash split to pick any: hold out the end of the last train shard instead."""
    train, val = writers["train"], writers["val"]
    last = root / train.files[-1]
    length = last.stat().st_size // train.dtype.itemsize
    n_val = min(max(int(train.tokens * val_fraction), 1), length - 1)
    if n_val <= 0:
        return
    val.write(np.array(np.memmap(last, dtype=train.dtype, mode="r")[length - n_val:]))
    val.close()
    train.tokens -= n_val
    with open(last, "r+b") as fh:
        fh.truncate((length - n_val) * train.dtype.itemsize)


class WindowSampler:
    """Random windows of `context` tokens: `sampler(step, micro)` is this rank's share of step `step`.

    A step's `batch_size` windows are drawn from a generator seeded by (seed, step) and dealt out as
    `grad_accum` micro-batches x `world_size` ranks of batch_size / (grad_accum x world_size) rows each.
    """

    def __init__(self, split: TokenSplit, context: int, batch_size: int, grad_accum: int = 1, seed: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        self.split, self.context, self.seed = split, context, seed
        self.batch_size, self.grad_accum, self.rank, self.world_size = batch_size, grad_accum, rank, world_size
        parts = grad_accum * world_size
        if batch_size % parts:
            raise ChatforgeError(f"batch_size {batch_size} does not split into grad_accum {grad_accum} x "
                                 f"{world_size} rank(s)")
        self.rows = batch_size // parts
        self.num_windows = split.num_windows(context)
        if self.num_windows <= 0:
            raise ChatforgeError(f"the training split has {split.tokens} tokens, fewer than context {context} + 1: "
                                 f"use a bigger corpus or a smaller context")

    def __call__(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, self.num_windows, size=self.batch_size)
        first = (micro * self.world_size + self.rank) * self.rows
        return self.split.windows(starts[first:first + self.rows], self.context)


def eval_batches(split: TokenSplit, context: int, rows: int, windows: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`windows` evenly spaced windows over a split, the same at every evaluation, in batches of `rows`.

    A split shorter than `context` + 1 tokens is read as one shorter window.
    """
    context = min(context, split.tokens - 1)
    n = split.num_windows(context)
    if n <= 0:
        return []
    starts = np.unique(np.linspace(0, n - 1, num=min(windows, n)).astype(np.int64))
    return [split.windows(starts[i:i + rows], context) for i in range(0, len(starts), rows)]
