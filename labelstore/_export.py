"""Export a label store (or some of its rows) to HDF5 for tools outside Python-zarr."""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import numpy as np

from dataclasses import dataclass

from . import _format as fmt
from ._paths import check_disjoint, check_output_file, exists, human_size, local_path


@dataclass(frozen=True)
class ExportResult:
    """What ``ssld export`` wrote: the rows, and how many of them were not written yet."""

    store: str
    out: str
    rows: int
    views: int
    unwritten: int
    size_bytes: int

    def warning(self) -> str | None:
        if not self.unwritten:
            return None
        return (f"warning: {self.store} is incomplete: {self.unwritten:,} exported rows are not "
                "written yet (valid=False)")

    def summary(self) -> str:
        return (f"exported {self.rows:,} rows × {self.views} view(s) of {self.store} to "
                f"{self.out} ({human_size(self.size_bytes)})")


def export(store, out: str, rows: str | None = None, *, overwrite: bool = False,
           allow_incomplete: bool = False) -> ExportResult:
    """``ssld export``: ``rows`` as the command's ``A:B`` text; see :func:`export_hdf5`."""
    selected = parse_rows(rows)
    n = export_hdf5(store, out, selected, overwrite=overwrite, allow_incomplete=allow_incomplete)
    start, stop, _ = (selected or slice(None)).indices(len(store))
    return ExportResult(store=str(store.path), out=out, rows=n, views=store.num_views,
                        unwritten=unwritten_rows(store, start, stop), size_bytes=_size(out))


def _size(out: str) -> int:
    local = local_path(out)
    if local is not None:
        return os.path.getsize(local)
    import fsspec

    fs, inner = fsspec.core.url_to_fs(out)
    return int(fs.size(inner))


def export_hdf5(store, out: str, rows: slice | None = None, *, overwrite: bool = False,
                allow_incomplete: bool = False) -> int:
    """Write ``store`` rows to ``out`` (HDF5: a local file or an fsspec URL) and return the
    number of rows written.

    Datasets carry the store's names and stored dtypes (``boxes`` as float32
    fractions; one dataset per array of ``_format.SCHEMA`` but ``done``; a partner table,
    whole, as the group ``partners`` with the same rule); group attributes are the store's,
    JSON-encoded where they are not scalars. Written to a temporary name and renamed, so a
    failed export leaves no half-file behind; for a URL the file is written in the temporary
    folder (``$TMPDIR``) first, then uploaded (HDF5 writes seek, which object storage
    cannot). Rows of an unfinished store that are not written yet are refused unless
    ``allow_incomplete`` (they are exported with ``valid=False``).
    """
    import h5py

    check_output_file(out, "--out")  # a folder is never replaced, even with --overwrite
    check_disjoint(out, {"the store": store.path})
    local = local_path(out)
    if exists(out):
        if not overwrite:
            raise FileExistsError(f"{out} already exists (use --overwrite to replace it)")
        if not _is_export(out):
            raise ValueError(f"--out {out} exists and is not an HDF5 file exported by ssld; "
                             "--overwrite only replaces those (remove it yourself or choose "
                             "another --out)")
    rows = slice(None) if rows is None else rows
    start, stop, step = rows.indices(len(store))
    if step != 1 or stop <= start:
        raise ValueError(f"--rows must be a non-empty range A:B inside [0, {len(store)}), "
                         f"got {start}:{stop}")
    missing = unwritten_rows(store, start, stop)
    if missing and not allow_incomplete:
        raise ValueError(f"label store {store.path} is incomplete: {missing:,} of the "
                         f"{stop - start:,} rows to export are not written yet; finish it "
                         "(rerun infer-teacher), or pass --allow-incomplete to export them "
                         "with valid=False")
    n = stop - start
    if local is not None:
        tmp = f"{local}.tmp-{os.getpid()}"
    else:
        handle, tmp = tempfile.mkstemp(prefix="ssld-export-", suffix=".h5")
        os.close(handle)
    try:
        with h5py.File(tmp, "w") as h5:
            for key, value in store.attrs.items():
                h5.attrs[key] = value if isinstance(value, (int, float, str, bool)) \
                    else json.dumps(value)
            h5.attrs["rows"] = json.dumps([start, stop])
            _write_datasets(h5, store, start, stop)
        if local is not None:
            os.replace(tmp, local)
        else:
            import fsspec

            fs, inner = fsspec.core.url_to_fs(out)
            fs.put_file(tmp, inner)   # one object: whole or absent
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return n


def _write_datasets(h5, store, start: int, stop: int) -> None:
    """One dataset per exported array of the schema, rows [start, stop): the arrays
    ``create`` writes whole, the others in the store's chunks (gzip, shuffle)."""
    import h5py

    n, chunk = stop - start, store.chunk_rows
    sets = {}
    for spec in fmt.SCHEMA:
        if spec.export is None or spec.name not in store._group:
            continue
        array = store._array(spec.name)
        if spec.written == "create":
            value = store._get(spec.name, slice(start, stop))
            if spec.dtype == "str":
                h5.create_dataset(spec.name, data=np.asarray(value, dtype=object),
                                  dtype=h5py.string_dtype("utf-8"))
            else:
                h5.create_dataset(spec.name, data=value)
            continue
        tail = tuple(array.shape[1:])
        dtype = _exported(spec, np.zeros((0,) + tail, dtype=array.dtype)).dtype
        sets[spec] = h5.create_dataset(spec.name, shape=(n,) + tail, dtype=dtype,
                                       chunks=(min(n, chunk),) + tail, compression="gzip",
                                       compression_opts=4, shuffle=True)
    for lo in range(start, stop, chunk):
        hi = min(lo + chunk, stop)
        for spec, dset in sets.items():
            dset[lo - start:hi - start] = _exported(spec, store._get(spec.name, slice(lo, hi)))
    table = store.partner_table()
    if table is not None:  # whole: the exported rows' mixing partners may be any entry
        group = h5.create_group(fmt.PARTNER_GROUP)
        for name, value in table.items():
            if name == "keys":
                group.create_dataset(name, data=np.asarray(value, dtype=object),
                                     dtype=h5py.string_dtype("utf-8"))
            else:
                group.create_dataset(name, data=_exported(fmt.array_spec(name), value),
                                     compression="gzip", compression_opts=4, shuffle=True)


def _exported(spec: fmt.ArraySpec, stored: np.ndarray) -> np.ndarray:
    """Stored values as exported: unchanged, or as ``read`` returns them (boxes as fractions)."""
    return spec.read(stored) if spec.export == "read" else stored


def unwritten_rows(store, start: int, stop: int) -> int:
    """How many rows in [start, stop) lie in chunks not marked done."""
    return sum(max(0, min(b, stop) - max(a, start)) for a, b in store.missing())


def _is_export(path: str) -> bool:
    """A regular HDF5 file carrying the store format attribute that exports copy (a local
    file, or an object of object storage)."""
    import h5py

    local = local_path(path)
    try:
        if local is not None:
            if os.path.islink(local) or not os.path.isfile(local):
                return False
            with h5py.File(local, "r") as h5:
                return h5.attrs.get("format") == fmt.FORMAT
        import fsspec

        with fsspec.open(path, "rb") as handle, h5py.File(handle, "r") as h5:
            return h5.attrs.get("format") == fmt.FORMAT
    except (OSError, ValueError):
        return False


def parse_rows(text: str | None) -> slice | None:
    """``"A:B"`` → slice(A, B); either side may be empty."""
    if text is None:
        return None
    parts = text.split(":")
    if len(parts) != 2:
        raise ValueError(f"--rows must look like A:B, got {text!r}")
    try:
        return slice(*(int(p) if p.strip() else None for p in parts))
    except ValueError:
        raise ValueError(f"--rows must look like A:B with integers, got {text!r}") from None
