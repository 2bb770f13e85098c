"""``merge``: concatenate label stores (e.g. the labeled train set + a selected pool)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import _derive
from ._writer import create


@dataclass
class MergeResult:
    """What ``merge`` did; ``str()`` is the summary the CLI prints."""

    out: str
    sources: list[str]
    rows_in: list[int]
    rows_kept: list[int]
    embeddings_copied: bool
    notes: list[str] = field(default_factory=list)

    @property
    def rows_written(self) -> int:
        return sum(self.rows_kept)

    @property
    def duplicates_dropped(self) -> int:
        return sum(self.rows_in) - sum(self.rows_kept)

    def __str__(self) -> str:
        lines = [f"merged {len(self.sources)} stores -> {self.out}: {self.rows_written:,} rows"]
        for path, n_in, kept in zip(self.sources, self.rows_in, self.rows_kept):
            dropped = f" ({n_in - kept:,} dropped: key already present)" if kept < n_in else ""
            lines.append(f"  {path}: {kept:,} of {n_in:,} rows{dropped}")
        lines.append(f"duplicate keys dropped: {self.duplicates_dropped:,}")
        return "\n".join(lines + self.notes)


def merge(stores: Any, out: Any, *, chunk_rows: int | None = None, overwrite: bool = False,
          progress: bool = False) -> MergeResult:
    """Concatenate stores with the same classes, k and views into a new store.

    Rows are copied bit-exactly in the order given; a row whose key (below the
    common dataset root) is already present in an earlier row is dropped. Labels,
    views, boxes and flips are kept; embeddings only when every store has them with
    the same width. Teacher, preprocessing and class names come from the first
    store; provenance records every source with its fingerprint.

    Raises
    ------
    ValueError
        When the stores differ in classes, k, views or class names (the message
        names the difference, e.g. ``topk differs: a.zarr has 10, b.zarr has 5``),
        or when one is incomplete.
    """
    opened = _derive.open_complete(stores)
    if len(opened) < 2:
        raise ValueError(f"merge needs at least two stores, got {len(opened)}")
    _derive.check_compatible(opened)
    _derive.check_output(out, opened)
    root, prefixes = _derive.common_root(opened)

    keys: list[str] = []
    for store, prefix in zip(opened, prefixes):
        keys += _derive.prefixed(store.keys, prefix)
    keep = _derive.first_occurrences(keys)
    bounds = np.cumsum([0] + [len(s) for s in opened])
    kept_rows = [np.flatnonzero(keep[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    labels = np.concatenate([s.labels for s in opened])[keep]
    keys = [key for key, kept in zip(keys, keep) if kept]

    notes = []
    teachers = sorted({str(s.teacher_name) for s in opened})
    if len(teachers) > 1:
        notes.append(f"note: the stores were labeled by different teachers ({', '.join(teachers)}); "
                     "the output records the first store's")
    dim = _derive.shared_embedding_dim(opened)
    if dim is None and any(s.has_embeddings for s in opened):
        notes.append("embeddings not copied: not every store has them with the same width")
    entry = {"command": "merge",
             "sources": [{**_derive.source_entry(s), "key_prefix": p,
                          "rows_kept": len(rows)}
                         for s, p, rows in zip(opened, prefixes, kept_rows)],
             "duplicates_dropped": int((~keep).sum())}
    first = opened[0]
    writer = create(out, keys=keys, num_classes=first.num_classes, topk=first.topk,
                    views=first.num_views, labels=labels,
                    attrs=_derive.derived_attrs(first, root, "merge", entry),
                    chunk_rows=chunk_rows or first.chunk_rows, overwrite=overwrite,
                    embedding_dim=dim)
    with writer, _derive.progress_bar(progress, len(keys), "merge") as bar:
        start = 0
        for store, rows in zip(opened, kept_rows):
            start = _derive.copy_rows(writer, store, rows, start, embeddings=dim is not None,
                                      progress=bar)
    return MergeResult(out=str(out), sources=[s.path for s in opened],
                       rows_in=[len(s) for s in opened], rows_kept=[len(r) for r in kept_rows],
                       embeddings_copied=dim is not None, notes=notes)
