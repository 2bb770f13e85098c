"""Format version 1 of the ssld label store: names, dtypes, codecs and checks.

One place defines what the arrays are called, how they are typed, shaped, chunked and
compressed, how each is written, read and exported (:data:`SCHEMA`), and how user input
is validated, so the writer, the reader, the derived-store commands (select-topk, merge,
ensemble) and export cannot drift apart: they iterate the table instead of naming arrays.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import operator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable, Sequence

import numpy as np

from ._keys import JoinedKeys
from ._text import KEY_RULE, first_bad_key

FORMAT = "ssld.labelstore"
FORMAT_VERSION = 1
DEFAULT_CHUNK_ROWS = 16384

# Boxes are stored as uint16 fractions of the decoded image (value / BOX_SCALE):
# 8 bytes per view instead of 16, and a resolution of 1/65535 (0.06 px on a 4k image).
# Writers quantise before cropping (see `quantize_boxes`) so replay is exact.
BOX_SCALE = 65535

# The columns of the ``tar`` array of stores of shard data (docs/format.md, "Stores of
# shard data"): where a row's image lies in its tar shard, and the shard as it was listed
# (size in bytes; stamp: mtime in ns locally, a 64-bit ETag digest on object storage).
TAR_FIELDS = ("offset", "size", "shard_size", "shard_stamp")

# Probabilities are float16 and the teacher's top-k sum can exceed 1 by rounding.
PROB_SUM_TOLERANCE = 1e-3

def dequantize_boxes(stored: np.ndarray) -> np.ndarray:
    """uint16 grid → float32 fractions; ``dequantize(quantize(b))`` is what was stored."""
    return (np.asarray(stored, dtype=np.float32) / np.float32(BOX_SCALE)).astype(np.float32)


@dataclass(frozen=True)
class ArraySpec:
    """One array of the store. Every module that creates, checks, writes, reads, copies or
    exports arrays iterates :data:`SCHEMA`, so a new field is one entry here (plus, if its
    values have rules beyond shape and dtype, a check in :func:`check_rows`)."""

    name: str
    dims: tuple[str, ...]      # sizes: row N, view V, rank k, box 4, feature D, chunk N/R,
    #                            tar_field (4 in stores of shard data, else 0);
    #                            also zarr's ``dimension_names`` (xarray opens stores labelled)
    dtype: Any                 # a numpy dtype, "str", or "index" (uint16 / int32 by C)
    fill: Any                  # zarr's fill value; what ``write`` stores for a field not given
    written: str = "rows"      # "rows": chunk by chunk through ``LabelStoreWriter.write``;
    #                            "create": whole, by ``create`` from its arguments (keys,
    #                            labels); "done": the per-chunk flags
    read_as: Any = None        # rows arrays: the dtype ``LabelStore.read`` returns (or a
    #                            function of the stored values); None: not part of read/load
    export: str | None = "stored"  # HDF5 export: the "stored" values, the "read" ones, or None
    compress: bool = True
    optional: bool = False     # only in stores created with its size (embeddings: D,
    #                            tar: the TAR_FIELDS)
    requires: tuple[str, ...] = ()  # further sizes an optional array needs (records: "mix")
    student: bool = False      # read by training beside the label arrays (``read_rows``);
    #                            ``load`` holds it in RAM when the store has it

    @property
    def per_row(self) -> bool:
        """Indexed by row (chunked like the store), not by chunk."""
        return self.dims[0] == "row"

    @property
    def per_view(self) -> bool:
        """(row, view, ...): a single view can be sliced out."""
        return self.dims[:2] == ("row", "view")

    @property
    def label(self) -> bool:
        """Written with the teacher's rows and returned by ``read`` (held in RAM by ``load``)."""
        return self.written == "rows" and self.read_as is not None

    def shape(self, lengths: dict[str, int]) -> tuple[int, ...]:
        return tuple(lengths[dim] for dim in self.dims)

    def chunks(self, lengths: dict[str, int], chunk_rows: int) -> tuple[int, ...]:
        """A row array has one zarr chunk per store chunk; done has one flag per zarr chunk."""
        shape = self.shape(lengths)
        return (min(chunk_rows, shape[0]),) + shape[1:] if self.per_row else (1,)

    def present(self, lengths: dict[str, int]) -> bool:
        """Whether a store with these dimension sizes has this array."""
        return not self.optional or all(lengths[dim] for dim in self.dims + self.requires)

    def read(self, stored: np.ndarray) -> np.ndarray:
        """Stored values as ``read`` returns them."""
        if callable(self.read_as) and not isinstance(self.read_as, type):
            return self.read_as(stored)
        return stored.astype(self.read_as, copy=False)


SCHEMA = (
    ArraySpec("keys", ("row",), "str", "", written="create"),
    ArraySpec("labels", ("row",), np.int32, -1, written="create"),
    ArraySpec("indices", ("row", "view", "rank"), "index", 0, read_as=np.int64),
    ArraySpec("probs", ("row", "view", "rank"), np.float16, 0, read_as=np.float32),
    ArraySpec("residual", ("row", "view"), np.float32, 1.0, read_as=np.float32),
    ArraySpec("boxes", ("row", "view", "box"), np.uint16, 0, read_as=dequantize_boxes,
              export="read"),  # HDF5 readers get fractions, not the uint16 grid
    ArraySpec("flips", ("row", "view"), bool, False, read_as=bool),
    ArraySpec("valid", ("row",), bool, False, read_as=bool),
    ArraySpec("embeddings", ("row", "feature"), np.float16, 0, optional=True),
    # Augmentation records (docs/format.md, "Augmentation records") of stores created with
    # augment_dims: L ops per view (op), E erasing boxes per view (erase), mixing (mix).
    # Not part of read (read_as None): training reads them with ``read_rows``.
    ArraySpec("aug_ops", ("row", "view", "op"), np.uint8, 0, optional=True, student=True),
    ArraySpec("aug_levels", ("row", "view", "op"), np.int8, 0, optional=True, student=True),
    ArraySpec("erase_boxes", ("row", "view", "erase", "box"), np.uint8, 0, optional=True,
              student=True),
    ArraySpec("mix_partners", ("row", "view"), np.int32, -1, optional=True, requires=("mix",),
              student=True),
    ArraySpec("mix_views", ("row", "view"), np.uint8, 0, optional=True, requires=("mix",),
              student=True),
    ArraySpec("mix_lambdas", ("row", "view"), np.uint8, 255, optional=True, requires=("mix",),
              student=True),
    ArraySpec("mix_boxes", ("row", "view", "box"), np.uint8, 0, optional=True,
              requires=("mix",), student=True),
    # Stored logits (infer-teacher --store-logits; docs/format.md, "Stored logits"): the
    # teacher's top-k logits and the log-partition at the store's temperature, float32.
    ArraySpec("logits", ("row", "view", "rank"), np.float32, 0, optional=True,
              requires=("logits",), student=True),
    ArraySpec("log_partition", ("row", "view"), np.float32, 0, optional=True,
              requires=("logits",), student=True),
    # Stores of shard data: each row's image by byte range (TAR_FIELDS), -1 for a row that
    # is an image file (a folder store's row, merged in).
    ArraySpec("tar", ("row", "tar_field"), np.int64, -1, optional=True),
    # One flag per chunk, each in its own zarr chunk, so ranks never share a done-chunk.
    ArraySpec("done", ("chunk",), bool, False, written="done", compress=False, export=None),
)


def specs(*, written: str | None = None, label: bool | None = None) -> tuple[ArraySpec, ...]:
    """The entries of :data:`SCHEMA` (read at call time) with the given properties."""
    return tuple(entry for entry in SCHEMA
                 if (written is None or entry.written == written)
                 and (label is None or entry.label == label))


def array_spec(name: str) -> ArraySpec:
    """The :data:`SCHEMA` entry called ``name``."""
    for entry in SCHEMA:
        if entry.name == name:
            return entry
    raise KeyError(name)


# The partner table (docs/format.md, "Mixing partners that are not rows"): a subgroup with,
# per partner, the values of these row arrays (the partner's crop and its own ops and
# erasing, and in stores of shard data where its image lies: what replaying its view
# needs), in the same dtypes, with ``partner`` for ``row``.
PARTNER_GROUP = "partners"
PARTNER_ARRAYS = ("keys", "boxes", "flips", "aug_ops", "aug_levels", "erase_boxes", "tar")


def student_arrays() -> tuple[str, ...]:
    """Optional row arrays training reads beside the label arrays (records, logits)."""
    return tuple(entry.name for entry in SCHEMA if entry.student)


def label_arrays() -> tuple[str, ...]:
    """Arrays ``read`` returns and ``load`` holds in RAM (indices, probs, residual, ...)."""
    return tuple(entry.name for entry in specs(label=True))


# Today's label arrays, fixed at import (the package itself calls ``label_arrays()``).
LABEL_ARRAYS = label_arrays()

# What stores written by this version guarantee (recorded in the ``integrity`` attribute):
# every array's chunk is on storage once the chunk is done, fill values included, and
# every chunk carries a crc32c checksum. Stores without the attribute (written before)
# still open; a chunk missing from them cannot be told from one of fill values.
INTEGRITY = {"every_chunk_written": True, "checksum": "crc32c"}


AUGMENT_DIMS = ("op", "erase", "mix")  # the record sizes ``create(augment_dims=...)`` takes


def sizes(*, rows: int, views: int, topk: int, chunk_rows: int, embedding_dim: int | None,
          augment_dims: dict[str, int] | None = None, logits: bool = False,
          tar_fields: int = 0) -> dict[str, int]:
    """Length of each named dimension (a record size not given is 0: no such arrays;
    ``logits`` 1 when the store keeps the teacher's logits; ``tar_fields``:
    ``len(TAR_FIELDS)`` in stores of shard data, 0 in the others, which then have no ``tar``
    array)."""
    records = {dim: int((augment_dims or {}).get(dim, 0)) for dim in AUGMENT_DIMS}
    return {"row": rows, "view": views, "rank": topk, "box": 4,
            "feature": int(embedding_dim or 0), "tar_field": int(tar_fields),
            "chunk": (rows + chunk_rows - 1) // chunk_rows,
            "logits": int(bool(logits)), **records}


def check_tar_fields(tar_fields: Any) -> tuple[str, ...] | None:
    """The ``tar`` columns a store is created with: :data:`TAR_FIELDS` (the one layout this
    version reads and writes), or None (no ``tar`` array)."""
    if not tar_fields:
        return None
    fields = tuple(tar_fields)
    if fields != TAR_FIELDS:
        raise ValueError(f"tar_fields must be {list(TAR_FIELDS)} (labelstore.TAR_FIELDS), "
                         f"got {list(fields)}")
    return fields


def check_augment_dims(augment_dims: Any) -> dict[str, int] | None:
    """The record sizes as {op, erase, mix} ints >= 0 (mix 0 or 1), None when all are 0."""
    if augment_dims is None:
        return None
    unknown = sorted(set(augment_dims) - set(AUGMENT_DIMS))
    if unknown:
        raise ValueError(f"augment_dims: unknown dimension {unknown[0]!r} "
                         f"(known: {', '.join(AUGMENT_DIMS)})")
    dims = {dim: int(augment_dims.get(dim, 0)) for dim in AUGMENT_DIMS}
    if min(dims.values()) < 0 or dims["mix"] > 1:
        raise ValueError(f"augment_dims {dims}: sizes must be >= 0 and mix 0 or 1")
    return dims if any(dims.values()) else None


# -- the invariants of a stored store ---------------------------------------------------
# One set, checked wherever a store is read (docs/format.md, "Invariants"): the attributes
# against each other and the arrays' metadata when a store is opened (cheap: no chunk is
# read), and the values of a chunk each time it is read (one comparison per value, so a
# store is checked exactly as far as it is used, and `verify`, which reads every chunk,
# checks all of it). A store that breaks one is damaged (DamagedStoreError), never data.

# What a row was computed with (ssld verify recomputes it with that): the attributes of one
# teacher, the store's own or, per row range, an entry of ``teachers`` (docs/format.md).
TEACHER_ATTRS = ("teacher", "preprocessing", "temperature", "compute")


def teacher_entry(attrs: dict) -> dict:
    """The :data:`TEACHER_ATTRS` a store (or a ``teachers`` entry) records."""
    return {name: attrs[name] for name in TEACHER_ATTRS if name in attrs}


def teacher_class_counts(attrs: dict) -> list[tuple[str, Any]]:
    """(where, num_classes) of every teacher a store records: ``teacher``, an ensemble's
    ``teacher.members`` and the row ranges' ``teachers`` (docs/format.md)."""
    counts: list[tuple[str, Any]] = []

    def add(where: str, teacher: Any) -> None:
        if not isinstance(teacher, dict):
            return
        if teacher.get("num_classes") is not None:
            counts.append((where, teacher["num_classes"]))
        for i, member in enumerate(teacher.get("members") or []):
            add(f"{where} member {i}", (member or {}).get("teacher"))

    add("teacher", attrs.get("teacher"))
    for entry in attrs.get("teachers") or []:
        rows = entry.get("rows") or ["?", "?"]
        add(f"teacher of rows {rows[0]}:{rows[1]}", entry.get("teacher"))
    return counts


def attribute_problem(attrs: dict) -> str | None:
    """What is wrong with a store's attributes taken together, or None: C, k, V and R
    in range, ``class_names`` one name per class, every recorded teacher with C classes."""
    try:
        num_classes, topk = int(attrs["num_classes"]), int(attrs["topk"])
        views, chunk_rows = int(attrs["views"]), int(attrs["chunk_rows"])
    except KeyError as exc:
        return f"attribute {exc} is missing"
    except (TypeError, ValueError):
        return "num_classes, topk, views and chunk_rows must be integers"
    if num_classes < 1 or not 1 <= topk <= num_classes or views < 1 or chunk_rows < 1:
        return (f"attributes out of range: num_classes {num_classes}, topk {topk}, views "
                f"{views}, chunk_rows {chunk_rows}")
    names = attrs.get("class_names")
    if names is not None and (not isinstance(names, list) or len(names) != num_classes
                              or not all(isinstance(name, str) for name in names)):
        count = len(names) if isinstance(names, list) else type(names).__name__
        return f"class_names has {count} names for num_classes {num_classes}"
    for where, count in teacher_class_counts(attrs):
        if count != num_classes:
            return (f"num_classes is {num_classes} but the {where} has {count} classes "
                    "(the dense targets would not be the teacher's)")
    return None


def value_problem(name: str, values: np.ndarray, num_classes: int
                  ) -> tuple[int, str] | None:
    """(position along the rows, what is wrong) of the first stored value of array
    ``name`` that breaks the format, or None: class ids in [0, C), labels in [-1, C),
    probabilities finite and >= 0, embeddings finite."""
    if values.size == 0:
        return None
    # Each rule is first a reduction (min / max: no temporary array, a few % of a chunk's
    # decoding), the element-wise test only once it has found something.
    if name == "indices":
        if values.max() < num_classes and (values.dtype.kind != "i" or values.min() >= 0):
            return None
        bad = (values >= num_classes) | (values < 0)
        what = f"class id {{}} outside [0, num_classes={num_classes})"
    elif name == "labels":
        if values.min() >= -1 and values.max() < num_classes:
            return None
        bad = (values < -1) | (values >= num_classes)
        what = f"label {{}} outside [-1, num_classes={num_classes})"
    elif name in ("probs", "embeddings"):
        # On the float16 bits: exponent all ones is inf or NaN, a set sign bit is < 0
        # (but -0.0, 0x8000); far cheaper than float comparisons in numpy's float16.
        if values.dtype == np.float16:
            bits = values.view(np.uint16)
            if name == "probs" and bits.max() < 0x7C00:   # all finite and >= +0
                return None
            bad = ((bits & 0x7C00) == 0x7C00) if name == "embeddings" else \
                ((bits >= 0x7C00) & (bits != 0x8000))
        else:
            bad = ~np.isfinite(values) if name == "embeddings" else ~(values >= 0)
        what = "probability {} (NaN, inf or < 0)" if name == "probs" else \
            "embedding value {} (NaN or inf)"
    else:
        return None
    if not bad.any():
        return None
    where = tuple(int(i) for i in np.argwhere(bad)[0])
    return where[0], what.format(values[where])


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


def check_keys(keys: Sequence[str]) -> JoinedKeys:
    """The keys, checked (non-empty, fit for text files, unique), joined as stored."""
    if isinstance(keys, np.ndarray) and keys.ndim != 1:
        raise ValueError(f"keys must be a non-empty 1-D list of strings, got shape {keys.shape}")
    keys = list(map(str, keys.tolist() if isinstance(keys, np.ndarray) else keys))
    if len(keys) == 0:
        raise ValueError("keys must be a non-empty 1-D list of strings, got 0 items")
    try:
        joined = JoinedKeys.of(keys)
    except (ValueError, UnicodeEncodeError):  # a newline or a lone surrogate: reported below
        joined = None
    lengths = (joined.lengths() if joined is not None else
               np.fromiter(map(len, keys), dtype=np.int64, count=len(keys)))
    empty = np.flatnonzero(lengths == 0)
    if len(empty):
        raise ValueError(f"key at row {int(empty[0])} is empty")
    # Printable ASCII keys are checked on the joined bytes; others key by key (regex).
    bad = None if joined is not None and joined.plain_ascii() else first_bad_key(keys)
    if bad is not None:
        row, problem = bad
        raise ValueError(f"key {keys[row]!r} at row {row} {problem}; {KEY_RULE}")
    # Sorted keys (a folder listing, a selection in pool order) are unique; a set else.
    if not all(map(operator.lt, keys, keys[1:])) and len(set(keys)) != len(keys):
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
    return joined if joined is not None else JoinedKeys.of(keys)


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


def check_rows(values: dict[str, Any], *, num_views: int, topk: int, num_classes: int,
               embedding_dim: int | None, augment_dims: dict[str, int] | None = None,
               logits: bool = False, tar_fields: int = 0) -> dict[str, np.ndarray]:
    """Validate one write (``values``: array name → rows given, ``indices`` and ``probs``
    required) and return every array ``write`` stores, in its stored dtype.

    The teacher's arrays have their own rules below; any other array of :data:`SCHEMA`
    written with the rows gets the generic one (shape from its dims, dtype kind of its
    stored dtype, its fill value when not given).
    """
    unknown = sorted(set(values) - {entry.name for entry in specs(written="rows")})
    if unknown:
        raise ValueError(f"no array {unknown[0]!r} in a label store "
                         f"(writable: {', '.join(e.name for e in specs(written='rows'))})")
    indices = np.asarray(values.get("indices"))
    if indices.ndim != 3:
        raise ValueError(f"indices must have shape (n, {num_views}, {topk}), got {indices.shape}")
    n = indices.shape[0]
    out = _check_teacher_rows(indices, values, n=n, num_views=num_views, topk=topk,
                              num_classes=num_classes)
    lengths = sizes(rows=n, views=num_views, topk=topk, chunk_rows=1,
                    embedding_dim=embedding_dim, augment_dims=augment_dims, logits=logits,
                    tar_fields=tar_fields)
    for entry in specs(written="rows"):
        if entry.name in out:
            continue
        value = values.get(entry.name)
        if not entry.present(lengths):
            if value is not None:
                size = ("embedding_dim" if "feature" in entry.dims else
                        "tar_fields" if "tar_field" in entry.dims else
                        "logits" if "logits" in entry.requires else "augment_dims")
                raise ValueError(f"this store was created without {entry.name} ({size})")
            continue
        if value is None and entry.optional:  # a store that has it has it in every row
            shape = "(" + ", ".join(_DIM_LETTERS.get(dim, dim) for dim in entry.dims) + ")"
            raise ValueError(f"this store has {entry.name}: pass {entry.name}={shape} with "
                             "every write")
        out[entry.name] = _generic(entry, value, entry.shape(lengths), num_classes)
    return out


def _repeats(indices: np.ndarray) -> np.ndarray:
    """(n, V) mask of the row-views whose top-k lists a class twice."""
    ordered = np.sort(indices, axis=-1)
    return (ordered[..., 1:] == ordered[..., :-1]).any(-1)


_DIM_LETTERS = {"row": "n", "view": "V", "rank": "k", "feature": "D", "op": "L", "erase": "E",
                "tar_field": "4"}


_KINDS = {"i": ("iu", "integers"), "u": ("iu", "integers"), "f": ("f", "floating point"),
          "b": ("b", "boolean")}


def _generic(entry: ArraySpec, value: Any, shape: tuple, num_classes: int) -> np.ndarray:
    """The generic rule: the shape of its dims, a value of its dtype's kind, fill if absent;
    floating-point values finite as stored (a value beyond float16's ±65504 would become
    inf there)."""
    dtype = np.dtype(stored_dtype(entry, num_classes))
    if value is None:
        return np.full(shape, entry.fill, dtype=dtype)
    kinds, what = _KINDS.get(dtype.kind, (dtype.kind, str(dtype)))
    array = _as_array(entry.name, value, shape, kinds, what)
    with np.errstate(over="ignore", invalid="ignore"):
        stored = array.astype(dtype, copy=False)
    if dtype.kind == "f" and not np.isfinite(stored).all():
        row = int(np.argwhere(~np.isfinite(stored))[0][0])
        given = np.asarray(array[row], dtype=np.float64)
        why = ("NaN or inf" if not np.isfinite(given).all() else
               f"largest magnitude {np.abs(given).max():g}, beyond {dtype}'s "
               f"{float(np.finfo(dtype).max):g}")
        raise ValueError(f"{entry.name} of row {row} are not finite as {dtype} ({why})")
    return stored


def _check_teacher_rows(indices: np.ndarray, values: dict[str, Any], *, n: int, num_views: int,
                        topk: int, num_classes: int) -> dict[str, np.ndarray]:
    """The rules of the teacher's arrays: class ids, probabilities, residual, boxes, flips."""
    residual, boxes, flips, valid = (values.get(name) for name in
                                     ("residual", "boxes", "flips", "valid"))
    indices = _as_array("indices", indices, (n, num_views, topk), "iu", "integer class ids")
    probs = _as_array("probs", values.get("probs"), (n, num_views, topk), "f", "floating point")
    if valid is None:
        valid = np.ones(n, dtype=bool)
    valid = _as_array("valid", valid, (n,), "b", "boolean")

    if n and (indices.min() < 0 or indices.max() >= num_classes):
        where = np.argwhere((indices < 0) | (indices >= num_classes))[0]
        raise ValueError(f"class id {int(indices[tuple(where)])} at row {int(where[0])} view "
                         f"{int(where[1])} is outside [0, {num_classes})")
    if topk > 1 and n:
        repeated = np.argwhere(_repeats(indices) & valid[:, None])
        if len(repeated):
            raise ValueError(f"row {int(repeated[0][0])} view {int(repeated[0][1])} repeats a "
                             "class id in its top-k")

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
    if not np.all(np.isfinite(residual64)) or (
            n and (residual64.min() < 0 or residual64.max() > 1 + PROB_SUM_TOLERANCE)):
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
                or np.any(b[..., 0] + b[..., 2] > 1 + tol)
                or np.any(b[..., 1] + b[..., 3] > 1 + tol)):
            raise ValueError("boxes must be (y0, x0, h, w) fractions inside the image [0, 1]")
        stored_boxes = quantize_boxes(b)

    if flips is None:
        flips = np.zeros((n, num_views), dtype=bool)
    flips = _as_array("flips", flips, (n, num_views), "b", "boolean")

    stored = {"indices": indices, "probs": probs, "residual": residual, "boxes": stored_boxes,
              "flips": flips, "valid": valid}
    return {name: value.astype(stored_dtype(array_spec(name), num_classes), copy=False)
            for name, value in stored.items()}
