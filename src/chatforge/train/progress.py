"""What a training run shows while it works: a tqdm bar with loss, tokens/s, model FLOPs utilisation and ETA."""
from __future__ import annotations

import functools
import sys
import time

import torch
from tqdm import tqdm


@functools.lru_cache(maxsize=None)
def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul on this device: the ceiling that MFU is measured against."""
    n = 2048 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for i in range(6):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        if i:  # the first call pays for allocation and kernel selection
            best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """A tqdm bar on a terminal; elsewhere (logs, CI) a plain line with the ETA, at the first update, then once
    every `every` seconds and at the end, so logs stay readable."""

    def __init__(self, total: int, initial: int, enabled: bool, desc: str = "train", unit: str = "step",
                 every: float = 60.0) -> None:
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()
        self.total, self.initial, self.desc, self.unit, self.every = total, initial, desc, unit, every
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, disable=not self.tty)
        self.smoothed: float | None = None
        self.started = time.monotonic()
        self.last_line: float | None = None

    def show(self, done: int, text: str, final: bool = False) -> None:
        """`done` of `total` units finished; `text` is the stage's numbers. `final` forces the log line."""
        if not self.enabled:
            return
        if self.tty:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(done - self.bar.n)
            return
        now = time.monotonic()
        if final or done >= self.total or self.last_line is None or now - self.last_line >= self.every:
            self.last_line = now
            eta = self.eta(done)
            print(f"{self.desc}: {self.unit} {done}/{self.total}, {text}"
                  + (f", ETA {duration(eta)}" if eta is not None and done < self.total and not final else ""),
                  file=sys.stderr, flush=True)

    def eta(self, done: int) -> float | None:
        """Seconds left at the average pace since this bar started (None before any progress)."""
        if done <= self.initial:
            return None
        return (self.total - done) * (time.monotonic() - self.started) / (done - self.initial)

    def update(self, step: int, loss: float, tokens_per_s: float | None, mfu: float | None) -> None:
        """The training loop's numbers: smoothed loss, tokens/s, MFU."""
        self.smoothed = loss if self.smoothed is None else 0.9 * self.smoothed + 0.1 * loss
        parts = [f"loss {self.smoothed:.4f}"]
        if tokens_per_s:
            parts.append(f"{tokens_per_s:,.0f} tok/s")
        if mfu is not None:
            parts.append(f"MFU {100 * mfu:.1f}%")
        self.show(step, ", ".join(parts))

    def write(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()
