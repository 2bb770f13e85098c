"""Processes and devices: one code path for a CPU, one GPU, and DDP under ``torchrun``.

Rank discovery, the process group (nccl for CUDA, gloo for the CPU), the device, precision,
threads and autocast are the shared layer's (:mod:`teacher_infer.runtime`); this module adds
what training needs on top: the process's place and device in one object, summing tensors over
ranks, syncing buffers, and the memory format.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from teacher_infer.runtime import Dist, allow_tf32, resolve_device, set_threads


@dataclass(frozen=True)
class DistEnv:
    """Where this process runs: its place among the ``torchrun`` processes and its device."""

    dist: Dist
    device: torch.device

    @property
    def rank(self) -> int:
        return self.dist.rank

    @property
    def world_size(self) -> int:
        return self.dist.world_size

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    @property
    def distributed(self) -> bool:
        return self.dist.enabled


def setup(device: str = "auto", threads: Optional[int] = None) -> DistEnv:
    """Set this process's CPU threads (None: the CPUs per rank), pick its device, and join the
    ``torchrun`` process group when there is one: how train and eval start."""
    ranks = Dist.from_env()
    set_threads(threads, ranks)
    resolved = resolve_device(device, ranks)
    allow_tf32(resolved)
    ranks.init(resolved)
    return DistEnv(ranks, resolved)


def teardown(env: DistEnv) -> None:
    env.dist.close()


def all_reduce_sum(values: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum a tensor over all ranks (a copy; identity for one process)."""
    values = values.detach().clone()
    if env.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def broadcast_buffers(module: torch.nn.Module, env: DistEnv) -> None:
    """Rank 0's buffers (batch-norm statistics) on every rank.

    DDP keeps parameters equal but each rank's last forward updates its own running
    statistics; syncing them after an epoch makes evaluation and checkpoints rank-independent.
    """
    if env.distributed:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def all_gather(obj: object, env: DistEnv) -> list:
    """Every rank's ``obj`` (picklable), in rank order."""
    return env.dist.gather(obj)


def barrier(env: DistEnv) -> None:
    env.dist.barrier()


def resolve_channels_last(channels_last: Optional[bool], device: torch.device) -> bool:
    """``None`` → channels_last on GPUs (faster convolutions with tensor cores), not on CPUs."""
    return device.type == "cuda" if channels_last is None else channels_last
