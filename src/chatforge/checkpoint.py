"""Checkpoint directories: the one unit that flows between stages.

    DIR/config.json  model.safetensors  tokenizer.json  tokenizer_config.json  meta.json  state/  metrics.jsonl

A save writes a complete sibling directory, then swaps it in with two renames; `resolve` finishes a swap
that a crash interrupted. So a SIGKILL at any instant leaves either the old or the new checkpoint, whole.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from chatforge import ChatforgeError, __version__
from chatforge.atomic import atomic_write_bytes, atomic_write_text  # noqa: F401  (stages import them from here)

FORMAT_VERSION = 1
REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "meta.json")
KINDS = ("base", "sft", "reward", "policy", "adapter", "value")


def file_hash(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def resolve(path: str | Path) -> Path:
    """The checkpoint at `path`, completing an interrupted swap if a crash left one."""
    path = Path(path)
    old = path.with_name(path.name + ".old")
    if not path.exists() and old.exists():
        os.rename(old, path)
    elif path.exists() and old.exists():
        shutil.rmtree(old)
    return path


def _missing(path: Path) -> list[str]:
    """Required files absent; an adapter checkpoint holds adapter.safetensors instead of model.safetensors."""
    missing = [f for f in REQUIRED if not (path / f).is_file()]
    if missing == ["model.safetensors"] and (path / "adapter.safetensors").is_file():
        return []
    return missing


def is_complete(path: str | Path) -> bool:
    path = resolve(path)
    return path.is_dir() and not _missing(path)


class CheckpointWriter:
    """Stage a new checkpoint in a temporary sibling directory; `commit()` swaps it in atomically."""

    def __init__(self, path: str | Path) -> None:
        self.path = resolve(path)
        self.tmp = self.path.with_name(self.path.name + f".tmp-{os.getpid()}")
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)

    def file(self, name: str) -> Path:
        p = self.tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def write_json(self, name: str, obj: Any) -> None:
        self.file(name).write_text(json.dumps(obj, indent=2, default=str))

    def write_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        # safetensors refuses shared storage (tied embeddings): the tie is recorded in config.json instead.
        seen: set[int] = set()
        out = {}
        for k, t in tensors.items():
            key = t.data_ptr()
            if key in seen and k == "lm_head.weight":
                continue
            seen.add(key)
            out[k] = t.detach().contiguous().cpu()
        save_file(out, str(self.file(name)), metadata={"format": "pt"})

    def copy_in(self, name: str, source: Path) -> None:
        if source.is_file():
            shutil.copy2(source, self.file(name))

    def commit(self) -> Path:
        for f in self.tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = self.path.with_name(self.path.name + ".old")
        if self.path.exists():
            os.rename(self.path, old)
        os.rename(self.tmp, self.path)
        if old.exists():
            shutil.rmtree(old)
        return self.path

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    return state


def save_model_checkpoint(path: str | Path, model: torch.nn.Module, tokenizer: Any, meta: dict[str, Any],
                          state: dict[str, Any] | None = None, metrics_from: Path | None = None,
                          extra_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a full checkpoint directory atomically. `meta` must name `kind` and `stage`."""
    if meta.get("kind") not in KINDS:
        raise ValueError(f"meta.kind must be one of {KINDS}")
    w = CheckpointWriter(path)
    try:
        w.write_json("config.json", model.config.to_hf())
        w.write_tensors("model.safetensors", {**model_state(model), **(extra_tensors or {})})
        tokenizer.save(w.tmp)
        w.write_json("meta.json", {"format_version": FORMAT_VERSION, "code_version": __version__,
                                   "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **meta})
        if state is not None:
            torch.save(state, w.file("state/trainer.pt"))
        if metrics_from is not None:
            w.copy_in("metrics.jsonl", metrics_from)
        return w.commit()
    except BaseException:
        w.abort()
        raise


def read_meta(path: str | Path) -> dict[str, Any]:
    path = resolve(path)
    if not path.is_dir():
        raise ChatforgeError(f"{path}: checkpoint directory not found")
    missing = _missing(path)
    if missing:
        raise ChatforgeError(f"{path}: incomplete checkpoint, missing {', '.join(missing)}")
    meta = json.loads((path / "meta.json").read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ChatforgeError(f"{path}/meta.json: checkpoint format {meta.get('format_version')!r} is not "
                             f"supported by this chatforge (format {FORMAT_VERSION})")
    return meta


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               expect_kind: tuple[str, ...] | None = None):
    """(model, tokenizer, meta) from a checkpoint directory. Reward models come back with their head."""
    from chatforge.model.transformer import GPT, ModelConfig
    from chatforge.tokenizer import Tokenizer
    path = resolve(path)
    meta = read_meta(path)
    if expect_kind is not None and meta["kind"] not in expect_kind and meta.get("acts_as") not in expect_kind:
        raise ChatforgeError(f"{path}: is a {meta['kind']} checkpoint, expected {' or '.join(expect_kind)}")
    if meta["kind"] == "adapter":  # LoRA / P-tuning saved alone: load its base, then apply it
        from chatforge.model.adapters import load_adapter_checkpoint
        return load_adapter_checkpoint(path, device=device, dtype=dtype)
    cfg = ModelConfig.from_hf(json.loads((path / "config.json").read_text()))
    tensors = load_file(str(path / "model.safetensors"))
    if meta["kind"] in ("reward", "value"):
        from chatforge.model.heads import ScalarModel
        model: torch.nn.Module = ScalarModel(cfg, likelihood=1.0 if "likelihood_weight" in tensors else 0.0)
    else:
        model = GPT(cfg)
    load_weights(model, tensors, path / "model.safetensors")
    model.to(device=device, dtype=dtype)
    return model, Tokenizer.load(path), meta


def load_weights(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where: Path | str) -> None:
    """Load by name, naming any missing, unexpected or mis-shaped tensor."""
    own = model.state_dict()
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        own.pop("lm_head.weight", None)
        tensors = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing:
        raise ChatforgeError(f"{where}: missing weight {missing[0]}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
    if unexpected:
        raise ChatforgeError(f"{where}: unexpected weight {unexpected[0]}" + (f" (+{len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    for k, v in tensors.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ChatforgeError(f"{where}: weight {k} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}")
    model.load_state_dict(tensors, strict=False)


class RunLock:
    """An exclusive lock beside a checkpoint or run directory; the OS drops it if the holder dies."""

    def __init__(self, path: str | Path) -> None:
        self.target = Path(path)
        self.path = Path(str(path).rstrip("/") + ".lock")
        self.fd: int | None = None

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ChatforgeError(f"{self.target} is in use by {holder}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}: "
                     f"{' '.join(sys.argv[:3])}".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
