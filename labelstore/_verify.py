"""``verify``: is a store what its attributes say?

Two levels:

- **structure** (no teacher, reads every chunk once): the store's invariants, checked
  by the same code as every reader's (``labelstore.open``: the attributes agree with
  each other and with the arrays, which are there with the shapes they imply, and every
  done chunk is on storage; the reader, on every chunk it reads: it decodes, its crc32c
  checksum holds, class ids < C, labels in [-1, C), probabilities finite and >= 0,
  embeddings finite); then every chunk is done, the keys hash to the recorded
  fingerprint, and each row obeys the rest of the format: class ids distinct (valid
  rows), probabilities best first, residual = 1 − Σ probs within fp16 rounding, the k-th
  probability at least the mean of the other classes (it is a top-k), boxes of valid
  rows non-empty and inside the image, and as many invalid rows as the run recorded;
- **teacher** (``teacher_infer.verify``, which starts with the structure check here):
  ``sample`` random rows, every view, are
  recomputed with the teacher and preprocessing the store records, on the stored boxes
  and flips, and compared with the stored top-k.

A row-view *agrees* when the recomputed top-1 class is the stored one (or ties with it
within ``atol``) and no stored probability differs from the recomputed one by more than
``atol``; the store passes when at least ``min_agreement`` of the compared row-views
agree. The defaults (``atol`` 0.05, ``min_agreement`` 0.99) are what the two decoders
guarantee against each other (tests/test_teacher_infer.py: DALI vs PIL); recomputing with
the recorded decoder on the same kind of device agrees to fp16 rounding (~5e-4).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import _derive
from . import _format as fmt
from ._reader import DamagedStoreError, LabelStore, open as open_store

ATOL = 0.05              # largest |Δp| of an agreeing row-view
MIN_AGREEMENT = 0.99     # fraction of compared row-views that must agree
# residual vs 1 − Σ probs: k fp16 roundings of probabilities summing to <= 1 stay below 2^-11.
RESIDUAL_TOLERANCE = fmt.PROB_SUM_TOLERANCE
SHOWN = 5                # problems / worst rows listed


@dataclass
class TeacherCheck:
    """The teacher recomputation of ``verify``."""

    rows: int                          # rows compared (all their views)
    row_views: int                     # valid row-views compared
    top1_equal: float                  # fraction of row-views with the same top-1 class
    max_abs_diff: float                # largest |Δp| over the stored top-k
    agreement: float                   # fraction of row-views that agree (see module doc)
    validity_mismatches: int           # rows valid in the store but not now, or the reverse
    worst: list[str] = field(default_factory=list)   # the worst rows, one line each
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


@dataclass
class VerifyResult:
    """What ``verify`` found; ``ok`` is the verdict, ``str()`` the report the CLI prints."""

    path: str
    rows: int
    problems: list[str]                # structure problems, one line each (empty: fine)
    teacher: TeacherCheck | None       # None with structure_only
    atol: float
    min_agreement: float
    structure_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        if self.problems:
            return False
        return self.teacher is None or (self.teacher.agreement >= self.min_agreement
                                        and not self.teacher.validity_mismatches)

    def __str__(self) -> str:
        lines = [f"verify {self.path}: {'OK' if self.ok else 'FAILED'}"]
        rate = self.rows / self.structure_seconds if self.structure_seconds > 0 else 0.0
        if self.problems:
            lines.append(f"structure: {len(self.problems)} problem(s)")
            lines += [f"  {p}" for p in self.problems]
        else:
            lines.append(f"structure: {self.rows:,} rows consistent "
                         f"({self.structure_seconds:.1f} s, {rate:,.0f} rows/s)")
        check = self.teacher
        if check is not None:
            lines.append(
                f"teacher: {check.rows} rows ({check.row_views} row-views) recomputed in "
                f"{check.seconds:.1f} s ({check.rows_per_s:.1f} rows/s): top-1 equal "
                f"{check.top1_equal:.1%}, max |Δp| {check.max_abs_diff:.4f}, agreement "
                f"{check.agreement:.1%} (needs >= {self.min_agreement:.0%} within "
                f"|Δp| <= {self.atol:g})")
            if check.validity_mismatches:
                lines.append(f"  {check.validity_mismatches} row(s) valid in the store but "
                             "not decodable now, or the reverse")
            if check.worst and not self.ok:
                lines.append("  worst rows:")
                lines += [f"    {line}" for line in check.worst]
            lines += [f"  {note}" for note in check.notes]
        return "\n".join(lines)


def verify(store: Any, *, atol: float = ATOL, min_agreement: float = MIN_AGREEMENT
           ) -> VerifyResult:
    """Check the structure of ``store`` (path or reader); returns a :class:`VerifyResult`
    (``.ok``, ``.problems``). A damaged store is a failed verification, not an exception.
    The teacher half is ``teacher_infer.verify`` (teacher_infer/recompute.py: it needs torch
    and timm), which starts with this; ``atol`` / ``min_agreement`` are its tolerances,
    recorded in the result.
    """
    if not 0 <= atol <= 1:
        raise ValueError(f"--atol must be in [0, 1], got {atol}")
    if not 0 <= min_agreement <= 1:
        raise ValueError(f"--min-agreement must be in [0, 1], got {min_agreement}")
    started = time.perf_counter()
    try:
        opened = store if isinstance(store, LabelStore) else open_store(store)
    except DamagedStoreError as exc:
        return VerifyResult(str(store), 0, [str(exc)], None, atol, min_agreement)
    return VerifyResult(opened.path, len(opened), check_rows(opened), None, atol, min_agreement,
                        structure_seconds=time.perf_counter() - started)


class _Problems:
    """Counts per kind of problem, with the first example of each."""

    def __init__(self) -> None:
        self.first: dict[str, str] = {}
        self.count: dict[str, int] = {}

    def add(self, kind: str, mask: np.ndarray, lo: int, describe=None) -> None:
        """Record the True entries of ``mask`` ((n,) rows or (n, V) row-views of a block
        starting at row ``lo``); ``describe(i, view)`` adds detail on the first (local row i)."""
        hits = np.argwhere(mask)
        if not len(hits):
            return
        self.count[kind] = self.count.get(kind, 0) + len(hits)
        if kind not in self.first:
            i, view = int(hits[0][0]), (int(hits[0][1]) if mask.ndim > 1 else None)
            where = f"row {lo + i}" + ("" if view is None else f" view {view}")
            self.first[kind] = where + (f" ({describe(i, view)})" if describe else "")

    def lines(self) -> list[str]:
        return [f"{kind}: {self.count[kind]:,}, first {self.first[kind]}" for kind in self.first]


def check_rows(store: LabelStore) -> list[str]:
    """Structure problems of an opened store, one line each (empty when consistent)."""
    problems: list[str] = []
    missing = store.missing()
    if missing:
        rows = sum(b - a for a, b in missing)
        problems.append(f"not every chunk is done: {rows:,} of {len(store):,} rows missing "
                        f"(first {missing[0][0]}:{missing[0][1]})")
    classes, k = store.num_classes, store.topk
    found = _Problems()
    invalid_rows = 0
    # embeddings too: the reader checks their values as it reads them
    names = fmt.label_arrays() + ("labels",) + (("embeddings",) if store.has_embeddings else ())
    if store.has_logits:
        names += ("logits", "log_partition")
    temperature = float(store.attrs.get("temperature", 1.0))
    try:
        if fmt.fingerprint(store.keys.tolist()) != (store.attrs.get("dataset") or {}).get(
                "fingerprint"):
            problems.append("keys do not hash to dataset.fingerprint")
        for lo, hi, data in _derive.read_blocks(store, names):
            invalid_rows += _check_block(found, lo, data, classes, k)
            if store.has_logits:
                _check_logits(found, lo, data, temperature)
    except DamagedStoreError as exc:
        return problems + [f"damaged: {exc}"]
    problems += found.lines()
    recorded = store.attrs.get("failures")
    if recorded is not None and not missing and int(recorded) != invalid_rows:
        problems.append(f"{invalid_rows:,} invalid rows, but the run recorded "
                        f"{int(recorded):,} failures")
    return problems[:SHOWN * 4]


def _check_logits(found: _Problems, lo: int, data: dict[str, np.ndarray],
                  temperature: float) -> None:
    """Stored logits: ``exp(logits / T - log_partition)`` are the stored probabilities (valid
    row-views, within their fp16 rounding: relative 2^-11, and the same absolute tolerance as
    the residual)."""
    probs = data["probs"].astype(np.float64)
    implied = np.exp(data["logits"].astype(np.float64) / temperature
                     - data["log_partition"].astype(np.float64)[..., None])
    off = (np.abs(implied - probs) > 2.0 ** -10 * probs + RESIDUAL_TOLERANCE).any(-1)
    off |= ~np.isfinite(implied).all(-1)
    found.add("stored logits do not give the stored probabilities", off
              & data["valid"].astype(bool)[:, None], lo,
              lambda i, v: f"{np.round(implied[i, v], 4).tolist()} vs "
                           f"{np.round(probs[i, v], 4).tolist()}")


def _check_block(found: _Problems, lo: int, data: dict[str, np.ndarray], classes: int,
                 k: int) -> int:
    """Add the problems of one block of stored rows; returns its number of invalid rows."""
    valid = data["valid"].astype(bool)
    indices = data["indices"].astype(np.int64)
    probs = data["probs"].astype(np.float64)
    residual = data["residual"].astype(np.float64)
    boxes = data["boxes"].astype(np.int64)
    on_valid = valid[:, None]

    # ids < C, probabilities finite and >= 0 and labels in [-1, C) are the reader's checks
    # (`_format.value_problem`): a block that breaks one never gets here.
    if k > 1:
        ordered = np.sort(indices, axis=-1)
        found.add("repeated class id in a top-k",
                  (ordered[..., 1:] == ordered[..., :-1]).any(-1) & on_valid, lo)
        found.add("probabilities not best first", (np.diff(probs, axis=-1) > 0).any(-1)
                  & on_valid, lo)
    rest = 1.0 - probs.sum(-1)
    off = np.abs(residual - rest) > RESIDUAL_TOLERANCE
    off |= ~np.isfinite(residual) | (residual < 0) | (residual > 1 + RESIDUAL_TOLERANCE)
    found.add(f"residual != 1 - sum(probs) (tolerance {RESIDUAL_TOLERANCE:g})", off, lo,
              lambda i, v: f"residual {residual[i, v]:.4g}, 1 - sum {rest[i, v]:.4g}")
    if k < classes:
        # Every other class has at most the k-th probability, so their mean does too.
        floor = residual / (classes - k) - RESIDUAL_TOLERANCE
        found.add("k-th probability below the mean of the other classes (not a top-k)",
                  (probs[..., -1] < floor) & on_valid, lo)
    y0, x0, h, w = (boxes[..., i] for i in range(4))
    outside = (h <= 0) | (w <= 0) | (y0 + h > fmt.BOX_SCALE) | (x0 + w > fmt.BOX_SCALE)
    found.add("box empty or outside the image", outside & on_valid, lo,
              lambda i, v: "y0, x0, h, w = " + ", ".join(
                  f"{x:.4f}" for x in boxes[i, v] / fmt.BOX_SCALE))
    return int((~valid).sum())
