"""What every computing process of ssld resolves the same way, teacher pass and training alike:
its place among the ``torchrun`` ranks, its device, precision and autocast, its share of the
CPU cores, and the reading of model checkpoints.

>>> from teacher_infer.runtime import Dist, resolve_device, resolve_precision
>>> device = resolve_device("cpu", Dist.from_env())
>>> resolve_precision("auto", device)
'fp32'

Importing it does not import torch (each function imports it when called).
"""
from __future__ import annotations

from .checkpoint import (checkpoint_classes, load_weights, read_state_dict, saved_class_names,
                         saved_entries, sha256_file, strip_prefixes)
from .device import autocast, cpus_per_rank, resolve_device, resolve_precision
from labelstore import Dist   # defined in the base layer: dedup stage 2 runs under torchrun too

__all__ = ["Dist", "autocast", "checkpoint_classes", "cpus_per_rank", "load_weights",
           "read_state_dict", "resolve_device", "resolve_precision", "saved_class_names",
           "saved_entries", "sha256_file", "strip_prefixes"]
