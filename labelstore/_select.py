"""``select-topk``: for every class, the K pool rows the teacher scores highest for it.

The pool is streamed once, block by block; memory is O(C·K + one block) and every
step is a vectorised numpy call (no per-class Python loop). A candidate (row, class)
is one int64 key,

    key = class << (15 + row_bits) | (0x7FFF - float16 bits of prob) << row_bits | row

Non-negative float16 values order like their bit patterns, so sorting keys
ascending sorts by class, then stored probability descending, then pool row
ascending — exactly the ranking asked for, ties included. Keys are only built for
candidates that can still make their class's top K: one float16-bits threshold per
class, raised by a histogram of what each class has kept (see ``_ClassTopK``), drops
the rest with one gather and one comparison per block. The survivors are sorted
once at the end, per class the first K kept.
"""
from __future__ import annotations

import hashlib
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from . import _derive
from ._lock import OutputLock
from ._paths import check_disjoint, check_output_file
from ._progress import progress_bar
from ._reader import LabelStore
from ._text import decode_lines

PROB_BITS = 15  # float16 without its sign bit: probabilities are >= 0
BUCKET_SHIFT = 6     # histogram buckets of 64 consecutive float16 values (~3% apart)
NUM_BUCKETS = 0x8000 >> BUCKET_SHIFT
MIN_MERGE = 1 << 18  # smallest buffer worth filtering (test hook: small values force filters)
FLOOR_EVERY = 4      # floors are recomputed after C·NUM_BUCKETS / FLOOR_EVERY new candidates
_WHITESPACE = re.compile(r"\s")


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
    for line in decode_lines(raw, path, "exclude file"):
        text = line.strip()
        if text and not text.startswith("#"):
            keys.add(text.split("\t", 1)[0].strip())
    return keys, hashlib.sha256(raw).hexdigest()


def _for_store(exclude: set[str], root: str | None) -> set[str]:
    """The exclude set as keys of a store with this root: ``root/key`` lines become ``key``."""
    if not root:
        return exclude
    prefix = root.rstrip("/") + "/"
    return {line[len(prefix):] if line.startswith(prefix) else line for line in exclude}


def _excluded(keys: np.ndarray, exclude: set[str]) -> np.ndarray:
    """Rows whose key is in ``exclude``."""
    return np.fromiter(map(exclude.__contains__, keys.tolist()), dtype=bool, count=len(keys))


# -- ranking ----------------------------------------------------------------------

def _highest_bucket(counts: np.ndarray, need: int) -> np.ndarray:
    """Per class (row of ``counts``), the highest bucket with at least ``need`` counted
    candidates at or above it; -1 where there are fewer."""
    at_or_above = np.cumsum(counts[:, ::-1], axis=1, dtype=counts.dtype)[:, ::-1]
    return (at_or_above >= need).sum(axis=1) - 1


def _histogram(classes: np.ndarray, bits: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, NUM_BUCKETS) counts of the candidates given as flat class ids and float16 bits."""
    bins = ((classes.astype(np.int64, copy=False) << (15 - BUCKET_SHIFT))
            | (bits >> BUCKET_SHIFT).astype(np.int64))
    return np.bincount(bins, minlength=num_classes * NUM_BUCKETS).reshape(num_classes, -1)


class _ClassTopK:
    """Per class, a superset of the K best (probability desc, row asc) candidates so far.

    Two lower bounds on what can still be chosen keep the buffer near K per class
    without sorting it on every block:

    - a histogram, per class, of the probabilities of the candidates kept, in buckets
      of ``2**BUCKET_SHIFT`` consecutive float16 values: once K of them lie in bucket b
      or above, nothing in a lower bucket can be chosen;
    - after an exact trim (sort, first K per class), a newcomer must beat the K-th
      strictly: rows arrive in increasing order, so it loses every tie.

    Both fold into one float16-bits threshold per class (with ``min_prob``), so a
    block costs one gather and one comparison before any int64 key is built. The
    buffer is filtered again when it outgrows 4·C·K, and sorted only when filtering
    is not enough (many ties) and once at the end.
    """

    def __init__(self, num_classes: int, k: int, row_bits: int, min_bits: int = 0):
        self.k, self.row_bits, self.min_bits = k, row_bits, min_bits
        self.shift = PROB_BITS + row_bits
        # int32 halves the memory traffic of the floor updates; it holds any count below
        # 2**31 rows, and a pool that large gets int64
        self.counts = np.zeros((num_classes, NUM_BUCKETS),
                               dtype=np.int32 if row_bits < 31 else np.int64)
        self.counted = 0                     # candidates counted since the floors were updated
        self.floor_bucket = np.zeros(num_classes, dtype=np.uint16)
        self.trim_bits = np.zeros(num_classes, dtype=np.uint16)
        self.entry_bits = np.full(num_classes, min_bits, dtype=np.uint16)
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.limit = max(4 * num_classes * k, MIN_MERGE)   # 32 bytes per table slot at most

    def offer(self, classes: np.ndarray, bits: np.ndarray, rows: np.ndarray,
              use: np.ndarray) -> None:
        """Offer (n, k) ``classes``/``bits`` of ``rows`` (n,), skipping rows where not ``use``."""
        keep = bits >= np.take(self.entry_bits, classes)  # take: faster than [] on a table
        skipped = np.flatnonzero(~use)
        if len(skipped):   # few rows: cheaper than and-ing a whole (n, k) mask
            keep[skipped] = False
        flat = np.flatnonzero(keep)
        if not len(flat):
            return
        kept_classes = classes.ravel()[flat].astype(np.int64)
        kept_bits = bits.ravel()[flat]
        self.counts += _histogram(kept_classes, kept_bits, len(self.counts))
        self.counted += len(flat)
        keys = ((kept_classes << self.shift)
                | ((0x7FFF - kept_bits.astype(np.int64)) << self.row_bits)
                | rows[flat // bits.shape[1]])
        if self.counted >= self.counts.size // FLOOR_EVERY:   # amortised O(1) per candidate
            # The floors now count this block too, so a block full of one class (pools
            # stored in folder order) admits about K of it, not the whole block.
            self._update_floors()
            keys = keys[keys < self._key_limits(self.entry_bits)[kept_classes]]
        self.buffer.append(keys)
        self.buffered += len(keys)
        if self.buffered >= self.limit:
            self._filter()

    def _update_floors(self) -> None:
        self.counted = 0
        self.floor_bucket = np.maximum(_highest_bucket(self.counts, self.k), 0).astype(np.uint16)
        self.entry_bits = np.maximum(np.maximum(self.floor_bucket << BUCKET_SHIFT, self.trim_bits),
                                     self.min_bits).astype(np.uint16)

    def _filter(self) -> None:
        keys = self._filtered()
        if len(keys) > 3 * self.limit // 4:  # ties crowd the floor buckets: trim exactly
            keys = self._trim(keys)
        self.buffer, self.buffered = [keys], len(keys)

    def _filtered(self) -> np.ndarray:
        """The buffer without keys below their class's (freshly updated) floor bucket.

        Only the histogram bound applies here: trim_bits judges newcomers, and the K-th
        entry it was taken from is in this buffer, one bit pattern lower.
        """
        self._update_floors()
        limits = self._key_limits(self.floor_bucket.astype(np.int64) << BUCKET_SHIFT)
        # part by part (cache-sized) before one concatenation of what is left
        return np.concatenate([np.empty(0, dtype=np.int64)]
                              + [part[part < limits[part >> self.shift]] for part in self.buffer])

    def _key_limits(self, min_bits: np.ndarray) -> np.ndarray:
        """Per class, the first key of class c whose bits are below ``min_bits[c]``: a key
        of class c has bits >= min_bits[c] iff it is below this limit."""
        classes = np.arange(len(min_bits), dtype=np.int64)
        return (classes << self.shift) + ((0x8000 - min_bits.astype(np.int64)) << self.row_bits)

    def _trim(self, keys: np.ndarray) -> np.ndarray:
        """Sort and keep the first K keys of every class; sets the exact entry bits.

        ``keys`` is sorted in place (callers pass a buffer they own).
        """
        keys.sort()
        classes = keys >> self.shift
        counts = np.bincount(classes, minlength=len(self.trim_bits))
        full = np.flatnonzero(counts >= self.k)
        starts = np.cumsum(counts) - counts
        # keys are unique (the row is in them): a class keeps the keys below its (K+1)-th,
        # or all of them when it has at most K
        first_dropped = np.full(len(counts), np.iinfo(np.int64).max, dtype=np.int64)
        over = full[counts[full] > self.k]
        first_dropped[over] = keys[starts[over] + self.k]
        keys = keys[keys < first_dropped[classes]]
        kept = np.minimum(counts, self.k)
        self.trim_bits[full] = self._bits(keys[np.cumsum(kept)[full] - 1]) + 1
        self.entry_bits = np.maximum(self.entry_bits, self.trim_bits)
        return keys

    def _bits(self, keys: np.ndarray) -> np.ndarray:
        return (0x7FFF - ((keys >> self.row_bits) & 0x7FFF)).astype(np.uint16)

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(classes, rows, float32 probs) of the K best per class, by class then rank."""
        keys = self._trim(self._filtered())
        probs = self._bits(keys).view(np.float16).astype(np.float32)
        return keys >> self.shift, keys & ((1 << self.row_bits) - 1), probs


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
    if (num_classes - 1).bit_length() + PROB_BITS + row_bits > 63:
        raise ValueError(f"pool too large to rank: {total:,} rows × {num_classes:,} classes "
                         "exceed the 63-bit selection key; split the pool")
    min_bits = 0 if min_prob is None else _float16_at_least(min_prob)
    table = _ClassTopK(num_classes, k, row_bits, min_bits)
    counters = _scan(stores, table, exclude=exclude, min_bits=min_bits, view=view,
                     progress=progress)
    classes, rows, probs = table.result()
    return Selection(num_classes, k, classes=classes, rows=rows, probs=probs, **counters)


def _scan(stores: Sequence[LabelStore], table: _ClassTopK, *, exclude: set[str] | None,
          min_bits: int, view: int, progress: bool) -> dict[str, int]:
    """Stream every block of the pool into ``table``; returns the row/candidate counters."""
    scanned = invalid = excluded = candidates = 0
    offset = 0
    with progress_bar(progress, sum(len(s) for s in stores), "select-topk") as bar:
        for store in stores:
            root = (store.attrs.get("dataset") or {}).get("root")
            listed = _for_store(exclude, root) if exclude else None
            names = ("indices", "probs", "valid") + (("keys",) if exclude else ())
            for lo, hi, block in _derive.read_blocks(store, names, view=view):
                bits = block["probs"].view(np.uint16) & 0x7FFF  # raw float16 bits rank exactly
                use = np.asarray(block["valid"], dtype=bool)
                invalid += int((~use).sum())
                if exclude:
                    skip = _excluded(block["keys"], listed) & use
                    excluded += int(skip.sum())
                    use &= ~skip
                candidates += (int((bits[use] >= min_bits).sum()) if min_bits
                               else int(use.sum()) * bits.shape[1])
                table.offer(block["indices"], bits,
                            np.arange(offset + lo, offset + hi, dtype=np.int64), use)
                scanned += hi - lo
                bar.update(hi - lo)
            offset += len(store)
    return dict(rows_scanned=scanned, rows_invalid=invalid, rows_excluded=excluded,
                candidates=candidates)


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
    seconds: dict[str, float] = field(default_factory=dict)   # rank, keys, write

    @property
    def classes_short(self) -> int:
        """Classes with fewer than K candidates (so fewer than K rows selected)."""
        return int((self.selection.counts < self.selection.k).sum())

    def __str__(self) -> str:
        sel = self.selection
        counts, thresholds = sel.counts, sel.thresholds
        scored = thresholds[~np.isnan(thresholds)]
        lines = [
            f"scanned {sel.rows_scanned:,} rows in {len(self.stores)} store(s): "
            f"{sel.rows_invalid:,} invalid, {sel.rows_excluded:,} excluded, "
            f"{sel.candidates:,} (row, class) candidates",
            f"selected {self.rows_written:,} rows ({len(sel.rows):,} class picks, k = {sel.k}) "
            f"-> {self.out}",
            f"classes with fewer than {sel.k} candidates: {self.classes_short:,} of "
            f"{sel.num_classes:,}",
            f"per-class count: {_min_median_max(counts, '.0f')}",
            f"score threshold (lowest selected prob per class): {_min_median_max(scored, '.4g')}",
        ]
        if self.duplicate_keys_dropped:
            lines.append(f"dropped {self.duplicate_keys_dropped:,} rows whose key repeats an "
                         "earlier store's key")
        if self.list_out:
            lines.append(f"list file: {self.list_out}")
        if self.seconds:
            lines.append("time: " + ", ".join(f"{name} {value:.1f} s"
                                              for name, value in self.seconds.items()))
        return "\n".join(lines + self.notes)


def _min_median_max(values: np.ndarray, spec: str) -> str:
    if not len(values):
        return "-"
    return (f"min {values.min():{spec}} / median {np.median(values):{spec}} / "
            f"max {values.max():{spec}}")


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
        labels, embeddings and stored logits when every source has them, augmentation
        records), in pool order. A mixing partner that is not selected goes to the
        output's partner table (docs/format.md): mixed views keep replaying, and rows
        that were not selected are never trained on.
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
    with OutputLock(out, command="select-topk"):  # one writer per output, from the start
        return _select_topk(stores, k, out, exclude=exclude, min_prob=min_prob, view=view,
                            list_out=list_out, chunk_rows=chunk_rows, overwrite=overwrite,
                            progress=progress)


def select_rows(stores: Any, k: int, *, exclude: str | None = None,
                min_prob: float | None = None, view: int = 0,
                progress: bool = False) -> Selection:
    """The rows :func:`select_topk` keeps per class, without writing anything: its ranking
    pass alone, with the same arguments and rules (a preview of the per-class counts and
    thresholds; benchmarks/select_bench.py times it against the read floor). Keys that
    repeat across stores are not dropped here (select_topk drops them when it copies)."""
    opened = _derive.open_complete(stores)
    _derive.check_compatible(opened)
    _check_selection(opened, k, min_prob, view)
    exclude_keys = read_exclude(exclude)[0] if exclude else None
    return rank(opened, int(k), exclude=exclude_keys, min_prob=min_prob, view=int(view),
                progress=progress)


def _check_selection(opened: Sequence[LabelStore], k: Any, min_prob: float | None,
                     view: int) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"--k must be a positive integer, got {k!r}")
    if min_prob is not None and not 0.0 <= float(min_prob) <= 1.0:
        raise ValueError(f"--min-prob must be within [0, 1], got {min_prob}")
    if not 0 <= int(view) < opened[0].num_views:
        raise ValueError(f"--view {view} is out of range for stores with "
                         f"{opened[0].num_views} view(s)")


def _select_topk(stores: Any, k: int, out: Any, *, exclude: str | None, min_prob: float | None,
                 view: int, list_out: str | None, chunk_rows: int | None, overwrite: bool,
                 progress: bool) -> SelectResult:
    opened = _derive.open_complete(stores)
    _derive.check_compatible(opened)
    _derive.check_output(out, opened, overwrite=overwrite, files={"--exclude": exclude})
    if list_out:
        check_disjoint(list_out, {"one of the input stores": [s.path for s in opened],
                                  "--out": out}, option="--list-out")
        check_output_file(list_out, "--list-out")  # before the long pass, not after it
    _check_selection(opened, k, min_prob, view)
    exclude_keys, exclude_sha = read_exclude(exclude) if exclude else (None, None)
    root, prefixes = _derive.common_root(opened)  # fail before the long pass

    clock = time.perf_counter()
    selection = rank(opened, int(k), exclude=exclude_keys, min_prob=min_prob, view=int(view),
                     progress=progress)
    rows = _unique(selection.rows)
    if not len(rows):
        raise ValueError(f"nothing selected: no valid candidate in {selection.rows_scanned:,} "
                         "rows (all invalid, excluded or below --min-prob)")
    offsets = np.cumsum([0] + [len(s) for s in opened])
    seconds = {"ranking": time.perf_counter() - clock}
    clock = time.perf_counter()
    chosen = _derive.collect_rows(opened, [rows[(rows >= a) & (rows < b)] - a for a, b in
                                           zip(offsets[:-1], offsets[1:])], prefixes)
    if chosen.dropped:
        selection = selection.keep_rows(np.concatenate(
            [local + offset for local, offset in zip(chosen.per_store, offsets)]))
    seconds["keys"] = time.perf_counter() - clock
    clock = time.perf_counter()
    entry = {"command": "select-topk",
             "sources": [{**_derive.source_entry(s), "key_prefix": p}
                         for s, p in zip(opened, prefixes)],
             "k": int(k), "min_prob": None if min_prob is None else float(min_prob),
             "view": int(view),
             "exclude": None if exclude is None else {"path": str(exclude), "sha256": exclude_sha,
                                                      "keys": len(exclude_keys)},
             "rows_scanned": selection.rows_scanned, "rows_excluded": selection.rows_excluded,
             "per_class_counts": selection.counts.tolist()}
    copied = _derive.write_store(out, opened, chosen,
                                 _derive.derived_attrs(opened[0], root, "select-topk", entry,
                                                       _derive.teacher_attrs(
                                                           opened, chosen.per_store)),
                                 chunk_rows=chunk_rows, overwrite=overwrite, progress=progress,
                                 desc="copy", prefixes=prefixes)
    if list_out:
        write_list(out, list_out, view=int(view))
    seconds["writing"] = time.perf_counter() - clock
    notes = []
    if not copied and any(s.has_embeddings for s in opened):
        notes.append("embeddings not copied: not every source has them with the same width")
    if any(s.has_logits for s in opened) and not all(s.has_logits for s in opened):
        notes.append("stored logits not copied: not every source has them")
    return SelectResult(out=str(out), selection=selection, stores=[s.path for s in opened],
                        rows_written=len(chosen.keys), duplicate_keys_dropped=chosen.dropped,
                        embeddings_copied=copied, list_out=list_out, notes=notes,
                        seconds=seconds)


def _unique(values: np.ndarray) -> np.ndarray:
    """Sorted unique values (numpy's hash-based ``np.unique`` is slower on millions of ints)."""
    values = np.sort(values)
    return values[np.r_[True, values[1:] != values[:-1]]] if len(values) else values


def write_list(store: Any, path: str, *, view: int = 0) -> int:
    """Write a PaddleClas list file (``key top1-class`` per row) for ``store``; ``path`` a
    local file or an fsspec URL. A key with whitespace in it is followed by a tab instead
    of a space (the list-file rule of ``teacher_infer.data``: such a line would otherwise
    not read back)."""
    import fsspec

    from ._reader import open as open_store

    st = store if isinstance(store, LabelStore) else open_store(store)
    with fsspec.open(str(path), "w", encoding="utf-8") as handle:
        for _, _, block in _derive.read_blocks(st, ("keys", "indices"), view=view):
            handle.writelines(f"{key}{chr(9) if _WHITESPACE.search(key) else ' '}{int(top1)}\n"
                              for key, top1 in zip(block["keys"].tolist(), block["indices"][:, 0]))
    return len(st)
