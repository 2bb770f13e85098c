"""Summaries of a store: the cheap ``info`` table and the scanning ``inspect`` report."""
from __future__ import annotations

import hashlib
import html
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from . import _format as fmt
from ._paths import disk_bytes as _disk_bytes, human_size as _human

# The arrays whose stored values ``label_sha256`` fingerprints: everything a student reads.
FINGERPRINTED = ("labels",) + fmt.LABEL_ARRAYS


def _teacher_ranges(store) -> list[dict[str, Any]] | None:
    """Each row range's teacher (``LabelStore.row_teachers``) of a store whose rows come from
    several teachers, as ``{"rows": [lo, hi], "model": name, "checkpoint": path or None}``;
    None for a store of one teacher."""
    ranges = store.row_teachers()
    if len(ranges) < 2:
        return None
    out = []
    for lo, hi, entry in ranges:
        teacher = entry.get("teacher") or {}
        if not isinstance(teacher, dict):
            teacher = {"model": teacher}
        out.append({"rows": [lo, hi], "model": teacher.get("model"),
                    "checkpoint": teacher.get("checkpoint")})
    return out


def _teacher_text(teacher: str | None, teachers: list[dict[str, Any]] | None) -> str:
    """One teacher's name, or every row range's: ``a (rows 0:1,000), b, w.pth (rows …)``."""
    if not teachers:
        return teacher or "-"
    return ", ".join(f"{t['model'] or '-'}"
                     + (f", {os.path.basename(t['checkpoint'])}" if t["checkpoint"] else "")
                     + f" (rows {t['rows'][0]:,}:{t['rows'][1]:,})" for t in teachers)


def _table(rows: list[tuple[str, Any]]) -> str:
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}} : {value}" for name, value in rows)


@dataclass(frozen=True)
class StoreInfo:
    """Attribute-level facts about a store; nothing here scans the label arrays."""

    path: str
    rows: int
    views: int
    topk: int
    classes: int
    chunk_rows: int
    teacher: str | None
    temperature: float
    embeddings: int | None
    complete: bool
    created: str | None
    teachers: list[dict[str, Any]] | None = None   # per row range, when several (row_teachers)

    @classmethod
    def from_store(cls, store) -> "StoreInfo":
        attrs = store.attrs
        return cls(path=store.path, rows=len(store), views=store.num_views, topk=store.topk,
                   classes=store.num_classes, chunk_rows=store.chunk_rows,
                   teacher=store.teacher_name, temperature=float(attrs.get("temperature", 1.0)),
                   embeddings=store.embedding_dim, complete=bool(attrs.get("complete")),
                   created=attrs.get("created"), teachers=_teacher_ranges(store))

    def _rows(self) -> list[tuple[str, Any]]:
        return [("Path", self.path), ("Rows", f"{self.rows:,}"), ("Views", self.views),
                ("Top-k", self.topk), ("Classes", self.classes),
                ("Chunk rows", f"{self.chunk_rows:,}"),
                ("Teachers" if self.teachers else "Teacher",
                 _teacher_text(self.teacher, self.teachers)),
                ("Temperature", self.temperature),
                ("Embeddings", f"dim {self.embeddings}" if self.embeddings else "no"),
                ("Complete", self.complete), ("Created", self.created or "-")]

    def __repr__(self) -> str:
        return _table(self._rows())

    def _repr_html_(self) -> str:
        body = "".join(f"<tr><th style='text-align:left'>{html.escape(str(k))}</th>"
                       f"<td style='text-align:left'>{html.escape(str(v))}</td></tr>"
                       for k, v in self._rows())
        return f"<table>{body}</table>"


@dataclass
class InspectReport:
    """What ``ssld inspect`` prints; :meth:`to_dict` is the ``--json`` form."""

    path: str
    rows: int
    views: int
    topk: int
    classes: int
    teacher: str | None
    complete: bool
    missing: list[tuple[int, int]]
    bytes_on_disk: int | None
    bytes_per_row_view: float | None
    invalid_rows: int
    mean_top1_prob: float | None
    mean_residual: float | None
    labeled_rows: int
    top1_agreement: float | None
    top1_counts: dict[str, int] = field(default_factory=dict)  # min / median / max / empty
    has_embeddings: bool = False
    view: int = 0                          # the view the statistics are of
    # sha256 of each label array's stored bytes (row order, C order; None while incomplete)
    # and the key list's fingerprint: equal digests = a student reads the same labels
    # (augmentation records, stored logits and the partner table included where present)
    label_sha256: dict[str, str] | None = None
    # augmentation records (docs/format.md): the settings, one line; bytes per row-view on
    # disk of each record array; partner-table entries; stored logits
    augmentation: str | None = None
    record_bytes_per_view: dict[str, float] = field(default_factory=dict)
    partners: int = 0
    logits: bool = False
    # stores of shard data (a ``tar`` array): rows whose image lies in a tar shard (the
    # others are image files); None for a store of image files
    rows_in_shards: int | None = None
    # a store whose rows come from several teachers: each row range's (``teacher`` is the
    # first's); None for a store of one teacher
    teachers: list[dict[str, Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["missing"] = [list(r) for r in self.missing]
        return out

    def __str__(self) -> str:
        pct = lambda x: "-" if x is None else f"{100 * x:.2f}%"  # noqa: E731
        num = lambda x: "-" if x is None else f"{x:.4f}"  # noqa: E731
        missing = ("none" if not self.missing else
                   ", ".join(f"{a}:{b}" for a, b in self.missing[:5])
                   + (f" (+{len(self.missing) - 5} more)" if len(self.missing) > 5 else ""))
        counts = self.top1_counts
        rows = [
            ("Store", self.path), ("Rows", f"{self.rows:,}"), ("Views", self.views),
            ("Top-k", self.topk), ("Classes", self.classes),
            ("Teachers" if self.teachers else "Teacher",
             _teacher_text(self.teacher, self.teachers)),
            ("Complete", self.complete), ("Missing rows", missing),
            ("Size on disk", _human(self.bytes_on_disk)),
            ("Bytes per row-view", "-" if self.bytes_per_row_view is None
             else f"{self.bytes_per_row_view:.1f}"),
            ("Embeddings", "yes" if self.has_embeddings else "no"),
            ("Stored logits", "yes" if self.logits else "no"),
            ("Images", "files" if self.rows_in_shards is None else
             f"{self.rows_in_shards:,} rows in tar shards, "
             f"{self.rows - self.rows_in_shards:,} files"),
            ("Augmentation", self.augmentation or "none (crop-only views)"),
        ]
        if self.augmentation:
            records = self.record_bytes_per_view
            rows.append(("Records per row-view", "-" if not records else
                         f"{sum(records.values()):.1f} B: " + ", ".join(
                             f"{name} {value:.2f}" for name, value in records.items())))
            rows.append(("Partner table", f"{self.partners:,} entries"))
        rows += [
            ("Invalid rows", f"{self.invalid_rows:,}"),
            ("Statistics of view", f"{self.view} ("
             + ("the evaluation view" if self.view == 0 else "a random crop view")
             + f" of views 0-{self.views - 1}); --view picks another"),
            ("Mean top-1 prob", num(self.mean_top1_prob)),
            ("Mean residual", num(self.mean_residual)),
            ("Labeled rows", f"{self.labeled_rows:,}"),
            ("Top-1 = label", pct(self.top1_agreement)),
            ("Top-1 per class", "-" if not counts else
             f"min {counts['min']} / median {counts['median']} / max {counts['max']}"
             f" ({counts['empty']} classes never top-1)"),
        ]
        return _table(rows)


class _LabelDigests:
    """sha256 of each label array's stored bytes, fed block of rows by block of rows: rows
    are the first axis, so the digest is the whole array's whatever the block size. Stored
    dtypes, not ``read()``'s conversions; a loaded store is hashed from RAM. The arrays a
    student reads beyond the labels (augmentation records, stored logits) and the partner
    table of a derived store are digested too where the store has them: a store rewritten
    with other records is not the same training data."""

    def __init__(self, store) -> None:
        self.digests = {name: hashlib.sha256()
                        for name in (*FINGERPRINTED, *store.student_arrays)}

    def update(self, store, start: int, stop: int) -> None:
        loaded = store._ram or {}
        for name, digest in self.digests.items():
            values = (loaded[name][start:stop] if name in loaded
                      else store._get(name, slice(start, stop)))
            digest.update(np.ascontiguousarray(values).data)

    def result(self, store) -> dict[str, str]:
        found = {name: d.hexdigest() for name, d in self.digests.items()}
        table = store.partner_table()
        if table is not None:
            digest = hashlib.sha256()
            for name in sorted(table):
                value = table[name]
                digest.update("\n".join(map(str, value)).encode("utf-8") if value.dtype == object
                              else np.ascontiguousarray(value).data)
            found[fmt.PARTNER_GROUP] = digest.hexdigest()
        return found | {"keys": (store.attrs.get("dataset") or {}).get("fingerprint")}


def label_sha256(store) -> dict[str, str] | None:
    """What ``inspect --json`` reports as ``label_sha256``: the sha256 of each label array's
    stored bytes (labels, indices, probs, residual, boxes, flips, valid) and the key list's
    fingerprint, or None while the store is unfinished. Equal digests: a student reads the
    same labels (``train-student --resume`` compares them)."""
    if store.missing():
        return None
    digests = _LabelDigests(store)
    for start in range(0, len(store), store.chunk_rows):
        digests.update(store, start, min(start + store.chunk_rows, len(store)))
    return digests.result(store)


def inspect_store(store, view: int = 0) -> InspectReport:
    """Scan a store chunk by chunk (memory: one chunk) and summarise it."""
    if not 0 <= view < store.num_views:
        raise ValueError(f"--view: store has {store.num_views} view(s), got {view}")
    n, C = len(store), store.num_classes
    missing = store.missing()
    done_rows = np.ones(n, dtype=bool)
    for a, b in missing:
        done_rows[a:b] = False
    labels = store.labels
    counts = np.zeros(C, dtype=np.int64)
    invalid = 0
    sum_top1 = sum_residual = 0.0
    scored = agree = labeled = 0
    step = store.chunk_rows
    digests = _LabelDigests(store) if not missing else None
    in_shards = 0 if store.tar_fields else None
    for start in range(0, n, step):
        stop = min(start + step, n)
        if not done_rows[start]:
            continue
        if digests is not None:
            digests.update(store, start, stop)
        if in_shards is not None:
            in_shards += int((store.read_tar(slice(start, stop))[:, 0] != -1).sum())
        part = store.read(slice(start, stop))
        ok = part.valid
        invalid += int((~ok).sum())
        top1 = part.indices[ok, view, 0]
        counts += np.bincount(top1, minlength=C)
        sum_top1 += float(part.probs[ok, view, 0].sum(dtype=np.float64))
        sum_residual += float(part.residual[ok, view].sum(dtype=np.float64))
        scored += int(ok.sum())
        lab = labels[start:stop][ok]
        known = lab >= 0
        labeled += int(known.sum())
        agree += int((top1[known] == lab[known]).sum())
    disk = _disk_bytes(store.path)
    records = [name for name in store.student_arrays if name not in ("logits", "log_partition")]
    report = InspectReport(
        path=store.path, rows=n, views=store.num_views, topk=store.topk, classes=C,
        teacher=store.teacher_name, complete=not missing, missing=missing, bytes_on_disk=disk,
        bytes_per_row_view=None if disk is None else disk / max(1, n * store.num_views),
        invalid_rows=invalid,
        mean_top1_prob=sum_top1 / scored if scored else None,
        mean_residual=sum_residual / scored if scored else None,
        labeled_rows=labeled, top1_agreement=agree / labeled if labeled else None,
        # counts stay integers: the median is the lower one (a class's actual count)
        top1_counts={"min": int(counts.min()), "median": int(np.sort(counts)[(C - 1) // 2]),
                     "max": int(counts.max()), "empty": int((counts == 0).sum())}
        if scored else {},
        has_embeddings=store.has_embeddings, view=view,
        label_sha256=None if digests is None else digests.result(store),
        augmentation=_augmentation(store.attrs.get("augment")) if records else None,
        record_bytes_per_view=_bytes_per_view(store, records), partners=store.partner_count,
        logits=store.has_logits, rows_in_shards=in_shards, teachers=_teacher_ranges(store))
    return report


def _augmentation(settings: dict | None) -> str:
    """The store's augmentation settings in one line, as infer-teacher's options."""
    settings = settings or {}
    parts = []
    for name, option in (("augment", "--augment"), ("erase", "--erase"),
                         ("erase_count", "--erase-count"), ("mixup", "--mixup"),
                         ("cutmix", "--cutmix"), ("mix_prob", "--mix-prob"),
                         ("switch_prob", "--mixup-switch-prob")):
        value = settings.get(name)
        if value is None or (name == "erase" and not value):
            continue
        if name in ("erase_count",) and not settings.get("erase"):
            continue
        if name in ("mix_prob", "switch_prob") and not (settings.get("mixup")
                                                        or settings.get("cutmix")):
            continue
        parts.append(f"{option} {value}")
    table = settings.get("ops_table") or {}
    parts.append(f"ops table v{table.get('version')}, fill {settings.get('fill')}")
    return " ".join(parts[:-1]) + f" ({parts[-1]})"


def _bytes_per_view(store, names: list[str]) -> dict[str, float]:
    """Bytes on disk per row-view of each named array (a local store; empty otherwise)."""
    import os

    from ._paths import local_path

    local = local_path(store.path)
    if local is None or not names:
        return {}
    views = max(1, len(store) * store.num_views)
    return {name: (_disk_bytes(os.path.join(local, name)) or 0) / views for name in names}
