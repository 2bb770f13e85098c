"""What every computing process of ssld resolves the same way, teacher pass, dedup and training
alike: its place among the ``torchrun`` ranks, its device, precision and autocast, its CPU
threads, and the reading of model checkpoints. Each has one home here and one rule.

>>> from teacher_infer.runtime import Dist, resolve_device, resolve_precision
>>> device = resolve_device("cpu", Dist.from_env())
>>> resolve_precision("auto", device)
'fp32'

Importing it does not import torch (each function imports it when called).
"""
from __future__ import annotations

from .checkpoint import (checkpoint_classes, load_weights, read_state_dict, saved_class_names,
                         saved_entries, strip_prefixes)
from .device import (DEVICES, PRECISIONS, allow_tf32, autocast, cpus_per_rank, resolve_device,
                     resolve_precision)
from .dist import Dist
from .threads import set_threads

__all__ = ["DEVICES", "PRECISIONS", "Dist", "allow_tf32", "autocast", "checkpoint_classes",
           "cpus_per_rank", "load_weights", "read_state_dict", "resolve_device",
           "resolve_precision", "saved_class_names", "saved_entries", "set_threads",
           "strip_prefixes"]
