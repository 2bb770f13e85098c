"""Where and how a process computes: its device, its precision (and autocast), its CPU share.

The teacher pass, ``ssld verify``, dedup, training and eval resolve these the same way, so
``--device``, ``--precision`` and the default worker and thread counts mean the same in every
command, from the CLI as from Python. Nothing here imports torch at module level: the configs
take :data:`DEVICES` and :data:`PRECISIONS` from here.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from typing import ContextManager

from .dist import Dist

DEVICES = ("auto", "cpu", "cuda")               # --device: the one list every config takes
PRECISIONS = ("auto", "fp32", "bf16", "fp16")   # --precision: the same


def resolve_device(name: str, dist: Dist):
    """``auto`` → this rank's GPU when CUDA is available, else the CPU; ``cuda`` without a
    GPU is a ValueError. A GPU becomes the current device (``LOCAL_RANK`` modulo the count)."""
    if name not in DEVICES:
        raise ValueError(f"--device must be one of {', '.join(DEVICES)}, got {name!r}")
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
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    return precision


def allow_tf32(device) -> None:
    """On a GPU, let float32 matrix products use TF32 tensor cores, as cuDNN's convolutions
    already do by default: what ``fp32`` means for a model's forward (and backward) here. TF32
    keeps float32's range and a 10-bit mantissa, 8x the float32 rate on A100/H100; the inputs
    of bf16 autocast are rounded further still. dedup's exact search turns it off around its
    own products (its error bound assumes float32 sums)."""
    if device.type == "cuda":
        import torch

        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


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
