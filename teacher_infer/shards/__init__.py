"""WebDataset tar shards as a data source: resolve, list, index and read by byte range.

>>> from teacher_infer import shards
>>> found = shards.find_shard_samples(
...     "/data/in22k/imagenet22k-train-{0000..4095}.tar")                   # doctest: +SKIP
>>> found.keys[0], found.labels[0]                                          # doctest: +SKIP
('imagenet22k-train-0000.tar/n01440764_10026', 0)
>>> image_bytes = found.reader().read(found.keys[0], found.tar[0])          # doctest: +SKIP

- :func:`resolve_shards`: a source as written (brace pattern, glob, folder, ``s3://``
  prefix, timm ``_info.json``, wids index, ssld index) → the ordered :class:`ShardSet`;
- :func:`list_samples`: the samples of a ``ShardSet`` → :class:`ShardSamples` (store keys
  ``SHARD/KEY``, labels from ``cls``, and per row the image's byte range and its shard's
  size and stamp: :data:`TAR_FIELDS`), parallel over ``torchrun`` ranks;
- :func:`build_index` / :func:`load_index`: the same listing kept in a folder, built once
  (resumable, parallel), loaded in seconds; :func:`index` is ``ssld index``
  (:class:`IndexConfig`); :func:`find_shard_samples` takes any source;
- :class:`ShardReader`: a row's image bytes by byte range (local ``pread`` or ranged GETs),
  one row at a time or consecutive rows as one sequential read; damage found while
  reading raises :class:`ShardReadError` (an ``OSError``: the row fails, never another
  image's bytes).

Rules (samples, keys, what is verified) are in the modules: ``_tar`` (webdataset's naming
convention), ``_source`` (roots and names), ``_formats`` (index files), ``_reader``.
Nothing here imports torch (``index`` under ``torchrun`` joins a gloo group); ``fsspec``
only for URLs. ``teacher_infer.ImageSource`` reads rows of stores of shard data (and image
files) for every command.
"""
from __future__ import annotations

from typing import Any

from ._index import IndexResult, build_index, check_unchanged, index, load_index
from ._listing import TAR_FIELDS, ShardListing, ShardSamples, list_samples, list_shard, on_main
from ._reader import ShardReader, ShardReadError, split_key
from ._source import INDEX_MANIFEST, ShardFile, ShardSet, is_shard_source, resolve_shards
from ._tar import IMAGE_EXTENSIONS, split_name
from .config import IndexConfig

__all__ = ["IMAGE_EXTENSIONS", "INDEX_MANIFEST", "TAR_FIELDS", "IndexConfig", "IndexResult",
           "ShardFile", "ShardListing", "ShardReadError", "ShardReader", "ShardSamples",
           "ShardSet", "build_index", "check_unchanged", "find_shard_samples", "index",
           "is_shard_source", "list_samples", "list_shard", "load_index", "resolve_shards",
           "split_key", "split_name"]


def find_shard_samples(spec: str, *, dist: Any = None, option: str = "--data",
                       use_dali_index: bool = True, progress: bool = False) -> ShardSamples:
    """The samples of any shard source: an ssld index is loaded (its shards checked
    unchanged), anything else resolved on rank 0 and listed now by every rank
    (:func:`list_samples`). Every rank gets every row."""
    shards = on_main(dist, lambda: resolve_shards(spec, option=option))
    if shards.kind == "index":
        return load_index(spec.split("#", 1)[0], option=option)
    return list_samples(shards, dist=dist, use_dali_index=use_dali_index, progress=progress)
