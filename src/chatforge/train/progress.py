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
    """A tqdm bar on a terminal; elsewhere (logs, CI) one plain line a minute, so logs stay readable."""

    def __init__(self, total: int, initial: int, enabled: bool, desc: str = "train") -> None:
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()
        self.total = total
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                        disable=not self.tty)
        self.smoothed: float | None = None
        self.last_line = time.monotonic()

    def update(self, step: int, loss: float, tokens_per_s: float | None, mfu: float | None) -> None:
        if not self.enabled:
            return
        self.smoothed = loss if self.smoothed is None else 0.9 * self.smoothed + 0.1 * loss
        parts = [f"loss {self.smoothed:.4f}"]
        if tokens_per_s:
            parts.append(f"{tokens_per_s:,.0f} tok/s")
        if mfu is not None:
            parts.append(f"MFU {100 * mfu:.1f}%")
        text = ", ".join(parts)
        if self.tty:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
        elif time.monotonic() - self.last_line > 60 or step == self.total:
            self.last_line = time.monotonic()
            print(f"step {step}/{self.total}: {text}", file=sys.stderr, flush=True)

    def write(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()
