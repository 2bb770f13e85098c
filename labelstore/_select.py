"""``select-topk``: for every class, the K pool rows the teacher scores highest for it.

The pool is streamed once, block by block, and the running best K per class is
kept as one sorted int64 array of composite keys, so memory is O(C·K + one block)
and every operation is a vectorised numpy call (no per-class Python loop):

    key = class << (15 + row_bits) | (0x7FFF - fp16 bits of prob) << row_bits | row

Non-negative float16 values order like their bit patterns, so sorting keys
ascending sorts by class, then probability descending, then pool row ascending —
exactly the ranking we want, ties included. A candidate enters only if its key is
below its class's current K-th key; survivors are buffered and merged into the
table by one ``np.sort`` when the buffer has grown as large as the table.
"""
from __future__ import annotations

import hashlib
import os
import posixpath
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from . import _derive
from ._reader import LabelStore
from ._writer import create

PROB_BITS = 15  # float16 without its sign bit: probabilities are >= 0
MIN_MERGE = 1 << 18  # smallest buffer worth a merge (a sort of 256k keys takes ~10 ms)


# -- exclude lists ----------------------------------------------------------------

def read_exclude(path: str) -> tuple[set[str], str]:
    """Keys to skip and the file's sha256.

    One key per line; blank lines and lines starting with ``#`` are ignored, and only
    the first tab-separated field counts, so ``ssld dedup`` output (``pool_key<TAB>
    query_key<TAB>cosine<TAB>inliers``) is read directly. Keys may contain spaces.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"exclude file {path} does not exist")
    with open(path, "rb") as handle:
        raw = handle.read()
    keys = set()
    for line in raw.decode("utf-8").splitlines():
        text = line.strip()
        if text and not text.startswith("#"):
            keys.add(text.split("\t", 1)[0].strip())
    return keys, hashlib.sha256(raw).hexdigest()


def _excluded(keys: np.ndarray, exclude: set[str], root: str | None) -> np.ndarray:
    """Rows whose key, or root/key, is in ``exclude``."""
    listed = [key in exclude or (root is not None and posixpath.join(root, key) in exclude)
              for key in keys.tolist()]
    return np.asarray(listed, dtype=bool)


# -- ranking ----------------------------------------------------------------------

class _ClassTopK:
    """Per class, the K smallest composite keys offered so far."""

    def __init__(self, num_classes: int, k: int, shift: int):
        self.k, self.shift = k, shift
        self.best = np.empty(0, dtype=np.int64)        # sorted, at most K keys per class
        # A candidate enters only below its class's limit: the K-th key once the class
        # is full, else the first key of the next class (so any key of the class passes).
        self.limit = (np.arange(num_classes, dtype=np.int64) + 1) << shift
        self.pending: list[np.ndarray] = []
        self.pending_size = 0

    def offer(self, keys: np.ndarray, classes: np.ndarray) -> None:
        keys = keys[keys < self.limit[classes]]
        if len(keys):
            self.pending.append(keys)
            self.pending_size += len(keys)
        # Merging costs a sort of table + buffer: do it once the buffer is as big as
        # the table (amortised O(survivors · log)), but early enough that the limits
        # tighten while the table fills.
        if self.pending_size >= max(len(self.best), MIN_MERGE):
            self.compact()

    def compact(self) -> np.ndarray:
        if self.pending:
            merged = np.sort(np.concatenate([self.best, *self.pending]))
            self.pending, self.pending_size = [], 0
            self.best = merged[_derive.first_in_runs(merged >> self.shift, self.k)]
            counts = np.bincount(self.best >> self.shift, minlength=len(self.limit))
            full = np.flatnonzero(counts >= self.k)
            self.limit[full] = self.best[np.cumsum(counts)[full] - 1]
        return self.best


@dataclass
class Selection:
    """Per class, the chosen pool rows, best first (one entry per class pick)."""

    num_classes: int
    k: int
    classes: np.ndarray     # (M,) int64, ascending
    rows: np.ndarray        # (M,) int64 global pool row (stores in the order given)
    probs: np.ndarray       # (M,) float32 stored probability of that class for that row
    rows_scanned: int = 0
    rows_invalid: int = 0
    rows_excluded: int = 0
    candidates: int = 0

    @property
    def counts(self) -> np.ndarray:
        """(C,) number of rows chosen per class."""
        return np.bincount(self.classes, minlength=self.num_classes)

    @property
    def thresholds(self) -> np.ndarray:
        """(C,) lowest chosen probability per class (NaN where nothing was chosen)."""
        out = np.full(self.num_classes, np.nan, dtype=np.float32)
        counts = self.counts
        has = np.flatnonzero(counts)
        out[has] = self.probs[np.cumsum(counts)[has] - 1]
        return out

    def keep_rows(self, rows: np.ndarray) -> "Selection":
        """The same selection restricted to picks whose row is in ``rows``."""
        keep = np.isin(self.rows, rows)
        return Selection(self.num_classes, self.k, self.classes[keep], self.rows[keep],
                         self.probs[keep], self.rows_scanned, self.rows_invalid,
                         self.rows_excluded, self.candidates)


def _float16_at_least(value: float) -> int:
    """Bit pattern of the smallest non-negative float16 >= ``value`` (exact, no rounding
    of ``value`` to float16): a stored probability passes iff its bits are >= this."""
    ordered = np.arange(0x7C01, dtype=np.uint16).view(np.float16).astype(np.float64)
    return int(np.searchsorted(ordered, float(value), side="left"))


def rank(stores: Sequence[LabelStore], k: int, *, exclude: set[str] | None = None,
         min_prob: float | None = None, view: int = 0, progress: bool = False) -> Selection:
    """Rank one pool (the stores in the order given) and return the K best rows per class.

    Only classes in a row's stored top-k are candidates for that row: a class outside
    it counts as below every stored score. Ties in probability go to the earlier pool
    row. Rows with ``valid=False``, rows whose key is in ``exclude`` and candidates
    with probability below ``min_prob`` are skipped.
    """
    num_classes = stores[0].num_classes
    total = sum(len(s) for s in stores)
    row_bits = max(1, (total - 1).bit_length())
    shift = PROB_BITS + row_bits
    if (num_classes - 1).bit_length() + shift > 63:
        raise ValueError(f"pool too large to rank: {total:,} rows × {num_classes:,} classes "
                         "exceed the 63-bit selection key; split the pool")
    table = _ClassTopK(num_classes, k, shift)
    min_bits = 0 if min_prob is None else _float16_at_least(min_prob)
    roots = [(s.attrs.get("dataset") or {}).get("root") for s in stores]
    scanned = invalid = excluded = candidates = 0
    offset = 0
    with _derive.progress_bar(progress, total, "select-topk") as bar:
        for store, root in zip(stores, roots):
            group = store._group  # raw stored dtypes: float16 bits are the ranking key
            step = _derive.block_rows(store)
            for lo in range(0, len(store), step):
                hi = min(lo + step, len(store))
                classes = np.asarray(group["indices"][lo:hi, view]).astype(np.int64)
                bits = np.asarray(group["probs"][lo:hi, view]).view(np.uint16) & 0x7FFF
                use = np.asarray(group["valid"][lo:hi], dtype=bool)
                invalid += int((~use).sum())
                if exclude:
                    skip = _excluded(np.asarray(group["keys"][lo:hi]), exclude, root) & use
                    excluded += int(skip.sum())
                    use &= ~skip
                mask = np.broadcast_to(use[:, None], classes.shape)
                if min_bits:
                    mask = mask & (bits >= min_bits)
                rows = np.arange(offset + lo, offset + hi, dtype=np.int64)[:, None]
                keys = (classes << shift) | ((0x7FFF - bits.astype(np.int64)) << row_bits) | rows
                keys, classes = keys[mask], classes[mask]
                candidates += len(keys)
                table.offer(keys, classes)
                scanned += hi - lo
                bar.update(hi - lo)
            offset += len(store)
    best = table.compact()
    prob_bits = (0x7FFF - ((best >> row_bits) & 0x7FFF)).astype(np.uint16)
    return Selection(num_classes, k, classes=best >> shift, rows=best & ((1 << row_bits) - 1),
                     probs=prob_bits.view(np.float16).astype(np.float32), rows_scanned=scanned,
                     rows_invalid=invalid, rows_excluded=excluded, candidates=candidates)


# -- the command ------------------------------------------------------------------

@dataclass
class SelectResult:
    """What ``select_topk`` did; ``str()`` is the summary the CLI prints."""

    out: str
    selection: Selection
    stores: list[str]
    rows_written: int
    duplicate_keys_dropped: int = 0
    embeddings_copied: bool = False
    list_out: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def classes_short(self) -> int:
        """Classes with fewer than K candidates (so fewer than K rows selected)."""
        return int((self.selection.counts < self.selection.k).sum())

    def __str__(self) -> str:
        sel = self.selection
        counts, thresholds = sel.counts, sel.thresholds
        scored = thresholds[~np.isnan(thresholds)]
        stat = lambda a, fmt: ("-" if not len(a) else  # noqa: E731
                               f"min {a.min():{fmt}} / median {np.median(a):{fmt}} / max {a.max():{fmt}}")
        lines = [
            f"scanned {sel.rows_scanned:,} rows in {len(self.stores)} store(s): "
            f"{sel.rows_invalid:,} invalid, {sel.rows_excluded:,} excluded, "
            f"{sel.candidates:,} (row, class) candidates",
            f"selected {self.rows_written:,} rows ({len(sel.rows):,} class picks, k = {sel.k}) "
            f"-> {self.out}",
            f"classes with fewer than {sel.k} candidates: {self.classes_short:,} of {sel.num_classes:,}",
            f"per-class count: {stat(counts, '.0f')}",
            f"score threshold (lowest selected prob per class): {stat(scored, '.4g')}",
        ]
        if self.duplicate_keys_dropped:
            lines.append(f"dropped {self.duplicate_keys_dropped:,} rows whose key repeats an "
                         "earlier store's key")
        if self.list_out:
            lines.append(f"list file: {self.list_out}")
        return "\n".join(lines + self.notes)


def select_topk(stores: Any, k: int, out: Any, *, exclude: str | None = None,
                min_prob: float | None = None, view: int = 0, list_out: str | None = None,
                chunk_rows: int | None = None, overwrite: bool = False,
                progress: bool = False) -> SelectResult:
    """Keep, for every class, the ``k`` pool rows with the highest teacher probability.

    Parameters
    ----------
    stores : path, LabelStore or sequence of them
        The pool; several stores form one pool in the order given (same classes,
        k and views required).
    k : int
        Rows kept per class. A row chosen by several classes appears once, so the
        output has at most C·k rows.
    out : path
        The new store: selected rows copied bit-exactly (all views, boxes, flips,
        labels, embeddings when every source has them), in pool order.
    exclude : path, optional
        Keys to skip: one per line, ``#`` comments, first tab-separated field (the
        output of ``ssld dedup`` works as is). A line matches a store key or
        ``dataset.root/key``.
    min_prob : float, optional
        Candidates whose stored probability is below this are dropped.
    view : int
        View whose probabilities rank the rows (0 = the evaluation view).
    list_out : path, optional
        Also write a PaddleClas list: ``key top1-class`` per output row (the top-1
        of ``view``), keys relative to the output's ``dataset.root``.
    chunk_rows : int, optional
        Rows per chunk of the output (default: the first source's).

    Notes
    -----
    Ranking uses the stored float16 probabilities. Only classes in a row's stored
    top-k can be scored: a class outside it counts as below every stored score, so
    the row is never chosen for it. Equal probabilities are broken by pool order
    (earlier store, then lower row, first). Rows with ``valid=False`` are skipped.
    When sources have different ``dataset.root``, the output root is their common
    directory and keys are prefixed with each root's path below it.

    Examples
    --------
    >>> res = labelstore.select_topk("pool.zarr", 5000, "selected.zarr")  # doctest: +SKIP
    >>> print(res)                                                      # doctest: +SKIP
    """
    opened = _derive.open_complete(stores)
    _derive.check_compatible(opened)
    _derive.check_output(out, opened)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if min_prob is not None and not 0.0 <= float(min_prob) <= 1.0:
        raise ValueError(f"min_prob must be within [0, 1], got {min_prob}")
    if not 0 <= int(view) < opened[0].num_views:
        raise ValueError(f"view {view} is out of range for stores with {opened[0].num_views} "
                         "view(s)")
    exclude_keys, exclude_sha = read_exclude(exclude) if exclude else (None, None)
    root, prefixes = _derive.common_root(opened)  # fail before the long pass

    selection = rank(opened, int(k), exclude=exclude_keys, min_prob=min_prob, view=int(view),
                     progress=progress)
    rows = np.unique(selection.rows)
    if not len(rows):
        raise ValueError(f"nothing selected: no valid candidate in {selection.rows_scanned:,} "
                         "rows (all invalid, excluded or below --min-prob)")
    offsets = np.cumsum([0] + [len(s) for s in opened])
    per_store = [rows[(rows >= a) & (rows < b)] - a for a, b in zip(offsets[:-1], offsets[1:])]
    keys: list[str] = []
    labels = []
    for store, local, prefix in zip(opened, per_store, prefixes):
        data = _derive.gather(store, local, ("keys", "labels"))
        keys += _derive.prefixed(data["keys"], prefix)
        labels.append(data["labels"])
    dropped = 0
    if len(opened) > 1:
        keep = _derive.first_occurrences(keys)
        dropped = int((~keep).sum())
        if dropped:
            keys = [key for key, kept in zip(keys, keep) if kept]
            rows = rows[keep]
            per_store = [rows[(rows >= a) & (rows < b)] - a
                         for a, b in zip(offsets[:-1], offsets[1:])]
            selection = selection.keep_rows(rows)
            labels = [np.concatenate(labels)[keep]]

    dim = _derive.shared_embedding_dim(opened)
    entry = {"command": "select-topk",
             "sources": [{**_derive.source_entry(s), "key_prefix": p}
                         for s, p in zip(opened, prefixes)],
             "k": int(k), "min_prob": None if min_prob is None else float(min_prob),
             "view": int(view),
             "exclude": None if exclude is None else {"path": str(exclude), "sha256": exclude_sha,
                                                      "keys": len(exclude_keys)},
             "rows_scanned": selection.rows_scanned, "rows_excluded": selection.rows_excluded,
             "per_class_counts": selection.counts.tolist()}
    writer = create(out, keys=keys, num_classes=opened[0].num_classes, topk=opened[0].topk,
                    views=opened[0].num_views, labels=np.concatenate(labels),
                    attrs=_derive.derived_attrs(opened[0], root, "select-topk", entry),
                    chunk_rows=chunk_rows or opened[0].chunk_rows, overwrite=overwrite,
                    embedding_dim=dim)
    with writer, _derive.progress_bar(progress, len(rows), "copy") as bar:
        start = 0
        for store, local in zip(opened, per_store):
            start = _derive.copy_rows(writer, store, local, start, embeddings=dim is not None,
                                      progress=bar)
    if list_out:
        write_list(out, list_out, view=int(view))
    notes = []
    if dim is None and any(s.has_embeddings for s in opened):
        notes.append("embeddings not copied: not every source has them with the same width")
    return SelectResult(out=str(out), selection=selection, stores=[s.path for s in opened],
                        rows_written=len(rows), duplicate_keys_dropped=dropped,
                        embeddings_copied=dim is not None, list_out=list_out, notes=notes)


def write_list(store: Any, path: str, *, view: int = 0) -> int:
    """Write a PaddleClas list file (``key top1-class`` per row) for ``store``."""
    from ._reader import open as open_store

    st = store if isinstance(store, LabelStore) else open_store(store)
    keys = st.keys
    step = _derive.block_rows(st)
    with open(path, "w", encoding="utf-8") as handle:
        for lo in range(0, len(st), step):
            hi = min(lo + step, len(st))
            top1 = np.asarray(st._group["indices"][lo:hi, view, 0])
            handle.writelines(f"{key} {int(c)}\n" for key, c in zip(keys[lo:hi], top1))
    return len(st)
