"""Data-parallel training under ``torchrun``: who this process is, and the few collectives training needs.

``torchrun`` (``python -m torch.distributed.run``) starts one process per device and tells each its
place through the environment: ``RANK`` (0..WORLD_SIZE-1 over all nodes), ``WORLD_SIZE``,
``LOCAL_RANK`` (which device on its node) and ``MASTER_ADDR``/``MASTER_PORT`` (the rendezvous, read
by ``init_process_group``). Without those variables the process is a world of one and nothing here
communicates, so a plain ``openmm-cgnn train`` does exactly what it did before.

How the work is divided (docs in README "More than one GPU"): every rank reads all frames; each
global batch (``--batch-size`` frames, the same order on every rank) is cut into ``WORLD_SIZE``
contiguous shares, one per rank; DistributedDataParallel sums the gradients; validation frames are
shared out the same way and the error sums are all-reduced. Rank 0 alone writes files.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch


class DistributedSetupError(RuntimeError):
    """The torchrun environment or the devices do not fit a data-parallel run."""


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (a world of one without torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "World":
        """Read torchrun's ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; a world of one when unset."""
        values = {}
        for name, default in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
            text = os.environ.get(name, default)
            try:
                values[name] = int(text)
            except ValueError:
                raise DistributedSetupError(f"environment variable {name}={text!r} is not an integer") from None
        world = cls(rank=values["RANK"], size=values["WORLD_SIZE"], local_rank=values["LOCAL_RANK"])
        if world.size < 1 or not 0 <= world.rank < world.size or world.local_rank < 0:
            raise DistributedSetupError(
                f"inconsistent torchrun environment: RANK={world.rank} WORLD_SIZE={world.size} LOCAL_RANK={world.local_rank}"
            )
        return world

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def share(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` items; shares differ in length by at most one."""
        return slice(n * self.rank // self.size, n * (self.rank + 1) // self.size)

    def check_batch_size(self, batch_size: int) -> int:
        """Frames per rank in a full global batch of ``batch_size``; the global batch must divide evenly."""
        if batch_size % self.size:
            raise DistributedSetupError(
                f"--batch-size {batch_size} is the global batch and must be divisible by the number of "
                f"processes ({self.size})"
            )
        return batch_size // self.size

    def device(self, device: torch.device) -> torch.device:
        """The device of this rank: ``cuda`` means ``cuda:LOCAL_RANK`` (one GPU per process)."""
        if device.type != "cuda" or not self.distributed or device.index is not None:
            return device
        if self.local_rank >= torch.cuda.device_count():
            raise DistributedSetupError(
                f"LOCAL_RANK {self.local_rank} has no GPU: {torch.cuda.device_count()} visible "
                "(start at most one process per GPU: torchrun --nproc_per_node)"
            )
        return torch.device("cuda", self.local_rank)

    def all_reduce_sum(self, values: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Sum of ``values`` over all ranks (unchanged in a world of one), on ``values``' device.

        NCCL reduces only tensors on the GPU, so the sum is taken on ``device`` (the training device).
        """
        if not self.distributed:
            return values
        reduced = values.detach().to(device, copy=True)
        torch.distributed.all_reduce(reduced, op=torch.distributed.ReduceOp.SUM)
        return reduced.to(values.device)


@contextmanager
def process_group(world: World, device: torch.device) -> Iterator[None]:
    """Join the torchrun process group for the run (NCCL on CUDA, gloo on CPU), and leave it after.

    A group set up by the caller is used and left to the caller: one torchrun process cannot
    reliably set up a second group after destroying a first (torchrun's store still holds the
    first group's addresses), so a script that trains more than once sets up the group itself.
    """
    if not world.distributed:
        yield
        return
    joined = not torch.distributed.is_initialized()
    if joined:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            torch.distributed.init_process_group(backend=backend, rank=world.rank, world_size=world.size)
        except (ValueError, RuntimeError) as exc:  # missing MASTER_ADDR/PORT, unreachable rendezvous
            raise DistributedSetupError(f"cannot join the {backend} process group of rank {world.rank}: {exc}") from exc
    try:
        yield
        # No rank returns before rank 0 has written its files: a caller may read them (or resume
        # from them) as soon as its own process is back.
        torch.distributed.barrier(device_ids=[device.index] if device.type == "cuda" else None)
    finally:
        if joined:
            torch.distributed.destroy_process_group()
