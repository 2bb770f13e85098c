"""Opening and reading label stores."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import Any

import numpy as np
import zarr

from . import _chunks
from . import _format as fmt
from . import _keys
from . import _partners
from ._paths import CREATING, exists, local_path
from ._writer import LabelStoreWriter


class DamagedStoreError(ValueError):
    """A store whose arrays do not hold what its metadata promises (a chunk missing,
    truncated or altered, an array removed or reshaped, a value the format rules out).
    Reported, never read as data."""


class UnfinishedStoreError(ValueError):
    """A store whose creation never finished (its creator stopped: a full disk, a kill).
    It holds no row; ``create`` (the command that writes it, run again) replaces it."""


@dataclass(frozen=True)
class LabelSlice:
    """Rows read from a store, in the order asked; shapes and dtypes as docs/format.md gives
    them (V views, k classes per view)."""

    rows: np.ndarray       # (n,) int64 row numbers
    indices: np.ndarray    # (n, V, k) int64 class ids, best first
    probs: np.ndarray      # (n, V, k) float32
    residual: np.ndarray   # (n, V) float32
    boxes: np.ndarray      # (n, V, 4) float32 fractions (y0, x0, h, w)
    flips: np.ndarray      # (n, V) bool
    valid: np.ndarray      # (n,) bool
    # label arrays of the schema beyond the ones above, by name; also read as attributes
    more: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.rows)

    def __getattr__(self, name: str) -> np.ndarray:
        more = self.__dict__.get("more") or {}
        if name in more:
            return more[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __getitem__(self, name: str) -> np.ndarray:
        """A label array by its schema name (``part["probs"]`` is ``part.probs``)."""
        return getattr(self, name)


def _open_group(path: Any, mode: str) -> zarr.Group:
    local = local_path(path)
    if not exists(path):  # for URLs: one line when the endpoint or bucket is unreachable
        raise FileNotFoundError(f"no label store at {local if local is not None else path}")
    try:
        group = zarr.open_group(local if local is not None else _fresh_store(path, mode),
                                mode=mode)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError,
            ValueError, KeyError) as exc:
        raise ValueError(f"{path} is not an ssld label store (no zarr group: {exc})") from None
    attrs = group.attrs
    if attrs.get("format") != fmt.FORMAT:
        raise ValueError(f"{path} is not an ssld label store "
                         f"(format attribute is {attrs.get('format')!r}, expected {fmt.FORMAT!r})")
    version = attrs.get("format_version")
    if version != fmt.FORMAT_VERSION:
        raise ValueError(f"{path} has label-store format version {version!r}; this ssld reads "
                         f"version {fmt.FORMAT_VERSION}")
    if attrs.get(CREATING):
        raise UnfinishedStoreError(
            f"label store {path} was never finished being created (the run creating it "
            "stopped before any row was written: a full disk, a kill); run the command that "
            "writes it again: it is created afresh")
    check_structure(group, path)
    return group


def _fresh_store(url: Any, mode: str):
    """An fsspec-backed zarr store whose listing cache is dropped: s3fs caches listings per
    process, and a store that other ranks or machines have written since would otherwise
    read its new chunks as missing (fill values)."""
    store = zarr.storage.FsspecStore.from_url(str(url), read_only=mode == "r")
    store.fs.invalidate_cache()
    return store


def check_structure(group: zarr.Group, path: Any) -> None:
    """DamagedStoreError unless the attributes agree with each other
    (``_format.attribute_problem``), every array is there with the shape, chunking and
    dtype they imply, and (for stores that promise it) every done chunk is on storage."""
    attrs = group.attrs
    problem = fmt.attribute_problem(dict(attrs))
    if problem is not None:
        raise DamagedStoreError(f"label store {path} is damaged: {problem}")
    try:
        n = int(group["labels"].shape[0])
        lengths = fmt.sizes(rows=n, views=int(attrs["views"]), topk=int(attrs["topk"]),
                            chunk_rows=int(attrs["chunk_rows"]),
                            embedding_dim=attrs.get("embedding_dim"),
                            augment_dims=attrs.get("augment_dims"), logits=attrs.get("logits"),
                            tar_fields=len(attrs.get("tar_fields") or ()))
    except KeyError as exc:
        raise DamagedStoreError(f"label store {path} is damaged: {exc} is missing") from None
    arrays = {}
    for spec in fmt.SCHEMA:
        if not spec.present(lengths):
            continue
        try:  # by name: listing the group's members would warn about failed.txt
            array = arrays[spec.name] = group[spec.name]
        except KeyError:
            raise DamagedStoreError(f"label store {path} is damaged: array {spec.name!r} is "
                                    "missing") from None
        shape, chunks = spec.shape(lengths), spec.chunks(lengths, int(attrs["chunk_rows"]))
        if tuple(array.shape) != shape or tuple(array.chunks) != chunks:
            raise DamagedStoreError(
                f"label store {path} is damaged: array {spec.name!r} has shape "
                f"{tuple(array.shape)} chunks {tuple(array.chunks)}, its attributes say shape "
                f"{shape} chunks {chunks}")
        if spec.dtype == "index" and array.dtype != fmt.index_dtype(int(attrs["num_classes"])):
            raise DamagedStoreError(
                f"label store {path} is damaged: class ids are stored as {array.dtype}, "
                f"which num_classes {attrs['num_classes']} does not give")
    recorded = (attrs.get("dataset") or {}).get("num_samples")
    if recorded is not None and int(recorded) != n:
        raise DamagedStoreError(f"label store {path} is damaged: it has {n} rows, its "
                                f"dataset.num_samples says {recorded}")
    ranges = [entry.get("rows") for entry in attrs.get("teachers") or []]
    if ranges and [bound for pair in ranges for bound in pair] != \
            [0] + [bound for pair in ranges[:-1] for bound in (pair[1], pair[1])] + [n]:
        raise DamagedStoreError(f"label store {path} is damaged: the row ranges of its "
                                f"teachers {ranges} do not cover its {n} rows in order")
    stored = None
    if (attrs.get("integrity") or {}).get("every_chunk_written"):
        stored = _check_chunks_present(group, path, arrays)
    problem = _partners.structure_problem(group, attrs, lengths, stored)
    if problem:
        raise DamagedStoreError(f"label store {path} is damaged: {problem}")


def _stored_keys(group: zarr.Group, path: Any) -> set[str]:
    """Every key below the group (one listing; a few requests on object storage)."""
    if not _chunks.FAST_PATH:  # a zarr release the fast path is not tested with: fsspec lists
        import fsspec

        fs, root = fsspec.core.url_to_fs(str(path))
        fs.invalidate_cache()  # as _fresh_store: other ranks may have written since
        root = root.rstrip("/")
        return {found[len(root) + 1:] for found in fs.find(root)}
    from zarr.core.sync import sync

    prefix = f"{group.path}/" if group.path else ""

    async def collect() -> set[str]:
        return {key[len(prefix):] async for key in group.store.list_prefix(prefix)}

    return sync(collect())


def _check_chunks_present(group: zarr.Group, path: Any, arrays: dict) -> set[str]:
    """DamagedStoreError unless every done chunk of every array is on storage; returns the
    keys found (the partner table's chunks are checked against them too)."""
    done = _read_array(path, "done", arrays["done"], slice(None)).astype(bool)
    stored = _stored_keys(group, path)
    for name, array in arrays.items():
        if name == "done":
            continue
        tail = (0,) * (array.ndim - 1)
        for chunk in np.flatnonzero(done):
            key = f"{name}/{_chunks.chunk_key(array, (int(chunk),) + tail)}"
            if key not in stored:
                rows = int(array.chunks[0])
                raise DamagedStoreError(
                    f"label store {path} is damaged: chunk {int(chunk)} of array {name!r} (rows "
                    f"{chunk * rows}:{min((chunk + 1) * rows, array.shape[0])}) is missing "
                    "though the chunk is marked done")
    return stored


def _read_array(path: Any, name: str, array: zarr.Array, selection: Any,
                orthogonal: bool = False) -> np.ndarray:
    """``array[selection]`` as numpy; a chunk that cannot be decoded (bad checksum,
    truncated, garbage) is a DamagedStoreError naming the array and the chunk."""
    try:
        if not orthogonal and isinstance(selection, slice) and selection.step in (None, 1) \
                and _is_strings(array):  # keys: chunks built by numpy, not key by key
            lo, hi, _ = selection.indices(array.shape[0])
            return _keys.read(array, lo, hi)
        return np.asarray(array.oindex[selection] if orthogonal else array[selection])
    except Exception as exc:  # noqa: BLE001 - zarr/numcodecs raise many kinds on bad bytes
        raise DamagedStoreError(f"label store {path} is damaged: {_bad_chunk(array, name)} "
                                f"cannot be read ({type(exc).__name__}: {exc})") from None


def _is_strings(array: zarr.Array) -> bool:
    """A 1-D variable-length string array (``keys``)."""
    return array.ndim == 1 and array.dtype.kind in "OT"


def _bad_chunk(array: zarr.Array, name: str) -> str:
    """Names the first chunk of ``array`` that fails to decode (the error path only)."""
    rows = int(array.chunks[0])
    for chunk in range((array.shape[0] + rows - 1) // rows):
        try:
            array[chunk * rows:(chunk + 1) * rows]
        except Exception:  # noqa: BLE001
            return (f"chunk {chunk} of array {name!r} (rows {chunk * rows}:"
                    f"{min((chunk + 1) * rows, array.shape[0])})")
    return f"array {name!r}"


def open(path: Any, mode: str = "r") -> "LabelStore | LabelStoreWriter":  # noqa: A001
    """Open a label store: ``mode="r"`` gives a reader, ``mode="a"`` a writer for resuming.

    ``path`` is a local directory or any fsspec URL zarr accepts (reading).
    """
    if mode == "r":
        return LabelStore(_open_group(path, "r"), path)
    if mode == "a":
        return LabelStoreWriter(_open_group(path, "r+"), path)
    raise ValueError(f"mode must be 'r' (read) or 'a' (resume writing), got {mode!r}")


class LabelStore:
    """Read-only view of a label store. Call :meth:`load` once to serve reads from RAM."""

    def __init__(self, group: zarr.Group, path: Any):
        self.path = str(path)
        self._group = group
        self._attrs = dict(group.attrs)
        self._n = int(group["labels"].shape[0])
        self._ram: dict[str, np.ndarray] | None = None
        self._arrays: dict[str, zarr.Array] = {}

    # -- raw access (every read of an array goes through here) ----------------
    def _array(self, name: str) -> zarr.Array:
        if name not in self._arrays:  # each group lookup re-reads the array's metadata
            self._arrays[name] = self._group[name]
        return self._arrays[name]

    def _get(self, name: str, selection: Any, orthogonal: bool = False) -> np.ndarray:
        """Stored values of one array; damage is a DamagedStoreError naming the chunk."""
        values = _read_array(self.path, name, self._array(name), selection, orthogonal)
        self._check_values(name, values, selection)
        return values

    def _check_values(self, name: str, values: np.ndarray, selection: Any) -> None:
        """The format's rules for stored values (``_format.value_problem``) on what was just
        read: a value that breaks one is a DamagedStoreError naming the chunk and the row."""
        problem = fmt.value_problem(name, values, self.num_classes)
        if problem is None:
            return
        position, what = problem
        rows = selection[0] if isinstance(selection, tuple) else selection
        row = (rows.indices(self._n)[0] + position if isinstance(rows, slice)
               else int(np.asarray(rows)[position]))
        chunk, size = row // self.chunk_rows, self.chunk_rows
        raise DamagedStoreError(
            f"label store {self.path} is damaged: chunk {chunk} of array {name!r} (rows "
            f"{chunk * size}:{min((chunk + 1) * size, self._n)}) holds {what} at row {row}")

    def _get_many(self, selections: dict[str, Any]) -> dict[str, np.ndarray]:
        """Stored values of several arrays (name → basic selection) in one batch, so zarr
        decodes all their chunks concurrently instead of array after array; damage is
        reported as by :meth:`_get`."""
        if not _chunks.FAST_PATH:  # zarr's internal event loop is not tested on this release
            return {name: self._get(name, selection) for name, selection in selections.items()}
        from zarr.core.sync import sync

        batched = {name: selection for name, selection in selections.items()
                   if not _is_strings(self._array(name))}   # keys take their own path

        async def read_all() -> list:
            return await asyncio.gather(*(self._array(name).async_array.getitem(selection)
                                          for name, selection in batched.items()),
                                        return_exceptions=True)

        results = dict(zip(batched, sync(read_all()))) if batched else {}
        out = {}
        for name, selection in selections.items():
            value = results.get(name)
            if name in batched and not isinstance(value, BaseException):
                out[name] = np.asarray(value)
                self._check_values(name, out[name], selection)
            else:  # keys, or an error to report with the chunk named
                out[name] = self._get(name, selection)
        return out

    # -- shape and metadata -------------------------------------------------
    def __len__(self) -> int:
        return self._n

    @property
    def attrs(self) -> dict:
        return dict(self._attrs)

    @property
    def num_classes(self) -> int:
        return int(self._attrs["num_classes"])

    @property
    def topk(self) -> int:
        return int(self._attrs["topk"])

    @property
    def num_views(self) -> int:
        return int(self._attrs["views"])

    @property
    def chunk_rows(self) -> int:
        return int(self._attrs["chunk_rows"])

    @property
    def class_names(self) -> list[str] | None:
        return self._attrs.get("class_names")

    @property
    def has_embeddings(self) -> bool:
        return "embeddings" in self._group

    @property
    def embedding_dim(self) -> int | None:
        return int(self._group["embeddings"].shape[1]) if self.has_embeddings else None

    @property
    def augment_dims(self) -> dict[str, int] | None:
        """Sizes of the augmentation records ({op, erase, mix}; docs/format.md), None for a
        store without them."""
        dims = self._attrs.get("augment_dims")
        return dict(dims) if dims else None

    @property
    def has_logits(self) -> bool:
        """Whether the store keeps the teacher's top-k logits (docs/format.md)."""
        return bool(self._attrs.get("logits"))

    @property
    def tar_fields(self) -> tuple[str, ...] | None:
        """The columns of the ``tar`` array (``labelstore.TAR_FIELDS``) in a store of shard
        data (docs/format.md, "Stores of shard data"); None for a store of image files."""
        fields = self._attrs.get("tar_fields")
        return tuple(fields) if fields else None

    @property
    def partner_count(self) -> int:
        """Entries of the partner table (0: every mixing partner is a row)."""
        return int(self._attrs.get("partners") or 0)

    @cached_property
    def _lengths(self) -> dict[str, int]:
        return fmt.sizes(rows=self._n, views=self.num_views, topk=self.topk,
                         chunk_rows=self.chunk_rows, embedding_dim=self.embedding_dim,
                         augment_dims=self.augment_dims, logits=self.has_logits,
                         tar_fields=len(self.tar_fields or ()))

    @property
    def student_arrays(self) -> tuple[str, ...]:
        """The optional row arrays training reads that this store has: its augmentation
        records and stored logits (``_format.SCHEMA`` entries marked ``student``)."""
        return tuple(name for name in fmt.student_arrays()
                     if fmt.array_spec(name).present(self._lengths))

    @cached_property
    def keys(self) -> np.ndarray:
        """(N,) keys as a numpy object array of str (read once, then cached)."""
        return np.asarray(self._get("keys", slice(None)), dtype=object)

    @cached_property
    def labels(self) -> np.ndarray:
        """(N,) int32 ground-truth labels, -1 where unknown (read once, then cached)."""
        return np.asarray(self._get("labels", slice(None)), dtype=np.int32)

    @property
    def valid(self) -> np.ndarray:
        """(N,) bool: False where the teacher had no image (read each time: a store being
        written still changes; unlike ``read``, touches no other array)."""
        if self._ram is not None:
            return self._ram["valid"].astype(bool, copy=False)
        return np.asarray(self._get("valid", slice(None)), dtype=bool)

    @property
    def is_complete(self) -> bool:
        """True once every chunk is written (reads the ``done`` flags)."""
        return bool(np.all(self._get("done", slice(None))))

    def missing(self) -> list[tuple[int, int]]:
        """Row ranges not yet written; empty for a complete store."""
        return fmt.missing_ranges(self._get("done", slice(None)), self.chunk_rows, self._n)

    def require_complete(self) -> "LabelStore":
        """Raise ValueError unless the store is complete (training refuses partial stores)."""
        missing = self.missing()
        if missing:
            rows = sum(b - a for a, b in missing)
            raise ValueError(f"label store {self.path} is incomplete: {rows} of {self._n} rows "
                             f"missing (first range {missing[0][0]}:{missing[0][1]}); resume the "
                             "run that writes it")
        return self

    def row_teachers(self) -> list[tuple[int, int, dict]]:
        """``(lo, hi, teacher)`` per row range, covering the store in order: the ``teachers``
        attribute of a store whose rows come from several teachers (a merge or selection
        of their stores, docs/format.md), else one range with the store's own. ``teacher``
        holds the attributes the rows were computed with (``teacher``, ``preprocessing``,
        ``temperature``, ``compute``): what ``ssld verify`` recomputes them with."""
        recorded = self._attrs.get("teachers")
        if recorded:
            return [(int(entry["rows"][0]), int(entry["rows"][1]),
                     {name: value for name, value in entry.items() if name != "rows"})
                    for entry in recorded]
        return [(0, self._n, fmt.teacher_entry(self._attrs))]

    @property
    def teacher_name(self) -> str | None:
        teacher = self._attrs.get("teacher") or {}
        return teacher.get("model") if isinstance(teacher, dict) else str(teacher)

    def __repr__(self) -> str:
        state = "complete" if self._attrs.get("complete") else "incomplete"
        where = " in RAM" if self._ram is not None else ""
        return (f"<LabelStore {self.path!r} N={self._n} V={self.num_views} k={self.topk} "
                f"C={self.num_classes} teacher={self.teacher_name or '-'} {state}{where}>")

    # -- reading --------------------------------------------------------------
    def load(self) -> "LabelStore":
        """Read the label arrays fully into RAM once; later reads are numpy indexing.

        Arrays keep their compact stored dtypes (about 50 bytes per row-view), so a
        few million rows fit easily, and forked DataLoader workers share the pages.
        """
        if self._ram is None:
            where = ("tar",) if self.tar_fields else ()  # the images' locations: training
            self._ram = {name: self._get(name, slice(None))
                         for name in fmt.label_arrays() + self.student_arrays + where}
        return self

    def in_memory(self) -> "LabelStore":
        """Alias of :meth:`load`."""
        return self.load()

    @property
    def is_loaded(self) -> bool:
        return self._ram is not None

    def _rows(self, rows: Any) -> tuple[np.ndarray, slice | None]:
        """Normalise ``rows`` to an int64 array (and a unit-step slice when it is one)."""
        n = self._n
        if isinstance(rows, (bool, np.bool_)):
            raise ValueError(f"rows must be an int, slice or 1-D integer array, got {rows!r}")
        if isinstance(rows, (int, np.integer)):
            row = int(rows)
            if not -n <= row < n:
                raise ValueError(f"row {row} is out of range for a store of {n} rows")
            row %= n
            return np.array([row], dtype=np.int64), slice(row, row + 1)
        if isinstance(rows, slice):
            start, stop, step = rows.indices(n)
            out = np.arange(start, stop, step, dtype=np.int64)
            return out, (slice(start, max(start, stop)) if step == 1 else None)
        array = np.asarray(rows)
        if array.dtype.kind == "b":
            if array.shape != (n,):
                raise ValueError(f"a boolean row mask must have shape ({n},), got {array.shape}")
            return np.flatnonzero(array).astype(np.int64), None
        if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
            raise ValueError(f"rows must be an int, slice or 1-D integer array, got "
                             f"shape {array.shape} dtype {array.dtype}")
        array = array.astype(np.int64)
        if array.size and (array.min() < -n or array.max() >= n):
            bad = array[(array < -n) | (array >= n)][0]
            raise ValueError(f"row {int(bad)} is out of range for a store of {n} rows")
        return np.where(array < 0, array + n, array), None

    def _fetch(self, name: str, rows: np.ndarray, contiguous: slice | None) -> np.ndarray:
        if self._ram is not None and name in self._ram:
            source = self._ram[name]
            return source[contiguous] if contiguous is not None else source[rows]
        if contiguous is not None:
            return self._get(name, contiguous)
        if rows.size == 0:
            array = self._array(name)
            return np.zeros((0,) + array.shape[1:], dtype=array.dtype)
        # zarr reads each touched chunk once for sorted unique rows; restore the asked order.
        unique, inverse = np.unique(rows, return_inverse=True)
        return self._get(name, unique, orthogonal=True)[inverse]

    def read(self, rows: Any) -> LabelSlice:
        """Rows (int, slice, 1-D int array or bool mask), returned in the order asked."""
        row_array, contiguous = self._rows(rows)
        values = {spec.name: spec.read(self._fetch(spec.name, row_array, contiguous))
                  for spec in fmt.specs(label=True)}
        named = {f.name for f in fields(LabelSlice)}
        return LabelSlice(rows=row_array, **{k: v for k, v in values.items() if k in named},
                          more={k: v for k, v in values.items() if k not in named})

    def read_rows(self, rows: Any, names: Any = None) -> dict[str, np.ndarray]:
        """Stored values (stored dtypes) of the named row arrays, rows in the order asked
        (default: :attr:`student_arrays`, the records and logits this store has); served
        from RAM after :meth:`load`. ValueError for an array the store does not have."""
        names = self.student_arrays if names is None else tuple(names)
        for name in names:
            spec = next((entry for entry in fmt.SCHEMA if entry.name == name), None)
            if spec is None or not spec.per_row or not spec.present(self._lengths):
                raise ValueError(f"label store {self.path} has no row array {name!r}")
        row_array, contiguous = self._rows(rows)
        return {name: self._fetch(name, row_array, contiguous) for name in names}

    def read_tar(self, rows: Any) -> np.ndarray:
        """(n, 4) int64 shard locations of ``rows`` (the ``tar`` array, columns
        ``labelstore.TAR_FIELDS``; -1 for rows that are image files), in the order asked;
        all -1 in a store without the array (every row an image file). Served from RAM
        after :meth:`load`. ``teacher_infer.ImageSource`` reads a row's image with it."""
        row_array, contiguous = self._rows(rows)
        if not self.tar_fields:
            return np.full((len(row_array), len(fmt.TAR_FIELDS)), -1, dtype=np.int64)
        return self._fetch("tar", row_array, contiguous).astype(np.int64, copy=False)

    def partner_table(self) -> dict[str, np.ndarray] | None:
        """The partner table (docs/format.md; None when the store has none): keys, boxes,
        flips and the partners' own ops and erasing, whole, stored dtypes; read once."""
        if not self.partner_count:
            return None
        if "_partner_table" not in self.__dict__:
            try:
                self.__dict__["_partner_table"] = _partners.read_table(
                    self._group, self._lengths, self.partner_count)
            except Exception as exc:  # noqa: BLE001 - damaged chunks, reported by name
                raise DamagedStoreError(f"label store {self.path} is damaged: its partner "
                                        f"table cannot be read ({type(exc).__name__}: "
                                        f"{exc})") from None
        return self.__dict__["_partner_table"]

    def partners(self, refs: Any) -> dict[str, np.ndarray]:
        """What replaying mixing partners ``refs`` (``mix_partners`` values: a row, or
        ``-2 - i`` for entry i of the partner table) needs: ``keys`` (object array) and the
        stored ``boxes``, ``flips`` and own ops and erasing this store has, one entry per
        ref. ValueError for ``-1`` (not mixed) or a ref outside the store and its table."""
        refs = np.asarray(refs, dtype=np.int64).reshape(-1)
        names = tuple(spec.name for spec in _partners.table_specs(self._lengths))
        bad = (refs == _partners.NOT_MIXED) | (refs >= self._n) \
            | (_partners.table_index(refs) >= self.partner_count)
        if bad.any():
            raise ValueError(f"label store {self.path}: mixing partner {int(refs[bad][0])} is "
                             f"neither a row (< {self._n}) nor a partner-table entry "
                             f"({self.partner_count})")
        out = {name: np.empty((len(refs),) + self._array(name).shape[1:],
                              dtype=object if name == "keys" else self._array(name).dtype)
               for name in names}
        rows = refs >= 0
        if rows.any():
            found = self.read_rows(refs[rows], [n for n in names if n != "keys"])
            found["keys"] = self.keys[refs[rows]]
            for name in names:
                out[name][rows] = found[name]
        if (~rows).any():
            table = self.partner_table()
            entries = _partners.table_index(refs[~rows])
            for name in names:
                out[name][~rows] = table[name][entries]
        return out

    def read_embeddings(self, rows: Any) -> np.ndarray:
        """(n, D) float32 embeddings of view 0; ValueError when the store has none."""
        if not self.has_embeddings:
            raise ValueError(f"label store {self.path} has no embeddings (run infer-teacher "
                             "with --embeddings)")
        row_array, contiguous = self._rows(rows)
        return self._fetch("embeddings", row_array, contiguous).astype(np.float32)

    def dense(self, rows: Any, view: int = 0) -> np.ndarray:
        """(n, C) float32 teacher distributions: top-k probabilities, the residual spread
        uniformly over the other C − k classes, renormalised to sum 1 (undoes fp16 rounding)."""
        if not 0 <= int(view) < self.num_views:
            raise ValueError(f"view {view} is out of range for a store with {self.num_views} views")
        part = self.read(rows)
        return densify(part.indices[:, view], part.probs[:, view], part.residual[:, view],
                       self.num_classes)

    # -- summaries ------------------------------------------------------------
    @property
    def info(self) -> "StoreInfo":
        """Cheap summary (attributes and array metadata only) with a table repr."""
        from ._inspect import StoreInfo

        return StoreInfo.from_store(self)

    def to_xarray(self):
        """The store as a lazy, labelled ``xarray.Dataset`` (dims ``row``, ``view``, ``rank``,
        ``box``, ``feature``, ``chunk``; the group attributes as ``attrs``; xarray optional).
        Same as ``xarray.open_zarr(path, consolidated=False)``."""
        try:
            import xarray as xr
        except ImportError:
            raise ImportError("to_xarray needs xarray: pip install xarray") from None
        if not self._array("probs").metadata.dimension_names:
            raise ValueError(f"{self.path} was written before stores carried dimension names; "
                             "xarray cannot open it (rewrite it with this version of ssld)")
        return xr.open_zarr(self._group.store, group=self._group.path or None,
                            consolidated=False)

    def to_dataframe(self, rows: Any = None, view: int = 0):
        """A pandas DataFrame: key, label, top1, top1_prob, residual, valid (pandas optional)."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("to_dataframe needs pandas: pip install pandas") from None
        rows = slice(None) if rows is None else rows
        part = self.read(rows)
        names = self.class_names
        frame = pd.DataFrame({
            "key": self.keys[part.rows],
            "label": self.labels[part.rows],
            "top1": part.indices[:, view, 0],
            "top1_prob": part.probs[:, view, 0],
            "residual": part.residual[:, view],
            "valid": part.valid,
        }, index=pd.Index(part.rows, name="row"))
        if names:
            frame.insert(3, "top1_name", np.asarray(names, dtype=object)[frame["top1"].to_numpy()])
        return frame


def topk_from_logits(logits: np.ndarray, log_partition: np.ndarray,
                     temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Top-k probabilities (n, k) and residual (n,), float64, from stored top-k logits and
    log-partitions (n,) at the store's ``temperature`` (docs/format.md, "Stored logits"):
    ``exp(logits / T - log_partition)`` without fp16 rounding, and the tail ``1 -`` their sum
    (exact: the log-partition is over all C classes)."""
    top = np.exp(logits.astype(np.float64) / float(temperature)
                 - log_partition.astype(np.float64)[:, None])
    return top, np.clip(1.0 - top.sum(axis=1), 0.0, 1.0)


def densify_logits(indices: np.ndarray, logits: np.ndarray, log_partition: np.ndarray,
                   num_classes: int, temperature: float = 1.0) -> np.ndarray:
    """Dense (n, C) float32 distributions from stored top-k logits (n, k) and log-partitions
    (n,) at the store's ``temperature``: :func:`topk_from_logits`, the tail spread evenly
    over the other C - k classes — the rule of :func:`densify`, which the stored
    probabilities follow. A student is compared with this distribution over the same C
    classes, never with one normalised over the top-k alone."""
    top, residual = topk_from_logits(logits, log_partition, temperature)
    return densify(indices, top, residual, num_classes, dtype=np.float64).astype(np.float32)


def normalize_topk(indices: np.ndarray, probs: np.ndarray, residual: np.ndarray,
                   num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The sparse form of :func:`densify`'s distribution: class ids (n, k) int64, their
    probabilities (n, k) and the residual (n,), float64, renormalised so that the listed
    probabilities plus the residual sum to 1 (undoes fp16 rounding). The residual is what
    the classes not listed share evenly, ``residual / (C - k)`` each; with k = C there is
    none (0). A row with no mass at all becomes uniform.

    A class listed twice in a row (the fill of rows never written: ids 0) counts once, as
    it does in a dense row: the earlier entries become ``-1`` (not a class) with
    probability 0, and the other C - k' classes each keep ``residual / (C - k)``.

    The sum is taken over the k + 1 sparse parts in float64, which for float16 probabilities
    is exact: the same total whatever the order, so a dense row built from this anywhere
    (``densify`` here, ``student_train.SparseTargets.dense`` on a GPU) is the same bits.
    """
    ids = np.array(indices, dtype=np.int64, copy=True)
    top = np.array(probs, dtype=np.float64, copy=True)
    n, k = top.shape
    position = np.arange(k)
    # an entry is dropped when the same class comes again later in its row
    again = ((ids[:, :, None] == ids[:, None, :])
             & (position[None, :, None] < position[None, None, :])).any(axis=2)
    ids[again], top[again] = -1, 0.0
    listed = (ids >= 0).sum(axis=1)
    nominal, rest = num_classes - k, num_classes - listed
    tail = np.clip(np.asarray(residual, dtype=np.float64), 0, None) if nominal > 0 \
        else np.zeros(n)
    if nominal > 0 and (rest != nominal).any():  # residual / (C - k) a class, on more classes
        tail = np.where(rest == nominal, tail, tail / nominal * rest)
    total = top.sum(axis=1) + tail
    empty = total <= 0
    if empty.any():  # an invalid row with no mass: uniform rather than 0/0
        top[empty] = np.where(ids[empty] >= 0, 1.0 / num_classes, 0.0)
        tail[empty], total[empty] = rest[empty] / num_classes, 1.0
    return ids, top / total[:, None], tail / total


def densify(indices: np.ndarray, probs: np.ndarray, residual: np.ndarray,
            num_classes: int, dtype: Any = np.float32) -> np.ndarray:
    """Dense (n, C) distributions from top-k (n, k) + residual (n,): marginal smoothing —
    the residual spread evenly over the other C - k classes — renormalised to sum 1
    (:func:`normalize_topk`), in ``dtype``."""
    ids, top, tail = normalize_topk(indices, probs, residual, num_classes)
    rest = num_classes - (ids >= 0).sum(axis=1)
    fill = np.where(rest > 0, tail / np.maximum(rest, 1), 0.0)
    # ids -1 (a class listed twice) write into one extra column, then dropped
    dense = np.repeat(fill.astype(dtype)[:, None], num_classes + 1, axis=1)
    np.put_along_axis(dense, np.where(ids < 0, num_classes, ids), top.astype(dtype), axis=1)
    return np.ascontiguousarray(dense[:, :num_classes])
