"""This process's place in a ``torchrun`` job: rank, world size and device, and the collectives training uses."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

from tinyvlm.devices import check_device, default_device


@dataclass(frozen=True)
class Processes:
    """This process's place in a ``torchrun`` job (world size 1 without one)."""

    rank: int
    world_size: int
    device: torch.device
    #: Whether this run joined (or made) a process group, to leave at the end.
    grouped: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over processes (float64)."""
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor.tolist()

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def start_processes(device: str | None, *, group: bool = False) -> Processes:
    """Join the ``torchrun`` process group if there is one: NCCL and ``cuda:LOCAL_RANK`` on GPU, gloo on CPU.
    ``group``: make a one-process group when there is no ``torchrun`` job (FSDP needs a group to shard over)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        chosen = check_device(device) or default_device()
        if not group:
            return Processes(0, 1, chosen)
        if not dist.is_initialized():
            backend = "nccl" if chosen.type == "cuda" else "gloo"
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        return Processes(0, 1, chosen, grouped=True)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Processes(rank, world_size, torch.device("cuda", local_rank) if use_cuda else torch.device("cpu"), grouped=True)
