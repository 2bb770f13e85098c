"""Shared pieces of the commands that build a store from other stores (select-topk, merge).

They agree on three things, kept here so they cannot drift apart:

- which stores may be combined (same classes, k and views: :func:`check_compatible`);
- where the images of the combined store live (:func:`common_root`): one
  ``dataset.root`` for the output, with each source's keys prefixed by the path of
  its root below that common root, so ``root + key`` still names the image file;
- how rows are copied (:func:`copy_rows`): the stored values go through
  ``LabelStoreWriter.write`` unchanged (uint16 boxes, float16 probs and embeddings
  are written back as they are), so a copied row is bit-identical to its source.
"""
from __future__ import annotations

import os
import posixpath
from typing import Any, Iterator, Sequence

import numpy as np

from . import _format as fmt
from ._reader import LabelStore, open as open_store

# Rows read per zarr call when streaming: several chunks at once lets zarr decode
# them concurrently, while memory stays a few MB per million-class-free row block.
READ_ROWS = 1 << 16


def open_complete(stores: Sequence[Any]) -> list[LabelStore]:
    """Open paths (or pass through readers) and refuse incomplete stores."""
    if isinstance(stores, (str, os.PathLike, LabelStore)):
        stores = [stores]
    if not stores:
        raise ValueError("no input store given")
    opened = [s if isinstance(s, LabelStore) else open_store(s) for s in stores]
    paths = [os.path.abspath(s.path) if "://" not in s.path else s.path for s in opened]
    for i, path in enumerate(paths):
        if path in paths[:i]:
            raise ValueError(f"store {opened[i].path} is given twice")
    for store in opened:
        store.require_complete()
    return opened


def check_compatible(stores: Sequence[LabelStore]) -> None:
    """Raise ValueError naming the first difference in classes, k, views or class names."""
    first = stores[0]
    for other in stores[1:]:
        for what, a, b in (("num_classes", first.num_classes, other.num_classes),
                           ("topk", first.topk, other.topk),
                           ("views", first.num_views, other.num_views)):
            if a != b:
                raise ValueError(f"{what} differs: {first.path} has {a}, {other.path} has {b}")
        names_a, names_b = first.class_names, other.class_names
        if names_a and names_b and list(names_a) != list(names_b):
            where = next(i for i, (x, y) in enumerate(zip(names_a, names_b)) if x != y)
            raise ValueError(f"class_names differ: {first.path} has {names_a[where]!r} at class "
                             f"{where}, {other.path} has {names_b[where]!r}")


def check_output(out: Any, stores: Sequence[LabelStore]) -> None:
    """The output must not be one of the inputs (overwrite would delete the source first)."""
    target = os.path.abspath(os.fspath(out)) if "://" not in str(out) else str(out)
    for store in stores:
        source = os.path.abspath(store.path) if "://" not in store.path else store.path
        if source == target:
            raise ValueError(f"--out {out} is one of the input stores")


def _dataset_root(store: LabelStore) -> str | None:
    return (store.attrs.get("dataset") or {}).get("root")


def _split_scheme(root: str) -> tuple[str, str]:
    if "://" in root:
        scheme, rest = root.split("://", 1)
        return scheme + "://", posixpath.normpath("/" + rest)
    return "", posixpath.normpath(os.path.abspath(root))


def common_root(stores: Sequence[LabelStore]) -> tuple[str | None, list[str]]:
    """The output's ``dataset.root`` and, per store, the prefix its keys get below it.

    Stores that share a root keep their keys unchanged. Stores with different roots
    get the deepest common directory as the output root (local roots made absolute),
    and each key is prefixed with its root's path below it: ``/data/a`` + ``x.jpg``
    and ``/data/b`` + ``y.jpg`` become root ``/data`` with keys ``a/x.jpg``, ``b/y.jpg``.
    """
    roots = [_dataset_root(s) for s in stores]
    if all(root == roots[0] for root in roots):
        return roots[0], [""] * len(stores)
    for store, root in zip(stores, roots):
        if root is None:
            other = next(s for s, r in zip(stores, roots) if r is not None)
            raise ValueError(f"cannot combine {store.path} (no dataset.root) with {other.path} "
                             f"(dataset.root {_dataset_root(other)!r}): keys would be ambiguous")
    split = [_split_scheme(str(root)) for root in roots]
    schemes = sorted({scheme for scheme, _ in split})
    if len(schemes) > 1:
        raise ValueError(f"dataset roots use different schemes ({', '.join(s or 'local' for s in schemes)}): "
                         f"{roots[0]!r} vs {next(r for r in roots if _split_scheme(r)[0] != split[0][0])!r}")
    paths = [path for _, path in split]
    base = posixpath.commonpath(paths)
    prefixes = []
    for path in paths:
        rel = posixpath.relpath(path, base)
        prefixes.append("" if rel == "." else rel + "/")
    root = schemes[0] + base.lstrip("/") if schemes[0] else base
    return root, prefixes


def source_entry(store: LabelStore) -> dict[str, Any]:
    """What provenance records about one input store."""
    attrs = store.attrs
    dataset = attrs.get("dataset") or {}
    return {"path": store.path, "rows": len(store), "fingerprint": dataset.get("fingerprint"),
            "root": dataset.get("root"), "teacher": store.teacher_name,
            "provenance": attrs.get("provenance", [])}


def derived_attrs(first: LabelStore, root: str | None, source: str,
                  entry: dict[str, Any]) -> dict[str, Any]:
    """Attributes of an output store: the first source's teacher/preprocessing/class names,
    a new dataset block and the provenance entry ``entry`` (with time and software)."""
    attrs = first.attrs
    carried = {name: attrs[name] for name in ("class_names", "teacher", "preprocessing",
                                               "temperature") if name in attrs}
    entry = {**entry, "time": fmt.now_iso(), "software": fmt.software_versions()}
    return {**carried, "dataset": {"root": root, "source": source}, "provenance": [entry]}


def block_rows(store: LabelStore) -> int:
    """Rows per streaming read: whole chunks, about READ_ROWS."""
    return max(1, READ_ROWS // store.chunk_rows) * store.chunk_rows


def blocks(rows: np.ndarray, store: LabelStore) -> Iterator[tuple[int, int, np.ndarray]]:
    """Split sorted row numbers into (lo, hi, rows in [lo, hi)) read blocks of whole chunks,
    skipping chunks with no selected row."""
    chunk = store.chunk_rows
    per_block = block_rows(store)
    pos = 0
    while pos < len(rows):
        lo = int(rows[pos]) // chunk * chunk
        hi = min(lo + per_block, len(store))
        end = int(np.searchsorted(rows, hi, side="left"))
        last = int(rows[end - 1])
        yield lo, min(hi, (last // chunk + 1) * chunk), rows[pos:end]
        pos = end


def read_stored(store: LabelStore, lo: int, hi: int, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Rows [lo, hi) of the named arrays in their stored dtypes (no conversion)."""
    group = store._group  # same package: the reader's arrays, read without dtype changes
    return {name: np.asarray(group[name][lo:hi]) for name in names}


def gather(store: LabelStore, rows: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Stored values of ``rows`` (sorted, unique) for the named arrays, read block by block."""
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for lo, hi, part in blocks(np.asarray(rows, dtype=np.int64), store):
        data = read_stored(store, lo, hi, names)
        for name in names:
            parts[name].append(data[name][part - lo])
    return {name: np.concatenate(values) if values else
            np.asarray(store._group[name][0:0]) for name, values in parts.items()}


def prefixed(keys: np.ndarray, prefix: str) -> list[str]:
    """Keys as Python strings with ``prefix`` (the store's root below the common root)."""
    return [prefix + key for key in keys.tolist()]


def shared_embedding_dim(stores: Sequence[LabelStore]) -> int | None:
    """D when every store has embeddings of the same width, else None (they are not copied)."""
    dims = {store.embedding_dim for store in stores}
    return dims.pop() if len(dims) == 1 else None


def first_occurrences(keys: Sequence[str]) -> np.ndarray:
    """Mask keeping the first row of every key (later repeats are dropped)."""
    seen: set[str] = set()
    keep = np.ones(len(keys), dtype=bool)
    for i, key in enumerate(keys):
        if key in seen:
            keep[i] = False
        else:
            seen.add(key)
    return keep


def copy_rows(writer, store: LabelStore, rows: np.ndarray, start: int, *,
              embeddings: bool, progress=None) -> int:
    """Copy ``rows`` (sorted, unique) of ``store`` into ``writer`` from row ``start`` on.

    Stored values are passed through unchanged, so the copy is bit-exact. Returns
    the next free output row. ``progress`` is a tqdm bar advanced by rows copied.
    """
    names = fmt.LABEL_ARRAYS + (("embeddings",) if embeddings else ())
    for lo, hi, part in blocks(np.asarray(rows, dtype=np.int64), store):
        data = read_stored(store, lo, hi, names)
        take = part - lo
        data = {name: value[take] for name, value in data.items()}
        writer.write(start, data["indices"], data["probs"], residual=data["residual"],
                     boxes=data["boxes"], flips=data["flips"], valid=data["valid"],
                     embeddings=data.get("embeddings"))
        start += len(part)
        if progress is not None:
            progress.update(len(part))
    return start


def first_in_runs(sorted_groups: np.ndarray, m: int) -> np.ndarray:
    """Mask of the first ``m`` entries of every run of equal values in ``sorted_groups``."""
    n = len(sorted_groups)
    if n == 0:
        return np.zeros(0, dtype=bool)
    run_start = np.ones(n, dtype=bool)
    run_start[1:] = sorted_groups[1:] != sorted_groups[:-1]
    starts = np.flatnonzero(run_start)
    lengths = np.diff(np.append(starts, n))
    rank = np.arange(n) - np.repeat(starts, lengths)
    return rank < m


def progress_bar(enabled: bool, total: int, desc: str, unit: str = "rows"):
    """A tqdm bar on stderr, or a silent stand-in when ``enabled`` is false."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, disable=not enabled,
                leave=False, dynamic_ncols=True)
