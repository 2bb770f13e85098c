"""Shared pieces of the commands that build a store from other stores (select-topk, merge).

They agree on three things, kept here so they cannot drift apart:

- which stores may be combined (same classes, k and views: :func:`check_compatible`);
- where the images of the combined store live (:func:`common_root`): one
  ``dataset.root`` for the output, with each source's keys prefixed by the path of
  its root below that common root, so ``root + key`` still names the image file;
- how rows are copied (:func:`copy_rows`): the stored values go through
  ``LabelStoreWriter.write_stored`` unchanged (uint16 boxes, float16 probs and embeddings
  are written back as they are), so a copied row is bit-identical to its source.
"""
from __future__ import annotations

import functools
import os
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from . import _format as fmt
from . import _partners
from ._paths import check_disjoint, check_replaceable, exists, real_path, unfinished_creation
from ._progress import progress_bar
from ._reader import LabelStore, open as open_store
from ._writer import create

# Rows read per zarr call when streaming: several chunks at once lets zarr decode
# them concurrently, while memory stays a few MB per million-class-free row block.
READ_ROWS = 1 << 16
COPY_BLOCKS = 4     # read blocks per block of a copy without embeddings (~25 MB at k = 10)


def open_complete(stores: Sequence[Any]) -> list[LabelStore]:
    """Open paths (or pass through readers) and refuse incomplete stores."""
    if isinstance(stores, (str, os.PathLike, LabelStore)):
        stores = [stores]
    if not stores:
        raise ValueError("no input store given")
    opened = [s if isinstance(s, LabelStore) else open_store(s) for s in stores]
    paths = [real_path(s.path) for s in opened]  # an alias through a symlink is the same store
    for i, path in enumerate(paths):
        if path in paths[:i]:
            raise ValueError(f"store {opened[i].path} is given twice")
    for store in opened:
        store.require_complete()
    return opened


def check_compatible(stores: Sequence[LabelStore], *, topk: bool = True,
                     views: bool = True) -> None:
    """Raise ValueError naming the first difference in classes, k (unless ``topk`` is
    false), views (unless ``views`` is false) or class names."""
    first = stores[0]
    for other in stores[1:]:
        for what, a, b in (("num_classes", first.num_classes, other.num_classes),
                           ("topk", first.topk if topk else 0, other.topk if topk else 0),
                           ("views", first.num_views if views else 0,
                            other.num_views if views else 0)):
            if a != b:
                raise ValueError(f"{what} differs: {first.path} has {a}, {other.path} has {b}")
        names_a, names_b = first.class_names, other.class_names
        if names_a and names_b and list(names_a) != list(names_b):
            where = next(i for i, (x, y) in enumerate(zip(names_a, names_b)) if x != y)
            raise ValueError(f"class_names differ: {first.path} has {names_a[where]!r} at class "
                             f"{where}, {other.path} has {names_b[where]!r}")
    check_augmentation(stores)


def _augment_summary(store: LabelStore) -> str:
    settings = store.attrs.get("augment")
    if not settings:
        return "crop only"
    shown = {name: settings.get(name) for name in ("augment", "erase", "mixup", "cutmix",
                                                   "mix_prob") if settings.get(name)}
    return ", ".join(f"{name} {value}" for name, value in shown.items()) or "records"


def check_augmentation(stores: Sequence[LabelStore]) -> None:
    """ValueError unless the stores were augmented alike (docs/format.md, "Augmentation
    records"): the same ``augment`` settings, fill and ops table, and the same record sizes.
    A derived store has one ``augment`` attribute that every row's records are read with."""
    first = stores[0]
    for other in stores[1:]:
        if (first.attrs.get("augment") != other.attrs.get("augment")
                or first.augment_dims != other.augment_dims):
            raise ValueError(f"augmentation differs: {first.path} has "
                             f"{_augment_summary(first)}, {other.path} has "
                             f"{_augment_summary(other)} (their records are read with one "
                             "setting, the same ops table and fill)")


def check_output(out: Any, stores: Sequence[LabelStore], *, overwrite: bool,
                 files: dict[str, Any] | None = None) -> None:
    """Before any work: ``out`` overlaps no input (the stores and the ``files`` given),
    and an existing ``out`` is refused, or, with ``overwrite``, is a label store ssld may
    replace (overwrite would otherwise delete an input or a stranger's data at the end of
    a long run)."""
    inputs: dict[str, Any] = {"one of the input stores": [s.path for s in stores]}
    inputs.update(files or {})
    check_disjoint(out, inputs)
    if exists(out):
        if not overwrite and not unfinished_creation(out):  # that one holds no row
            raise FileExistsError(f"{out} already exists (pass --overwrite to replace it)")
        check_replaceable(out)


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
        other = next(r for r, (scheme, _) in zip(roots, split) if scheme != split[0][0])
        raise ValueError(f"dataset roots use different schemes "
                         f"({', '.join(s or 'local' for s in schemes)}): {roots[0]!r} vs {other!r}")
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


def derived_attrs(first: LabelStore, root: str | None, source: str, entry: dict[str, Any],
                  teachers: dict[str, Any] | None = None) -> dict[str, Any]:
    """Attributes of an output store: the class names, the teacher attributes ``teachers``
    (:func:`teacher_attrs`; default: the first source's), a new dataset block and the
    provenance entry ``entry`` (with time and software)."""
    attrs = first.attrs
    carried = {name: attrs[name] for name in ("class_names", "augment") if name in attrs}
    carried.update(teachers if teachers is not None else fmt.teacher_entry(attrs))
    entry = {**entry, "time": fmt.now_iso(), "software": fmt.software_versions()}
    return {**carried, "dataset": {"root": root, "source": source}, "provenance": [entry]}


def output_teachers(stores: Sequence[LabelStore], per_store: Sequence[np.ndarray]
                    ) -> list[tuple[int, int, dict]]:
    """The teacher of each row range of an output made of ``per_store`` (sorted local rows
    of each source, in output order): each source's ranges (``LabelStore.row_teachers``)
    mapped to where their rows land; neighbours with the same teacher joined."""
    ranges: list[tuple[int, int, dict]] = []
    start = 0
    for store, rows in zip(stores, per_store):
        rows = np.asarray(rows, dtype=np.int64)
        for lo, hi, teacher in store.row_teachers():
            a, b = (start + int(i) for i in np.searchsorted(rows, [lo, hi]))
            if b == a:
                continue
            if ranges and ranges[-1][1] == a and ranges[-1][2] == teacher:
                ranges[-1] = (ranges[-1][0], b, teacher)
            else:
                ranges.append((a, b, teacher))
        start += len(rows)
    return ranges


def teacher_attrs(stores: Sequence[LabelStore], per_store: Sequence[np.ndarray]
                  ) -> dict[str, Any]:
    """The teacher attributes of an output store: its first row's teacher at the top level
    (as every store has them) and, when its rows come from several teachers, ``teachers``:
    each row range's, so that nothing — ``ssld verify`` above all — takes the first
    teacher's word for every row (docs/format.md)."""
    ranges = output_teachers(stores, per_store)
    if not ranges:
        return fmt.teacher_entry(stores[0].attrs)
    attrs = dict(ranges[0][2])
    if len(ranges) > 1:
        attrs["teachers"] = [{"rows": [lo, hi], **teacher} for lo, hi, teacher in ranges]
    return attrs


def block_rows(store: LabelStore) -> int:
    """Rows per streaming read: whole chunks, about READ_ROWS."""
    return max(1, READ_ROWS // store.chunk_rows) * store.chunk_rows


def spans(store: LabelStore, rows: np.ndarray | None = None,
          step: int | None = None) -> list[tuple[int, int, Any]]:
    """Read blocks of whole chunks as (lo, hi, rows in [lo, hi) or None).

    Without ``rows`` the blocks cover the store; with sorted ``rows`` only blocks that
    hold one are listed, each starting at the chunk of its first row. ``step`` overrides
    the block size (then blocks need not be whole chunks).
    """
    step = step or block_rows(store)
    if rows is None:
        return [(lo, min(lo + step, len(store)), None) for lo in range(0, len(store), step)]
    chunk, out, pos = store.chunk_rows, [], 0
    while pos < len(rows):
        lo = int(rows[pos]) // chunk * chunk
        end = int(np.searchsorted(rows, min(lo + step, len(store)), side="left"))
        hi = min(len(store), (int(rows[end - 1]) // chunk + 1) * chunk)
        out.append((lo, hi, rows[pos:end]))
        pos = end
    return out


def read_blocks(store: LabelStore, names: Sequence[str], *, rows: np.ndarray | None = None,
                view: int | None = None, step: int | None = None,
                part: tuple[int, int] | None = None
                ) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
    """Yield (lo, hi, {name: stored values}) block by block, in stored dtypes.

    With sorted unique ``rows`` only those rows are returned (so ``hi - lo`` is not
    their count); with ``view``, per-view arrays are sliced to that view; ``step`` sets
    the block size (default: whole chunks, about READ_ROWS rows); ``part=(i, n)``
    yields only blocks i, i + n, i + 2n, ... (one share of n disjoint ones). The next
    block is read in a background thread while the caller works on this one, so
    zarr's decompression overlaps the caller's numpy work.
    """
    per_view = {spec.name for spec in fmt.SCHEMA if spec.per_view}

    # Same package: the reader's arrays, without dtype changes, damage reported by chunk.
    def read(span: tuple[int, int, Any]) -> tuple[int, int, dict[str, np.ndarray]]:
        lo, hi, subset = span
        out = store._get_many({name: (slice(lo, hi), view) if view is not None
                               and name in per_view else slice(lo, hi) for name in names})
        if subset is not None:
            out = {name: value[subset - lo] for name, value in out.items()}
        return lo, hi, out

    with ThreadPoolExecutor(max_workers=1) as pool:
        ahead = None
        blocks = spans(store, None if rows is None else np.asarray(rows, dtype=np.int64), step)
        for span in blocks if part is None else blocks[part[0]::part[1]]:
            future = pool.submit(read, span)
            if ahead is not None:
                yield ahead.result()
            ahead = future
        if ahead is not None:
            yield ahead.result()


def gather(store: LabelStore, rows: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Stored values of ``rows`` (sorted, unique) for the named arrays."""
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for _, _, data in read_blocks(store, names, rows=rows):
        for name in names:
            parts[name].append(data[name])
    return {name: np.concatenate(values) if values else
            store._get(name, slice(0, 0)) for name, values in parts.items()}


def prefixed(keys: np.ndarray, prefix: str) -> list[str]:
    """Keys as Python strings with ``prefix`` (the store's root below the common root)."""
    return [prefix + key for key in keys.tolist()] if prefix else keys.tolist()


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


@dataclass
class OutputRows:
    """What a derived store is built from: the rows taken from each source, in order."""

    per_store: list[np.ndarray]   # sorted local rows of each source
    keys: list[str]               # output keys (below the common root), in output order
    labels: np.ndarray            # (n,) int32
    dropped: int                  # rows left out because their key repeats an earlier one


def collect_rows(stores: Sequence[LabelStore], per_store: Sequence[np.ndarray],
                 prefixes: Sequence[str]) -> OutputRows:
    """Read the keys and labels of the chosen rows; a row whose output key already
    appeared (in an earlier store, or earlier in the same one) is dropped."""
    keys: list[str] = []
    labels = []
    for store, rows, prefix in zip(stores, per_store, prefixes):
        data = gather(store, rows, ("keys", "labels"))
        keys += prefixed(data["keys"], prefix)
        labels.append(data["labels"])
    keep = first_occurrences(keys) if len(stores) > 1 else np.ones(len(keys), dtype=bool)
    dropped = int((~keep).sum())
    bounds = np.cumsum([0] + [len(rows) for rows in per_store])
    return OutputRows(
        per_store=[np.asarray(rows)[keep[a:b]] for rows, a, b in
                   zip(per_store, bounds[:-1], bounds[1:])],
        keys=[key for key, kept in zip(keys, keep) if kept] if dropped else keys,
        labels=np.concatenate(labels)[keep], dropped=dropped)


def write_store(out: Any, stores: Sequence[LabelStore], rows: OutputRows, attrs: dict, *,
                chunk_rows: int | None, overwrite: bool, progress: bool, desc: str,
                prefixes: Sequence[str] | None = None) -> bool:
    """Create ``out`` and copy the rows into it; returns whether embeddings were copied
    (only when every source has them with the same width). Augmentation records are
    copied with their mixing partners moved to the output's rows, or, for partners that
    are not output rows, to its partner table (:func:`plan_partners`); stored logits when
    every source has them; shard locations (``tar``) when any source has them, -1 for the
    rows of the others (image files)."""
    first = stores[0]
    dim = shared_embedding_dim(stores)
    plan = plan_partners(stores, rows, prefixes or [""] * len(stores)) \
        if (first.augment_dims or {}).get("mix") else None
    # images in shards: their locations, -1 for the rows of stores of image files
    tar_fields = fmt.TAR_FIELDS if any(store.tar_fields for store in stores) else None
    with create(
            out, keys=rows.keys, num_classes=first.num_classes, topk=first.topk,
            views=first.num_views, labels=rows.labels, attrs=attrs,
            chunk_rows=chunk_rows or first.chunk_rows, overwrite=overwrite,
            embedding_dim=dim, augment_dims=first.augment_dims,
            logits=all(store.has_logits for store in stores),
            partners=plan.table if plan is not None and plan.entries else None,
            tar_fields=tar_fields) as writer, \
            progress_bar(progress, len(rows.keys), desc) as bar:
        start = 0
        for number, (store, local) in enumerate(zip(stores, rows.per_store)):
            start = copy_rows(writer, store, local, start, progress=bar,
                              remap=None if plan is None else plan.remaps[number])
    return dim is not None


@dataclass
class PartnerPlan:
    """Where the mixing partners of a derived store's rows go: ``remaps[s]`` turns source
    s's ``mix_partners`` values into the output's, ``table`` is the output's partner table
    (``entries`` long)."""

    remaps: list
    table: dict[str, Any]
    entries: int


def _remap(refs: np.ndarray, codes: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``values`` (mix_partners) with each ref of the sorted ``refs`` replaced by its code."""
    out = np.asarray(values, dtype=np.int32).copy()
    mixed = out != _partners.NOT_MIXED
    out[mixed] = codes[np.searchsorted(refs, out[mixed])]
    return out


def plan_partners(stores: Sequence[LabelStore], rows: OutputRows,
                  prefixes: Sequence[str]) -> PartnerPlan:
    """Map every mixing partner of the rows kept (``rows.per_store``) into the output: a
    partner row that is kept becomes its output row; one that is not (not selected, or
    dropped as a repeated key), and an entry of a source's own partner table, becomes an
    entry of the output's partner table holding its key (with the source's prefix), crop
    and own ops and erasing, so its view replays as it was labeled. Reads the kept rows'
    ``mix_partners`` once (block by block) and the partners' values."""
    names = [name for name in fmt.PARTNER_ARRAYS
             if any(has_array(store, name) for store in stores)]
    table: dict[str, list] = {name: [] for name in names}
    remaps, entries, offset = [], 0, 0
    for store, kept, prefix in zip(stores, rows.per_store, prefixes):
        kept = np.asarray(kept, dtype=np.int64)
        found = [np.unique(data["mix_partners"]) for _, _, data in
                 read_blocks(store, ("mix_partners",), rows=kept)] if len(kept) else []
        refs = np.unique(np.concatenate(found)) if found else np.zeros(0, np.int64)
        refs = refs[refs != _partners.NOT_MIXED].astype(np.int64)
        codes = np.empty(len(refs), dtype=np.int64)
        is_row = refs >= 0
        pos = np.zeros(len(refs), dtype=np.int64)
        inside = np.zeros(len(refs), dtype=bool)
        if len(kept):
            pos = np.minimum(np.searchsorted(kept, refs), len(kept) - 1)
            inside = is_row & (kept[pos] == refs)
        codes[inside] = offset + pos[inside]
        lost = np.flatnonzero(is_row & ~inside)          # rows referenced but not kept
        entries_of = np.flatnonzero(~is_row)             # the source table's entries
        codes[lost] = _partners.table_ref(entries + np.arange(len(lost)))
        codes[entries_of] = _partners.table_ref(entries + len(lost) + np.arange(len(entries_of)))
        entries += len(lost) + len(entries_of)
        own = [name for name in names if has_array(store, name)]
        if len(lost):
            values = with_fills(gather(store, refs[lost], own), names, len(lost))
            for name in names:
                table[name].append(prefixed(values[name], prefix) if name == "keys"
                                   else values[name])
        if len(entries_of):
            picked = _partners.table_index(refs[entries_of])
            source = with_fills({name: value[picked] for name, value
                                 in store.partner_table().items()}, names, len(picked))
            for name in names:
                table[name].append(prefixed(source[name], prefix) if name == "keys"
                                   else source[name])
        remaps.append(functools.partial(_remap, refs, codes))
        offset += len(kept)
    def empty(name: str) -> np.ndarray:
        array = next(store for store in stores if has_array(store, name))._array(name)
        return np.zeros((0,) + array.shape[1:], array.dtype)

    merged = {name: [key for part in table[name] for key in part] if name == "keys" else
              (np.concatenate(table[name]) if table[name] else empty(name)) for name in names}
    return PartnerPlan(remaps=remaps, table=merged, entries=entries)


def has_array(store: LabelStore, name: str) -> bool:
    """Whether ``store`` has the optional row array ``name`` (``SCHEMA``)."""
    return fmt.array_spec(name).present(store._lengths)


def with_fills(values: dict[str, np.ndarray], names: Sequence[str], n: int
               ) -> dict[str, np.ndarray]:
    """``values`` completed with the arrays of ``names`` a source lacks, as ``n`` rows of
    the array's fill value (stored dtype): the ``tar`` rows (-1) of a store of image files
    copied into a store with shard rows. Only ``tar`` may be absent from one source and
    present in the output (the other optional arrays are all or none)."""
    out = dict(values)
    for name in names:
        if name not in out:
            spec = fmt.array_spec(name)
            if name != "tar":
                raise ValueError(f"array {name!r} is missing from a source store")
            out[name] = np.full((n, len(fmt.TAR_FIELDS)), spec.fill, dtype=np.int64)
    return out


def copy_rows(writer, store: LabelStore, rows: np.ndarray, start: int, *,
              progress=None, remap=None) -> int:
    """Copy ``rows`` (sorted, unique) of ``store`` into ``writer`` from row ``start`` on:
    every array the writer stores (``writer.row_arrays``: the schema's label arrays, and
    embeddings, records and logits when the output has them).

    Stored values are passed through unchanged, so the copy is bit-exact, but for
    ``mix_partners``, which ``remap`` (:class:`PartnerPlan`) moves to the output's rows
    and partner table, and ``tar``, -1 for a store without it (:func:`with_fills`). Returns
    the next free output row. ``progress`` is a tqdm bar advanced by rows copied.
    """
    # Each call to the writer costs a done-flag update and up to two partial chunks,
    # whatever its size: label rows (~100 bytes) are copied COPY_BLOCKS read blocks at a
    # time; rows with embeddings (kilobytes) a read block at a time, as before.
    step = block_rows(store) * (1 if "embeddings" in writer.row_arrays else COPY_BLOCKS)
    own = [name for name in writer.row_arrays if has_array(store, name)]
    for _, _, data in read_blocks(store, own, rows=rows, step=step):
        n = len(data["indices"])
        data = with_fills(data, writer.row_arrays, n)
        if remap is not None:
            data["mix_partners"] = remap(data["mix_partners"])
        writer.write_stored(start, data)
        start += n
        if progress is not None:
            progress.update(n)
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
