"""Format version 1 of the ssld label store: names, dtypes, codecs and checks.

One place defines what the arrays are called, how they are typed and compressed,
and how user input is validated, so the writer, the reader and the derived-store
commands (select-topk, merge) cannot drift apart.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable, Sequence

import numpy as np

from ._text import KEY_RULE, first_bad_key

FORMAT = "ssld.labelstore"
FORMAT_VERSION = 1
DEFAULT_CHUNK_ROWS = 16384

# Boxes are stored as uint16 fractions of the decoded image (value / BOX_SCALE):
# 8 bytes per view instead of 16, and a resolution of 1/65535 (0.06 px on a 4k image).
# Writers quantise before cropping (see `quantize_boxes`) so replay is exact.
BOX_SCALE = 65535

# Probabilities are float16 and the teacher's top-k sum can exceed 1 by rounding.
PROB_SUM_TOLERANCE = 1e-3

LABEL_ARRAYS = ("indices", "probs", "residual", "boxes", "flips", "valid")


@dataclass(frozen=True)
class ArraySpec:
    """One array of the store: its dimension names (also zarr's ``dimension_names``, so
    xarray opens a store as a labelled Dataset), stored dtype, fill value and codecs."""

    name: str
    dims: tuple[str, ...]      # sizes: row N, view V, rank k, box 4, feature D, chunk N/R
    dtype: Any                 # a numpy dtype, "str", or "index" (uint16 / int32 by C)
    fill: Any
    compress: bool = True
    optional: bool = False     # only in stores created with it (embeddings)


SCHEMA = (
    ArraySpec("keys", ("row",), "str", ""),
    ArraySpec("labels", ("row",), np.int32, -1),
    ArraySpec("indices", ("row", "view", "rank"), "index", 0),
    ArraySpec("probs", ("row", "view", "rank"), np.float16, 0),
    ArraySpec("residual", ("row", "view"), np.float32, 1.0),
    ArraySpec("boxes", ("row", "view", "box"), np.uint16, 0),
    ArraySpec("flips", ("row", "view"), bool, False),
    ArraySpec("valid", ("row",), bool, False),
    ArraySpec("embeddings", ("row", "feature"), np.float16, 0, optional=True),
    # One flag per chunk, each in its own zarr chunk, so ranks never share a done-chunk.
    ArraySpec("done", ("chunk",), bool, False, compress=False),
)
ARRAY_NAMES = tuple(spec.name for spec in SCHEMA)
ROW_ARRAYS = tuple(spec.name for spec in SCHEMA if spec.dims[0] == "row")

# What stores written by this version guarantee (recorded in the ``integrity`` attribute):
# every array's chunk is on storage once the chunk is done, fill values included, and
# every chunk carries a crc32c checksum. Stores without the attribute (written before)
# still open; a chunk missing from them cannot be told from one of fill values.
INTEGRITY = {"every_chunk_written": True, "checksum": "crc32c"}


def sizes(*, rows: int, views: int, topk: int, chunk_rows: int,
          embedding_dim: int | None) -> dict[str, int]:
    """Length of each named dimension."""
    return {"row": rows, "view": views, "rank": topk, "box": 4,
            "feature": int(embedding_dim or 0), "chunk": (rows + chunk_rows - 1) // chunk_rows}


def stored_dtype(spec: ArraySpec, num_classes: int) -> Any:
    if spec.dtype == "index":
        return index_dtype(num_classes)
    return spec.dtype if spec.dtype == "str" else np.dtype(spec.dtype)


def index_dtype(num_classes: int) -> np.dtype:
    """uint16 class ids while they fit (ids < 65535), else int32."""
    return np.dtype(np.uint16) if num_classes <= 65535 else np.dtype(np.int32)


def compressors(compress: bool = True) -> tuple:
    """Blosc-zstd with byte shuffle (fast, multi-threaded, good on fp16/uint16 columns),
    then a crc32c checksum of the compressed chunk: a truncated or altered chunk is an
    error on read instead of a decompression failure or, worse, plausible numbers."""
    from zarr.codecs import BloscCodec, BloscShuffle, Crc32cCodec

    if not compress:
        return (Crc32cCodec(),)
    return (BloscCodec(cname="zstd", clevel=3, shuffle=BloscShuffle.shuffle), Crc32cCodec())


def quantize_boxes(boxes: np.ndarray) -> np.ndarray:
    """Round fractional boxes (y0, x0, h, w) to the uint16 grid the store keeps."""
    boxes = np.asarray(boxes, dtype=np.float64)
    return np.rint(np.clip(boxes, 0.0, 1.0) * BOX_SCALE).astype(np.uint16)


def dequantize_boxes(stored: np.ndarray) -> np.ndarray:
    """uint16 grid → float32 fractions; ``dequantize(quantize(b))`` is what was stored."""
    return (np.asarray(stored, dtype=np.float32) / np.float32(BOX_SCALE)).astype(np.float32)


def full_box() -> np.ndarray:
    return np.array([0.0, 0.0, 1.0, 1.0], dtype=np.float32)


def missing_ranges(done: np.ndarray, chunk_rows: int, n: int) -> list[tuple[int, int]]:
    """Row ranges [start, stop) of the chunks whose ``done`` flag is unset, merged and sorted."""
    ranges: list[tuple[int, int]] = []
    for chunk in np.flatnonzero(~np.asarray(done, dtype=bool)):
        start = int(chunk) * chunk_rows
        stop = min(start + chunk_rows, n)
        if ranges and ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], stop)
        else:
            ranges.append((start, stop))
    return ranges


def fingerprint(keys: Iterable[str]) -> str:
    """sha256 of the key list, one key per line: identifies a dataset independent of root."""
    # Keys joined in blocks: the same bytes as updating key by key, ~10x faster for
    # millions of keys, with memory bounded by one block.
    digest = hashlib.sha256()
    block: list[str] = []
    for key in keys:
        block.append(str(key))
        if len(block) == 65536:
            digest.update(("\n".join(block) + "\n").encode("utf-8"))
            block.clear()
    if block:
        digest.update(("\n".join(block) + "\n").encode("utf-8"))
    return digest.hexdigest()


def software_versions() -> dict[str, str]:
    """Versions of the stack, read from package metadata (does not import torch)."""
    from ._version import __version__

    versions = {"ssld": __version__}
    for dist in ("torch", "timm", "zarr", "numpy"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def check_keys(keys: Sequence[str]) -> np.ndarray:
    keys = np.asarray([str(k) for k in keys], dtype=object)
    if keys.ndim != 1 or len(keys) == 0:
        raise ValueError(f"keys must be a non-empty 1-D list of strings, got {len(keys)} items")
    empty = np.flatnonzero(keys == "")
    if len(empty):
        raise ValueError(f"key at row {int(empty[0])} is empty")
    bad = first_bad_key(keys.tolist())
    if bad is not None:
        row, problem = bad
        raise ValueError(f"key {keys[row]!r} at row {row} {problem}; {KEY_RULE}")
    if len(set(keys.tolist())) != len(keys):  # a set is ~6x faster than sorting str objects
        first: dict[str, int] = {}
        duplicates = 0
        report = None
        for row, key in enumerate(keys):
            if key in first:
                duplicates += 1
                report = report or (key, first[key], row)
            else:
                first[key] = row
        dup, a, b = report
        raise ValueError(f"duplicate key {dup!r} at rows {a} and {b} "
                         f"({duplicates} duplicate(s) in all)")
    return keys


def check_labels(labels: Any, n: int, num_classes: int) -> np.ndarray:
    if labels is None:
        return np.full(n, -1, dtype=np.int32)
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},) to match keys, got {labels.shape}")
    if labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be integers (-1 = unknown), got dtype {labels.dtype}")
    bad = np.flatnonzero((labels < -1) | (labels >= num_classes))
    if len(bad):
        raise ValueError(f"label {int(labels[bad[0]])} at row {int(bad[0])} is outside "
                         f"[-1, {num_classes})")
    return labels.astype(np.int32)


def _as_array(name: str, value: Any, shape: tuple, kinds: str, what: str) -> np.ndarray:
    array = np.asarray(value)
    if array.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {array.shape}")
    if array.dtype.kind not in kinds:
        raise ValueError(f"{name} must be {what}, got dtype {array.dtype}")
    return array


def check_rows(indices: Any, probs: Any, *, residual: Any, boxes: Any, flips: Any, valid: Any,
               embeddings: Any, num_views: int, topk: int, num_classes: int,
               embedding_dim: int | None) -> dict[str, np.ndarray]:
    """Validate one write and return the arrays in their stored dtypes."""
    indices = np.asarray(indices)
    if indices.ndim != 3:
        raise ValueError(f"indices must have shape (n, {num_views}, {topk}), got {indices.shape}")
    n = indices.shape[0]
    indices = _as_array("indices", indices, (n, num_views, topk), "iu", "integer class ids")
    probs = _as_array("probs", probs, (n, num_views, topk), "f", "floating point")
    if valid is None:
        valid = np.ones(n, dtype=bool)
    valid = _as_array("valid", valid, (n,), "b", "boolean")

    if n and (indices.min() < 0 or indices.max() >= num_classes):
        where = np.argwhere((indices < 0) | (indices >= num_classes))[0]
        raise ValueError(f"class id {int(indices[tuple(where)])} at row {int(where[0])} view "
                         f"{int(where[1])} is outside [0, {num_classes})")
    if topk > 1 and n:
        ordered = np.sort(indices[valid], axis=-1)
        repeated = np.argwhere(ordered[..., 1:] == ordered[..., :-1])
        if len(repeated):
            row = int(np.flatnonzero(valid)[repeated[0][0]])
            raise ValueError(f"row {row} view {int(repeated[0][1])} repeats a class id in its top-k")

    probs64 = probs.astype(np.float64)
    if not np.all(np.isfinite(probs64)):
        row = int(np.argwhere(~np.isfinite(probs64))[0][0])
        raise ValueError(f"probs contain NaN or inf (row {row})")
    if n and probs64.min() < 0:
        row = int(np.argwhere(probs64 < 0)[0][0])
        raise ValueError(f"probs must be >= 0, got {probs64.min():g} (row {row})")
    sums = probs64.sum(-1)
    if n and sums.max() > 1 + PROB_SUM_TOLERANCE:
        row = int(np.argwhere(sums > 1 + PROB_SUM_TOLERANCE)[0][0])
        raise ValueError(f"probs of row {row} sum to {sums.max():.6f} > 1 "
                         f"(tolerance {PROB_SUM_TOLERANCE})")

    if residual is None:
        residual = np.clip(1.0 - sums, 0.0, 1.0)
    residual = _as_array("residual", residual, (n, num_views), "f", "floating point")
    residual64 = residual.astype(np.float64)
    if not np.all(np.isfinite(residual64)) or (n and (residual64.min() < 0
                                                      or residual64.max() > 1 + PROB_SUM_TOLERANCE)):
        raise ValueError("residual must be finite and within [0, 1]")

    if boxes is None:
        boxes = np.broadcast_to(full_box(), (n, num_views, 4))
    boxes = _as_array("boxes", boxes, (n, num_views, 4), "fu", "float fractions or uint16")
    if boxes.dtype.kind == "u":
        stored_boxes = boxes.astype(np.uint16)
    else:
        b = boxes.astype(np.float64)
        tol = 1.0 / BOX_SCALE
        if (not np.all(np.isfinite(b)) or (n and (b.min() < -tol or b.max() > 1 + tol))
                or np.any(b[..., 0] + b[..., 2] > 1 + tol) or np.any(b[..., 1] + b[..., 3] > 1 + tol)):
            raise ValueError("boxes must be (y0, x0, h, w) fractions inside the image [0, 1]")
        stored_boxes = quantize_boxes(b)

    if flips is None:
        flips = np.zeros((n, num_views), dtype=bool)
    flips = _as_array("flips", flips, (n, num_views), "b", "boolean")

    out = {
        "indices": indices.astype(index_dtype(num_classes)),
        "probs": probs.astype(np.float16),
        "residual": residual.astype(np.float32),
        "boxes": stored_boxes,
        "flips": flips.astype(bool),
        "valid": valid.astype(bool),
    }
    if embeddings is not None:
        if embedding_dim is None:
            raise ValueError("this store was created without embeddings (embedding_dim=None)")
        emb = _as_array("embeddings", embeddings, (n, embedding_dim), "f", "floating point")
        out["embeddings"] = emb.astype(np.float16)
    return out
