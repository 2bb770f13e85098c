"""``merge``: concatenate label stores (e.g. the labeled train set + a selected pool)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import _derive
from ._lock import OutputLock


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
    the same width, stored logits when every store has them. Augmentation records are
    kept, each mixing partner moved to its output row, or to the output's partner table
    when its row is not in the output (docs/format.md). Augmentation settings and class
    names come from the first store; the teacher of every row range is recorded
    (``teachers``, when the stores had different ones); provenance records every source
    with its fingerprint.

    Raises
    ------
    ValueError
        When the stores differ in classes, k, views, class names or augmentation
        settings (the message names the difference, e.g. ``topk differs: a.zarr has
        10, b.zarr has 5``), or when one is incomplete.
    """
    with OutputLock(out, command="merge"):  # one writer per output, from the start
        return _merge(stores, out, chunk_rows=chunk_rows, overwrite=overwrite, progress=progress)


def _merge(stores: Any, out: Any, *, chunk_rows: int | None, overwrite: bool,
           progress: bool) -> MergeResult:
    opened = _derive.open_complete(stores)
    if len(opened) < 2:
        raise ValueError(f"merge needs at least two stores, got {len(opened)}")
    _derive.check_compatible(opened)
    _derive.check_output(out, opened, overwrite=overwrite)
    root, prefixes = _derive.common_root(opened)

    chosen = _derive.collect_rows(opened, [np.arange(len(s)) for s in opened], prefixes)
    notes = []
    teachers = _derive.teacher_attrs(opened, chosen.per_store)
    if "teachers" in teachers:
        names = list(dict.fromkeys(str((t.get("teacher") or {}).get("model"))
                                   for t in teachers["teachers"]))
        notes.append(f"note: the rows come from {len(teachers['teachers'])} row ranges of "
                     f"different teachers ({', '.join(names)}); the output records each "
                     "range's teacher (attribute teachers)")
    entry = {"command": "merge",
             "sources": [{**_derive.source_entry(s), "key_prefix": p, "rows_kept": len(rows)}
                         for s, p, rows in zip(opened, prefixes, chosen.per_store)],
             "duplicates_dropped": chosen.dropped}
    copied = _derive.write_store(out, opened, chosen,
                                 _derive.derived_attrs(opened[0], root, "merge", entry,
                                                       teachers),
                                 chunk_rows=chunk_rows, overwrite=overwrite, progress=progress,
                                 desc="merge", prefixes=prefixes)
    if not copied and any(s.has_embeddings for s in opened):
        notes.append("embeddings not copied: not every store has them with the same width")
    if any(s.has_logits for s in opened) and not all(s.has_logits for s in opened):
        notes.append("stored logits not copied: not every store has them")
    return MergeResult(out=str(out), sources=[s.path for s in opened],
                       rows_in=[len(s) for s in opened],
                       rows_kept=[len(r) for r in chosen.per_store], embeddings_copied=copied,
                       notes=notes)
