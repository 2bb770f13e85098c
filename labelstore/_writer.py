"""Creating and writing label stores.

A writer owns whole row-chunks: rows passed to :meth:`LabelStoreWriter.write` are
buffered per chunk and a chunk is written in one piece, array by array, once all
of its rows have arrived; only then is ``done[c]`` set. A crash therefore leaves
a chunk not-done (never half-written and marked done), and a resumed run rewrites
it. Two processes writing disjoint chunks never touch the same zarr chunk, which
is what makes multi-rank inference safe on local disks and object stores alike.
"""
from __future__ import annotations

import os
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Mapping, Sequence

import numpy as np
import zarr

from . import _chunks
from . import _format as fmt
from . import _keys
from . import _partners
from ._paths import CREATING, exists, local_path, remove_store, unfinished_creation


def _chunk_count(n: int, chunk_rows: int) -> int:
    return (n + chunk_rows - 1) // chunk_rows


# Chunks equal to the fill value are written too: a done chunk then has every array's
# chunk on storage, so a missing one is damage, not a chunk of zeros (see _reader).
_WRITE_ALL = {"write_empty_chunks": True}


def create(path: Any, *, keys: Sequence[str], num_classes: int, topk: int, views: int = 1,
           labels: Sequence[int] | None = None, attrs: Mapping[str, Any] | None = None,
           chunk_rows: int = fmt.DEFAULT_CHUNK_ROWS, overwrite: bool = False,
           embedding_dim: int | None = None,
           augment_dims: Mapping[str, int] | None = None, logits: bool = False,
           partners: Mapping[str, Any] | None = None,
           tar_fields: Sequence[str] | None = None) -> "LabelStoreWriter":
    """Create an empty label store and return a writer for it.

    Parameters
    ----------
    path : str or path-like
        Directory ``NAME.zarr`` (or an fsspec URL zarr can write to).
    keys : sequence of str
        One unique key per row (image path relative to the dataset root).
    num_classes, topk, views : int
        C, k and V of the store; ``topk <= num_classes``.
    labels : sequence of int, optional
        Ground-truth class per row, -1 where unknown (the default).
    attrs : mapping, optional
        Extra group attributes (``teacher``, ``preprocessing``, ``dataset``,
        ``class_names``, ``temperature``, ``provenance``...). ``dataset`` is completed
        with ``num_samples`` and ``fingerprint``.
    chunk_rows : int
        Rows per chunk R; a writer (rank) always owns whole chunks.
    embedding_dim : int, optional
        Adds an ``embeddings`` (N, D) float16 array.
    augment_dims : mapping, optional
        Sizes of the augmentation records (``{"op": L, "erase": E, "mix": 0 or 1}``, see
        docs/format.md): adds the record arrays whose sizes are not 0.
    logits : bool
        Adds ``logits`` (N, V, k) and ``log_partition`` (N, V), float32: the teacher's
        top-k logits and log-partition (docs/format.md, "Stored logits").
    partners : mapping, optional
        The partner table of a derived store with mixing records (docs/format.md): one
        array per name of ``_format.PARTNER_ARRAYS`` the store has (``keys`` a list of
        str, the others in the row arrays' stored dtypes with P for N), written whole.
    tar_fields : sequence of str, optional
        ``labelstore.TAR_FIELDS`` for a store of shard data: adds the ``tar`` (N, 4) int64
        array, each row's image location in its tar shard (docs/format.md, "Stores of
        shard data"), written with the rows (``write(..., tar=...)``), and records the
        names as the ``tar_fields`` attribute.

    Examples
    --------
    >>> import labelstore, numpy as np, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "demo.zarr")
    >>> with labelstore.create(path, keys=["a.png", "b.png"], num_classes=3, topk=2) as w:
    ...     w.write(0, np.array([[[0, 2]], [[1, 0]]]), np.array([[[.7, .2]], [[.6, .3]]]))
    >>> labelstore.open(path).dense(0).round(2)
    array([[0.7, 0.1, 0.2]], dtype=float32)
    """
    num_classes, topk, views, chunk_rows, embedding_dim = _check_sizes(
        num_classes, topk, views, chunk_rows, embedding_dim)
    augment_dims = fmt.check_augment_dims(augment_dims)
    tar_fields = fmt.check_tar_fields(tar_fields)
    joined = fmt.check_keys(keys)
    labels = fmt.check_labels(labels, len(joined), num_classes)
    lengths = fmt.sizes(rows=len(joined), views=views, topk=topk, chunk_rows=chunk_rows,
                        embedding_dim=embedding_dim, augment_dims=augment_dims, logits=logits,
                        tar_fields=len(tar_fields or ()))
    if partners is not None:
        if not lengths["mix"]:
            raise ValueError("partners: a partner table needs mixing records (augment_dims mix)")
        partners = _partners.check_values(partners, lengths)
    _clear(path, overwrite)
    group_attrs = _group_attrs(attrs, joined, num_classes=num_classes, topk=topk, views=views,
                               chunk_rows=chunk_rows, embedding_dim=embedding_dim,
                               augment_dims=augment_dims, logits=logits,
                               partners=0 if partners is None else len(partners["keys"]),
                               tar_fields=tar_fields)
    # file:// URLs go to zarr as plain paths: its fsspec store does not create directories
    local = local_path(path)
    made = local is not None and not os.path.lexists(local)
    try:
        # The attributes first, marked as being created: a creation stopped at any later
        # point (a kill) leaves a store that is recognisably ssld's, holds no row, and is
        # replaced by the next create (`_clear`); the mark goes once every array is there.
        group = zarr.open_group(local if local is not None else path, mode="w",
                                attributes={**group_attrs, CREATING: True})
        arrays = _create_arrays(group, lengths, chunk_rows, num_classes)
        _write_columns(arrays, {"keys": joined, "labels": labels})
        if partners is not None:
            _partners.write_table(group, partners, lengths, chunk_rows, _WRITE_ALL)
        del group.attrs[CREATING]
    except BaseException:
        if made and os.path.isdir(local):  # all of it is this call's, none of it a row
            shutil.rmtree(local, ignore_errors=True)
        raise
    return LabelStoreWriter(group, path)


def _check_sizes(num_classes: Any, topk: Any, views: Any, chunk_rows: Any,
                 embedding_dim: Any) -> tuple[int, int, int, int, int | None]:
    """C, k, V, R and D as ints; ValueError naming the first one out of range."""
    num_classes, topk, views, chunk_rows = int(num_classes), int(topk), int(views), int(chunk_rows)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if not 1 <= topk <= num_classes:
        raise ValueError(f"topk must be in [1, num_classes={num_classes}], got {topk}")
    if views < 1:
        raise ValueError(f"views must be >= 1, got {views}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    if embedding_dim is not None and int(embedding_dim) < 1:
        raise ValueError(f"embedding_dim must be >= 1, got {embedding_dim}")
    return num_classes, topk, views, chunk_rows, (None if embedding_dim is None
                                                  else int(embedding_dim))


def _clear(path: Any, overwrite: bool) -> None:
    """Make room for a new store at ``path``: refused unless ``overwrite``, and then only
    a recognisable label store is removed; a store whose creation never finished holds no
    row and is replaced without ``overwrite``."""
    if exists(path):
        if not overwrite and not unfinished_creation(path):
            raise FileExistsError(f"{path} already exists (pass overwrite=True / --overwrite "
                                  "to replace it)")
        remove_store(path)  # refuses anything that is not recognisably a label store


def _group_attrs(attrs: Mapping[str, Any] | None, keys: _keys.JoinedKeys, *, num_classes: int,
                 topk: int, views: int, chunk_rows: int,
                 embedding_dim: int | None,
                 augment_dims: dict[str, int] | None = None, logits: bool = False,
                 partners: int = 0, tar_fields: tuple[str, ...] | None = None
                 ) -> dict[str, Any]:
    """The group attributes: defaults, the caller's ``attrs``, then the structural fields
    (a caller's attrs cannot contradict the arrays) and ``dataset`` with the keys' count
    and fingerprint."""
    user_attrs = dict(attrs or {})
    dataset = dict(user_attrs.pop("dataset", {}) or {})
    dataset.update(num_samples=len(keys), fingerprint=keys.fingerprint())
    group_attrs = {
        "format": fmt.FORMAT,
        "format_version": fmt.FORMAT_VERSION,
        "num_classes": num_classes,
        "topk": topk,
        "views": views,
        "temperature": 1.0,
        "chunk_rows": chunk_rows,
        "box_scale": fmt.BOX_SCALE,
        "embedding_dim": embedding_dim,
        "created": fmt.now_iso(),
        "software": fmt.software_versions(),
        "complete": False,
    }
    group_attrs.update(user_attrs)
    group_attrs["dataset"] = dataset
    group_attrs.update(format=fmt.FORMAT, format_version=fmt.FORMAT_VERSION,
                       num_classes=num_classes, topk=topk, views=views, chunk_rows=chunk_rows,
                       complete=False, integrity=dict(fmt.INTEGRITY))
    for name in ("augment_dims", "logits", "partners", "tar_fields"):
        group_attrs.pop(name, None)
    # only where used: crop-only stores keep the attributes they always had
    if augment_dims is not None:
        group_attrs["augment_dims"] = dict(augment_dims)
    if logits:
        group_attrs["logits"] = True
    if partners:
        group_attrs["partners"] = int(partners)
    if tar_fields:
        group_attrs["tar_fields"] = list(tar_fields)
    return group_attrs


def _create_arrays(group: zarr.Group, lengths: dict[str, int], chunk_rows: int,
                   num_classes: int) -> dict[str, zarr.Array]:
    """Every array of the schema this store has, empty, with its chunks, codecs and
    dimension names."""
    arrays = {}
    for spec in fmt.SCHEMA:
        if not spec.present(lengths):
            continue
        with warnings.catch_warnings():
            # zarr warns that variable-length strings are not in the v3 core spec yet.
            warnings.simplefilter("ignore", category=UserWarning)
            arrays[spec.name] = group.create_array(
                spec.name, shape=spec.shape(lengths), chunks=spec.chunks(lengths, chunk_rows),
                dtype=fmt.stored_dtype(spec, num_classes), fill_value=spec.fill,
                compressors=fmt.compressors(spec.compress), dimension_names=spec.dims,
                config=_WRITE_ALL)
    return arrays


def _write_columns(arrays: dict[str, zarr.Array], values: dict[str, Any]) -> None:
    """The arrays ``create`` writes whole from its arguments (keys, labels); strings
    come joined (``_keys.JoinedKeys``) and are written by ``_keys``."""
    for spec in fmt.specs(written="create"):
        if spec.dtype == "str":
            _keys.write(arrays[spec.name], values[spec.name])
        else:
            arrays[spec.name][:] = values[spec.name]


class IncompleteRunError(RuntimeError):
    """A run ended with chunks it was meant to write still missing (never a success)."""


class LabelStoreWriter:
    """Writes rows into an existing store; see :func:`create` and ``open(path, mode="a")``."""

    def __init__(self, group: zarr.Group, path: Any):
        self.path = str(path)
        self._group = group
        attrs = dict(group.attrs)
        self.num_classes = int(attrs["num_classes"])
        self.topk = int(attrs["topk"])
        self.num_views = int(attrs["views"])
        self.chunk_rows = int(attrs["chunk_rows"])
        self.embedding_dim = attrs.get("embedding_dim")
        self.augment_dims = attrs.get("augment_dims")
        self.logits = bool(attrs.get("logits"))
        self.tar_fields = len(attrs.get("tar_fields") or ())
        self._n = int(group["labels"].shape[0])
        self.num_chunks = _chunk_count(self._n, self.chunk_rows)
        lengths = fmt.sizes(rows=self._n, views=self.num_views, topk=self.topk,
                            chunk_rows=self.chunk_rows, embedding_dim=self.embedding_dim,
                            augment_dims=self.augment_dims, logits=self.logits,
                            tar_fields=self.tar_fields)
        # Array handles looked up once: each group lookup re-reads the array's metadata.
        self._arrays = {spec.name: group[spec.name].with_config(_WRITE_ALL)
                        for spec in fmt.SCHEMA
                        if spec.written in ("rows", "done") and spec.present(lengths)}
        # what ``write`` stores, by schema name (the label arrays, embeddings if created with)
        self.row_arrays = tuple(name for name in self._arrays if name != "done")
        self._pool = ThreadPoolExecutor(len(self.row_arrays), thread_name_prefix="ssld-write")
        self._codecs: dict[int, tuple] = {}
        self._buffers: dict[int, dict[str, np.ndarray]] = {}
        self._filled: dict[int, np.ndarray] = {}
        self._closed = False

    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        return (f"<LabelStoreWriter {self.path!r} N={self._n} V={self.num_views} k={self.topk} "
                f"C={self.num_classes} chunks={self.num_chunks}>")

    @property
    def attrs(self) -> dict:
        return dict(self._group.attrs)

    def update_attrs(self, **values: Any) -> None:
        """Merge extra attributes (e.g. the teacher's run summary) into the group."""
        self._group.attrs.update(values)

    def chunk_range(self, chunk: int) -> tuple[int, int]:
        """Rows [start, stop) of chunk ``chunk``."""
        if not 0 <= chunk < self.num_chunks:
            raise ValueError(f"chunk {chunk} out of range [0, {self.num_chunks})")
        start = chunk * self.chunk_rows
        return start, min(start + self.chunk_rows, self._n)

    def done_chunks(self) -> np.ndarray:
        """Boolean flag per chunk, read from the store (what other writers finished counts)."""
        return np.asarray(self._arrays["done"][:], dtype=bool)

    def missing(self) -> list[tuple[int, int]]:
        """Row ranges [start, stop) whose chunks are not yet written (merged, sorted)."""
        return fmt.missing_ranges(self.done_chunks(), self.chunk_rows, self._n)

    def write(self, start: int, indices: Any, probs: Any, *, residual: Any = None,
              boxes: Any = None, flips: Any = None, valid: Any = None,
              embeddings: Any = None, **arrays: Any) -> None:
        """Write rows ``[start, start + n)``; chunks are flushed once all their rows arrived.

        ``indices`` and ``probs`` are (n, V, k); ``residual`` (n, V) defaults to
        ``1 - probs.sum(-1)`` computed before float16 rounding; ``boxes`` (n, V, 4) are
        (y0, x0, h, w) fractions (default: the whole image); ``flips`` (n, V) and
        ``valid`` (n,) default to False and True. ``arrays`` are further arrays of the
        schema by name (``_format.SCHEMA``; their fill value when not given).
        """
        if self._closed:
            raise ValueError(f"writer for {self.path} is closed")
        if isinstance(start, (bool, np.bool_)) or not isinstance(start, (int, np.integer)):
            raise ValueError(f"start must be an integer row, got {start!r}")
        given = dict(indices=indices, probs=probs, residual=residual, boxes=boxes, flips=flips,
                     valid=valid, embeddings=embeddings, **arrays)
        rows = fmt.check_rows({name: value for name, value in given.items() if value is not None},
                              num_views=self.num_views, topk=self.topk,
                              num_classes=self.num_classes, embedding_dim=self.embedding_dim,
                              augment_dims=self.augment_dims, logits=self.logits,
                              tar_fields=self.tar_fields)
        self._place(int(start), rows)

    def write_stored(self, start: int, rows: dict[str, np.ndarray]) -> None:
        """Write rows ``[start, start + n)`` given as another store holds them (the stored
        dtypes of every array in ``row_arrays``): the bit-exact copies of select-topk and
        merge. Names, shapes and dtypes are checked; the value rules of :meth:`write`
        are not run again: the rows passed them when first written, and their chunks'
        checksums when read."""
        if self._closed:
            raise ValueError(f"writer for {self.path} is closed")
        if set(rows) != set(self.row_arrays):
            raise ValueError(f"write_stored needs exactly the arrays {sorted(self.row_arrays)}, "
                             f"got {sorted(rows)}")
        n = len(rows["indices"])
        for name, value in rows.items():
            array = self._arrays[name]
            if value.shape != (n,) + tuple(array.shape[1:]) or value.dtype != array.dtype:
                raise ValueError(f"{name} must be stored values of shape "
                                 f"{(n,) + tuple(array.shape[1:])} and dtype {array.dtype}, got "
                                 f"{value.shape} {value.dtype}")
        self._place(int(start), rows)

    def _place(self, start: int, rows: dict[str, np.ndarray]) -> None:
        """Hand checked rows to their chunks: whole chunks are written at once, the rest
        buffered until their chunk is complete."""
        n = len(rows["indices"])
        if start < 0 or start + n > self._n:
            raise ValueError(f"rows [{start}, {start + n}) are out of range for a store of "
                             f"{self._n} rows")
        pos, whole = start, []
        while pos < start + n:
            chunk = pos // self.chunk_rows
            lo, hi = self.chunk_range(chunk)
            take = min(hi, start + n) - pos
            if pos == lo and take == hi - lo and chunk not in self._buffers:
                whole.append(chunk)  # whole chunks of this call: written from it, no copy
            else:
                self._buffer(chunk, pos - lo, {name: value[pos - start:pos - start + take]
                                               for name, value in rows.items()})
            pos += take
        if whole:  # consecutive: only the first and the last chunk of a call can be partial
            lo, hi = self.chunk_range(whole[0])[0], self.chunk_range(whole[-1])[1]
            self._flush(whole[0], whole[-1] + 1, {name: value[lo - start:hi - start]
                                                  for name, value in rows.items()})

    def _buffer(self, chunk: int, offset: int, part: dict[str, np.ndarray]) -> None:
        lo, hi = self.chunk_range(chunk)
        if chunk not in self._buffers:
            self._buffers[chunk] = {name: np.zeros((hi - lo,) + value.shape[1:], value.dtype)
                                    for name, value in part.items()}
            self._filled[chunk] = np.zeros(hi - lo, dtype=bool)
        buffer = self._buffers[chunk]
        take = len(part["indices"])
        for name, value in part.items():
            buffer[name][offset:offset + take] = value
        self._filled[chunk][offset:offset + take] = True
        if self._filled[chunk].all():
            del self._filled[chunk]
            self._flush(chunk, chunk + 1, self._buffers.pop(chunk))

    def _codecs_of(self, array) -> "_chunks.BytesCodecs | None":
        """The array's codecs when ``_chunks`` can write its chunks (cached per handle)."""
        cached = self._codecs.get(id(array))
        if cached is None or cached[0] is not array:
            cached = self._codecs[id(array)] = (array, _chunks.numeric_codecs(array))
        return cached[1]

    def _flush(self, first: int, stop: int, data: dict[str, np.ndarray]) -> None:
        """Write chunks [first, stop) of every array, then their done flags."""
        lo, hi = self.chunk_range(first)[0], self.chunk_range(stop - 1)[1]

        def put(name: str) -> None:
            array = self._arrays[name]
            codecs = self._codecs_of(array)
            if codecs is not None:  # zarr's bytes, without zarr's per-chunk layers
                _chunks.write_rows(array, codecs, lo, data[name])
            else:
                array[lo:hi] = data[name]

        # All arrays at once: zarr compresses their chunks concurrently (Blosc in threads)
        # instead of one array's chunks after the other's.
        for future in [self._pool.submit(put, name) for name in data]:
            future.result()
        # Set only after every array of the chunks is on storage.
        self._arrays["done"][first:stop] = True

    def close(self) -> None:
        """Drop unfinished chunk buffers (with a warning) and mark the store complete if it is."""
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown()
        if self._filled:
            partial = sorted(self._filled)
            rows = sum(int(f.sum()) for f in self._filled.values())
            warnings.warn(f"{rows} buffered rows of {len(partial)} unfinished chunk(s) "
                          f"(first: chunk {partial[0]}) were not written; they stay missing",
                          stacklevel=2)
            self._buffers.clear()
            self._filled.clear()
        if not self.missing():
            self._group.attrs.update({"complete": True})

    def __enter__(self) -> "LabelStoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # keep what was flushed; an interrupted run is resumed later
            self._buffers.clear()
            self._filled.clear()
            self._closed = True
            self._pool.shutdown()
