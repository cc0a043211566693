"""Where tensors live (CUDA, then Apple's MPS, then the CPU, unless the user names one) and in which precision."""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from chatforge import ChatforgeError


def pick_device(name: str | torch.device | None = None) -> torch.device:
    """`name` (cuda, cuda:1, mps, cpu) or the best available device."""
    if isinstance(name, torch.device):
        return name
    if name:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ChatforgeError(f"--device {name!r}: unknown device (expected cuda, mps or cpu)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ChatforgeError(f"--device {name}: CUDA is not available on this machine")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ChatforgeError(f"--device {name}: MPS is not available on this machine")
        if device.type not in ("cuda", "mps", "cpu"):
            raise ChatforgeError(f"--device {name}: unsupported device type (expected cuda, mps or cpu)")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively (faster than fp32) on `device`."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return _cpu_has_native_bf16()
    return False  # MPS: bf16 autocast is partial across macOS versions; fp32 is the safe choice


@functools.cache
def _cpu_has_native_bf16() -> bool:
    # oneDNN also "supports" bf16 on plain AVX-512 by emulation, which is slower than fp32: ask for the
    # instructions themselves (x86 AVX512-BF16 / AMX, Arm BF16), as the kernel reports them.
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:  # not Linux (macOS, Windows): fp32 on the CPU
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def autocast(device: torch.device, enabled: bool | None = None) -> torch.autocast:
    """bf16 autocast on `device` where supported (matmuls in bf16, weights and reductions in fp32), fp32 otherwise.

    `enabled=True` forces bf16 autocast, `False` forces fp32; `None` decides by `bf16_supported`.
    """
    on = bf16_supported(device) if enabled is None else enabled
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=on)
