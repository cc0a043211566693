"""Running under `torchrun`: process group, device per rank, DistributedDataParallel, rank-0-only work.

Without torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) everything here is a
no-op for one process, so stages are written once. CPU ranks talk over gloo, CUDA ranks over NCCL.
FSDP is not implemented: DDP keeps a full model copy per rank, which is what the preset sizes need.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from chatforge import ChatforgeError
from chatforge.device import pick_device


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP around `model` when there are several ranks; gradients are averaged over ranks in backward."""
        if not self.active:
            return model
        from torch.nn.parallel import DistributedDataParallel
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.active:
            values = values.clone()
            dist.all_reduce(values)
        return values

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on rank 0 (an empty list elsewhere)."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size if self.is_main else []
        dist.gather_object(obj, out if self.is_main else None, dst=0)
        return out

    def share(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (building a cache, taking a lock), then the others.

        An error on rank 0 is raised on every rank, so no rank waits for a partner that has stopped.
        """
        if not self.active:
            yield
            return
        if self.is_main:
            try:
                yield
            except BaseException as e:
                self.share(str(e) if isinstance(e, ChatforgeError) else f"rank 0 failed: {e!r}")
                raise
            self.share(None)
        else:
            error = self.share(None)
            if error is not None:
                raise ChatforgeError(error)
            yield


def setup(device: str | None = None) -> Dist:
    """This process's place in the run; under torchrun the process group is initialised on first use."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device)
    if world > 1:
        if dev.type == "cuda":
            dev = torch.device("cuda", local_rank)
            torch.cuda.set_device(dev)
        elif dev.type != "cpu":
            raise ChatforgeError(f"--device {dev.type}: distributed runs support cuda (nccl) and cpu (gloo)")
        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world,
                                    timeout=timedelta(minutes=30))
    return Dist(rank, world, local_rank, dev)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP and/or torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner
