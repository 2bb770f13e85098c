"""Teacher inference: run a teacher once over a data set and write a label store.

>>> import teacher_infer
>>> cfg = teacher_infer.InferConfig(model="resnext101_32x16d_wsl", data="imagenet/train",
...                                 out="train.zarr", pretrained=True)   # doctest: +SKIP
>>> print(teacher_infer.run(cfg))                                         # doctest: +SKIP
infer-teacher: 1,281,167 images (0 failed) in ... img/s ... → train.zarr (...)

The layer training shares with the teacher pass is public here too: ``teacher_infer.imaging``
(views, PIL and DALI decoding, the decoder registry), ``teacher_infer.runtime`` (ranks,
device, precision, threads, checkpoint reading) and ``teacher_infer.cli_options`` (the click
options every command shares); ``teacher_infer.dedup`` is ``ssld dedup``. See
docs/architecture.md.

Importing this package does not import torch, timm, OpenCV or DALI (``ssld --help`` stays
instant).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .config import InferConfig
from .data import Samples, find_samples, labels_by_name
from .images import ImageSource

if TYPE_CHECKING:  # pragma: no cover
    from .infer import RunSummary

__all__ = ["ImageSource", "InferConfig", "RunSummary", "Samples", "dedup", "find_samples",
           "imaging", "shards", "labels_by_name", "resolve_model_name", "run", "runtime",
           "verify"]


def run(cfg: InferConfig) -> "RunSummary":
    """Run ``cfg`` (see :class:`InferConfig`); returns the run's :class:`RunSummary`."""
    from .infer import run as _run

    return _run(cfg)


def verify(store, *, threads: int | None = None, **options):
    """``ssld verify``: the store's structure, then sampled rows recomputed with its recorded
    teacher(s) on ``threads`` CPU threads (None: the CPUs per rank); returns a
    ``labelstore.VerifyResult`` (see ``teacher_infer.recompute.verify``)."""
    from .recompute import verify as _verify

    return _verify(store, threads=threads, **options)


def resolve_model_name(name: str) -> str:
    """The timm name for a timm or PaddleClas model name (ValueError with close matches)."""
    from .model import resolve_model_name as _resolve

    return _resolve(name)


def __getattr__(name: str):
    if name == "RunSummary":
        from .infer import RunSummary

        return RunSummary
    if name in ("dedup", "imaging", "runtime", "shards"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'teacher_infer' has no attribute {name!r}")
