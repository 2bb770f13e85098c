"""Where and how a process computes: its device, its precision (and autocast), its CPU share.

The teacher pass and training resolve these the same way, so ``--device``, ``--precision``
and the default worker counts mean the same in both commands.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from typing import ContextManager

from labelstore import Dist


def resolve_device(name: str, dist: Dist):
    """``auto`` → this rank's GPU when CUDA is available, else the CPU; ``cuda`` without a
    GPU is a ValueError. A GPU becomes the current device (``LOCAL_RANK`` modulo the count)."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available (use --device cpu)")
        device = torch.device("cuda", dist.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def resolve_precision(precision: str, device) -> str:
    """``auto`` → bf16 on GPUs (no loss scaling needed), fp32 on the CPU; fp16 off a GPU is a
    ValueError (CPU autocast has no float16 kernels worth using)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    return precision


def autocast(precision: str, device) -> ContextManager:
    """The autocast context of a resolved precision (a no-op for fp32); reusable."""
    if precision == "fp32":
        return nullcontext()
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def cpus_per_rank(dist: Dist) -> int:
    """The cores this process may use, shared evenly by the ranks on this machine."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cpus = os.cpu_count() or 1
    return max(1, cpus // max(1, dist.local_world_size))
