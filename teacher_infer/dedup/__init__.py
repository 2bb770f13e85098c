"""Near-duplicates of a query set (e.g. the validation set) inside a pool: ``ssld dedup``.

>>> from teacher_infer.dedup import DedupConfig, dedup
>>> result = dedup(DedupConfig(query="val.zarr", pool="pool.zarr",
...                            out="dups.tsv"))  # doctest: +SKIP

Stage 1 (:mod:`.search`) is an exact cosine search of the stored teacher embeddings with torch
on the CPU or a GPU; stage 2 (:mod:`.sift`) confirms candidates on the images with SIFT and a
RANSAC homography; :mod:`.rules` decides which pool images go; :mod:`.run` is the command.
It lives in ``teacher_infer`` (not in the store library) because it computes with torch and
OpenCV and runs under ``torchrun``; it reads stores through ``labelstore``'s public API.
Importing this package imports neither torch nor OpenCV.
"""
from __future__ import annotations

from .config import DedupConfig
from .run import DedupResult, dedup

__all__ = ["DedupConfig", "DedupResult", "dedup"]
