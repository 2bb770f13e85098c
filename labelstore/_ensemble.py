"""``ensemble``: one store whose rows are a weighted combination of several teachers' rows.

The members must label the same crops: the same keys in the same order and, row by row
and view by view, the same box and flip (``infer-teacher --views-from`` makes such
stores). Each output row-view is the weighted mean — or the normalised weighted
geometric mean — of the members' dense distributions (marginal smoothing, as
``LabelStore.dense``), cut to its top-k plus the residual like a teacher's row. A row
invalid in any member is invalid.

The work streams chunk by chunk and never builds a dense row: outside the union of the
members' top-k every class has the same combined value (:func:`combine_top_k`), so memory
is O(chunk × Σ k) whatever C. Whole chunks are written through the writer, so an
interrupted ensemble is resumed by rerunning the same command: only chunks not done are
computed. The settings (members, weights, rule, k) are kept in the store and a rerun
with other settings is refused.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from . import _derive
from . import _format as fmt
from ._lock import OutputLock
from ._paths import check_disjoint, check_replaceable, exists, real_path, unfinished_creation
from ._progress import progress_bar
from ._reader import LabelStore, normalize_topk, open as open_store
from ._writer import create

RULES = ("mean", "geomean")
# Rows combined at once: temporaries are (rows × sum k_i × k_i), a few MiB.
BLOCK_ROWS = 4096
# Floor of a probability under the logarithm (geomean): a class that a member gives
# exactly 0 (k = C with a zero entry) keeps a tiny share instead of -inf.
LOG_FLOOR = 1e-30


@dataclass
class EnsembleResult:
    """What ``ensemble`` did; ``str()`` is the summary the CLI prints."""

    out: str
    members: list[str]
    weights: list[float]
    rule: str
    topk: int
    rows: int
    rows_computed: int
    rows_skipped: int              # already done (resume)
    invalid: int                   # invalid rows in the output
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def rows_per_s(self) -> float:
        return self.rows_computed / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        weights = ", ".join(f"{w:g}" for w in self.weights)
        resumed = f" ({self.rows_skipped:,} already done)" if self.rows_skipped else ""
        lines = [f"ensemble ({self.rule}, weights {weights}, k={self.topk}) of "
                 f"{len(self.members)} stores -> {self.out}: {self.rows_computed:,} rows "
                 f"computed{resumed} in {self.seconds:.1f} s ({self.rows_per_s:,.0f} rows/s), "
                 f"{self.invalid:,} invalid"]
        lines += [f"  {path}" for path in self.members]
        return "\n".join(lines + self.notes)


def ensemble(stores: Sequence[Any], out: Any, *, weights: Sequence[float] | None = None,
             topk: int | None = None, rule: str = "mean", overwrite: bool = False,
             progress: bool = False) -> EnsembleResult:
    """Combine stores that label the same crops into ``out``.

    Parameters
    ----------
    stores : paths or LabelStore readers (two or more, complete)
    out : the store to write; when it exists (and ``overwrite`` is false) it must be an
        ensemble of the same members with the same settings, and only its missing chunks
        are computed (resume).
    weights : one non-negative weight per member (normalised to sum 1); default equal.
    topk : classes kept per view; default the largest member k.
    rule : ``mean`` (weighted arithmetic mean of the distributions) or ``geomean``
        (weighted geometric mean, renormalised: a product of experts).

    Raises
    ------
    ValueError
        Naming the first difference when the members do not match (classes, views, class
        names, rows, key, box or flip of a row), or bad weights / k / rule.
    """
    with OutputLock(out, command="ensemble"):  # one writer per output, from the start
        return _ensemble(stores, out, weights=weights, topk=topk, rule=rule,
                         overwrite=overwrite, progress=progress)


def _weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise ValueError(f"--weights has {len(weights)} values for {n} stores")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"--weights must be finite, >= 0 and not all 0, got "
                         f"{','.join(f'{w:g}' for w in weights)}")
    total = sum(weights)
    return [w / total for w in weights]


def check_same_rows(members: Sequence[LabelStore]) -> None:
    """ValueError naming the first row whose key, box or flip differs between members
    (boxes and flips are compared where both rows are valid: invalid rows have none)."""
    first = members[0]
    for other in members[1:]:
        if len(other) != len(first):
            raise ValueError(f"rows differ: {first.path} has {len(first)}, {other.path} has "
                             f"{len(other)}")
        differ = np.flatnonzero(first.keys != other.keys)
        if len(differ):
            row = int(differ[0])
            raise ValueError(f"row {row} differs: key {first.keys[row]!r} in {first.path}, "
                             f"{other.keys[row]!r} in {other.path} (ensemble needs the same "
                             "rows in the same order: infer-teacher --views-from)")
    _check_same_records(members)
    names = ("boxes", "flips", "valid")
    step = _derive.block_rows(first)
    streams = [_derive.read_blocks(store, names, step=step) for store in members]
    for blocks in zip(*streams):
        lo = blocks[0][0]
        base = blocks[0][2]
        for store, (_, _, data) in zip(members[1:], blocks[1:]):
            both = base["valid"].astype(bool) & data["valid"].astype(bool)
            for name, what in (("boxes", "box"), ("flips", "flip")):
                a, b = base[name], data[name]
                bad = (a != b).reshape(len(a), -1).any(axis=1) & both
                if bad.any():
                    i = int(np.flatnonzero(bad)[0])
                    row = lo + i
                    view = int(np.flatnonzero((a[i] != b[i]).reshape(a.shape[1], -1)
                                              .any(axis=1))[0])
                    raise ValueError(
                        f"row {row} (key {first.keys[row]!r}) view {view}: {what} differs: "
                        f"{_show(a[i, view])} in {first.path}, {_show(b[i, view])} in "
                        f"{store.path} (the members must label the same crops: infer-teacher "
                        "--views-from)")


def _record_arrays(store: LabelStore) -> tuple[str, ...]:
    """The augmentation record arrays of a store (its student arrays but the logits)."""
    return tuple(name for name in store.student_arrays
                 if name not in ("logits", "log_partition"))


def _check_same_records(members: Sequence[LabelStore]) -> None:
    """ValueError naming the first row-view whose augmentation record, or the first partner
    table entry, differs: members label the same augmented pixels (``--views-from``), whose
    records are planned without decoding and so compared on every row."""
    first = members[0]
    names = _record_arrays(first)
    if not names:
        return
    step = _derive.block_rows(first)
    streams = [_derive.read_blocks(store, names, step=step) for store in members]
    for blocks in zip(*streams):
        lo, base = blocks[0][0], blocks[0][2]
        for store, (_, _, data) in zip(members[1:], blocks[1:]):
            for name in names:
                a, b = base[name], data[name]
                bad = (a != b).reshape(a.shape[0], a.shape[1], -1).any(-1)
                if bad.any():
                    row, view = (int(v) for v in np.argwhere(bad)[0])
                    raise ValueError(
                        f"row {lo + row} (key {first.keys[lo + row]!r}) view {view}: {name} "
                        f"differs between {first.path} and {store.path} (the members must "
                        "label the same augmented views: infer-teacher --views-from)")
    table = first.partner_table()
    for store in members[1:]:
        other = store.partner_table()
        same = (table is None) == (other is None) and (table is None or all(
            np.array_equal(table[name], other[name]) for name in table))
        if not same:
            raise ValueError(f"the partner tables of {first.path} and {store.path} differ (the "
                             "members must label the same augmented views: infer-teacher "
                             "--views-from)")


def _usable(members: Sequence[LabelStore]) -> np.ndarray:
    """(N,) rows valid in every member and, for a row that mixes, whose partner rows are
    too: a valid output row's partner row keeps its crop (an invalid row's box is not)."""
    valid = np.logical_and.reduce([m.valid for m in members])
    if not (members[0].augment_dims or {}).get("mix"):
        return valid
    partners = np.concatenate([data["mix_partners"] for _, _, data in _derive.read_blocks(
        members[0], ("mix_partners",))])
    while True:  # a row made invalid here can be another row's partner
        rows = partners >= 0
        lost = valid & (rows & ~valid[np.where(rows, partners, 0)]).any(-1)
        if not lost.any():
            return valid
        valid = valid & ~lost


def _show(value: np.ndarray) -> str:
    """A stored box as rounded fractions, a flip as a bool."""
    if value.dtype == np.uint16:
        return "(" + ", ".join(f"{v:.4f}" for v in fmt.dequantize_boxes(value)) + ")"
    return str(bool(value))


def combine_distributions(dense: Sequence[np.ndarray], weights: Sequence[float],
                          rule: str = "mean") -> np.ndarray:
    """(n, C) float64 combination of members' dense (n, C) distributions, rows summing to 1:
    the weighted mean, or (``geomean``) the renormalised weighted geometric mean.

    >>> combine_distributions([np.array([[0.5, 0.5]]), np.array([[0.9, 0.1]])], [0.5, 0.5])
    array([[0.7, 0.3]])
    """
    total = np.zeros(dense[0].shape, dtype=np.float64)
    if rule == "mean":
        for probs, weight in zip(dense, weights):
            total += weight * probs
    else:
        for probs, weight in zip(dense, weights):
            total += weight * np.log(np.maximum(probs, LOG_FLOOR))
        total -= total.max(axis=1, keepdims=True)
        np.exp(total, out=total)
    return total / total.sum(axis=1, keepdims=True)


def _member_record(store: LabelStore) -> dict[str, Any]:
    """What identifies a member (resume compares it): where, which rows, written when."""
    attrs = store.attrs
    return {"path": real_path(store.path), "rows": len(store),
            "fingerprint": (attrs.get("dataset") or {}).get("fingerprint"),
            "created": attrs.get("created"), "teacher": store.teacher_name}


def _teacher_entry(store: LabelStore) -> dict[str, Any]:
    """A member's teacher with what recomputing its rows needs (``ssld verify``)."""
    attrs = store.attrs
    compute = attrs.get("compute") or {}
    return {"teacher": attrs.get("teacher"), "preprocessing": attrs.get("preprocessing"),
            "temperature": attrs.get("temperature", 1.0), "topk": store.topk,
            **{name: compute.get(name) for name in ("precision", "decoder", "batch_size")}}


def _settings(members, weights, rule, k) -> dict[str, Any]:
    return json.loads(json.dumps({"members": [_member_record(m) for m in members],
                                  "weights": weights, "rule": rule, "topk": k}))


def _resume(out: Any, settings: dict[str, Any]):
    """The writer of an existing ensemble store with the same settings; ValueError else."""
    store = open_store(out)
    before = store.attrs.get("ensemble")
    if before is None:
        raise FileExistsError(f"{out} already exists and is not an ensemble store (pass "
                              "--overwrite to replace it)")
    if before.get("members") != settings["members"]:
        change = _member_change(before.get("members") or [], settings["members"])
        raise ValueError(f"{out}: {change}; pass --overwrite to compute the ensemble afresh "
                         "(or rerun with the members it was started with)")
    diffs = [name for name in ("weights", "rule", "topk") if before.get(name) != settings[name]]
    if diffs:
        what = diffs[0]
        raise ValueError(f"{out} is an ensemble with other {what} (store {before.get(what)!r}, "
                         f"now {settings[what]!r}); pass --overwrite to replace it (or rerun "
                         "with its settings to resume)")
    return open_store(out, mode="a")


def _member_change(before: list[dict], now: list[dict]) -> str:
    """The first member that differs from the ones an ensemble was started with, in a
    few words (the records are long: a whole dump is no message)."""
    if len(before) != len(now):
        return f"it is an ensemble of other members ({len(before)} stores, now {len(now)})"
    for i, (old, new) in enumerate(zip(before, now)):
        if old == new:
            continue
        if old.get("path") != new.get("path"):
            return f"its member {i + 1} was {old.get('path')}, now {new.get('path')}"
        changed = [name for name in ("created", "fingerprint", "rows", "teacher")
                   if old.get(name) != new.get(name)]
        shown = ", ".join(f"{name} {old.get(name)} -> {new.get(name)}" for name in changed[:2])
        return (f"its member {i + 1} {new.get('path')} was rebuilt since the ensemble was "
                f"started ({shown})")
    return "its members differ"


def _ensemble(stores, out, *, weights, topk, rule, overwrite, progress) -> EnsembleResult:
    started = time.perf_counter()
    if rule not in RULES:
        raise ValueError(f"--rule must be one of {', '.join(RULES)}, got {rule!r}")
    members = _derive.open_complete(stores)
    if len(members) < 2:
        raise ValueError(f"ensemble needs at least two stores, got {len(members)}")
    for member in members:
        if len(member.row_teachers()) > 1:   # one teacher per member is what it records
            raise ValueError(f"{member.path}: its rows come from several teachers (attribute "
                             "teachers: a merge or selection of their stores); ensemble the "
                             "stores of one teacher each, then merge or select")
    weights = _weights(weights, len(members))
    first = members[0]
    classes = first.num_classes
    k = int(topk) if topk is not None else max(m.topk for m in members)
    if not 1 <= k <= classes:
        raise ValueError(f"--topk must be in [1, {classes}], got {k}")
    check_disjoint(out, {"one of the input stores": [m.path for m in members]})
    _derive.check_compatible(members, topk=False)
    check_same_rows(members)

    settings = _settings(members, weights, rule, k)
    if exists(out) and not overwrite and not unfinished_creation(out):
        writer = _resume(out, settings)
    else:
        if exists(out):
            check_replaceable(out)
        root = (first.attrs.get("dataset") or {}).get("root")
        entry = {"command": "ensemble", "rule": rule, "weights": weights, "topk": k,
                 "sources": [_derive.source_entry(m) for m in members]}
        attrs = _derive.derived_attrs(first, root, "ensemble", entry)
        attrs.pop("compute", None)   # each member's is in teacher.members
        attrs["teacher"] = {"model": "ensemble(" + "+".join(str(m.teacher_name)
                                                           for m in members) + ")",
                            "members": [_teacher_entry(m) for m in members],
                            "weights": weights, "rule": rule}
        attrs["ensemble"] = settings
        writer = create(out, keys=first.keys.tolist(), num_classes=classes, topk=k,
                        views=first.num_views, labels=first.labels, attrs=attrs,
                        chunk_rows=first.chunk_rows, overwrite=overwrite,
                        augment_dims=first.augment_dims, partners=first.partner_table(),
                        tar_fields=first.tar_fields)
    todo = [int(c) for c in np.flatnonzero(~writer.done_chunks())]
    usable = _usable(members)
    computed = 0
    total = sum(hi - lo for lo, hi in map(writer.chunk_range, todo))
    with progress_bar(progress, total, "ensemble") as bar:
        for chunk in todo:
            lo, hi = writer.chunk_range(chunk)
            writer.write(lo, **_chunk(members, weights, rule, k, lo, hi, usable[lo:hi]))
            computed += hi - lo
            bar.update(hi - lo)
    writer.close()
    result_store = open_store(out)
    notes = []
    roots = {str((m.attrs.get("dataset") or {}).get("root")) for m in members}
    if len(roots) > 1:
        notes.append(f"note: the members name different dataset roots; the output records "
                     f"{first.path}'s")
    return EnsembleResult(out=str(out), members=[m.path for m in members], weights=weights,
                          rule=rule, topk=k, rows=len(first), rows_computed=computed,
                          rows_skipped=len(first) - computed,
                          invalid=int((~result_store.valid).sum()),
                          seconds=time.perf_counter() - started, notes=notes)


def _chunk(members: Sequence[LabelStore], weights: Sequence[float], rule: str, k: int,
           lo: int, hi: int, valid: np.ndarray) -> dict[str, np.ndarray]:
    """The output rows [lo, hi) (``valid``: :func:`_usable`) as keyword arguments of
    ``LabelStoreWriter.write``."""
    names = ("indices", "probs", "residual")
    parts = [{name: m._get(name, slice(lo, hi)) for name in names} for m in members]
    n, views, classes = hi - lo, members[0].num_views, members[0].num_classes
    # Invalid rows as infer-teacher writes them: no information, no box.
    indices = np.tile(np.arange(k, dtype=np.int64), (n, views, 1))
    probs = np.zeros((n, views, k), dtype=np.float32)
    residual = np.ones((n, views), dtype=np.float32)
    rows = np.flatnonzero(valid)
    for start in range(0, len(rows), BLOCK_ROWS):
        block = rows[start:start + BLOCK_ROWS]
        for view in range(views):
            tops = [(p["indices"][block, view], p["probs"][block, view],
                     p["residual"][block, view]) for p in parts]
            top_i, top_p, rest = combine_top_k(tops, weights, rule, classes, k)
            indices[block, view], probs[block, view], residual[block, view] = top_i, top_p, rest
    out = {"indices": indices, "probs": probs, "residual": residual, "valid": valid}
    # The rest (boxes, flips, any other label array) is what the members share (the same
    # crops): the first member's, and its fill value on invalid rows (no box, no flip).
    for spec in fmt.specs(label=True):
        if spec.name not in out:
            value = members[0]._get(spec.name, slice(lo, hi))
            value[~valid] = spec.fill
            out[spec.name] = value
    # Augmentation records are the members' (compared): planned without decoding, they are
    # kept on invalid rows too, as infer-teacher writes them. Logits are not combined.
    for name in _record_arrays(members[0]):
        out[name] = members[0]._get(name, slice(lo, hi))
    if members[0].tar_fields:  # where the rows' images lie: the first member's, as the keys
        out["tar"] = members[0]._get("tar", slice(lo, hi))
    return out


def _smoothed(indices: np.ndarray, probs: np.ndarray, residual: np.ndarray, classes: int,
              candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One member's dense row (``densify``'s: ``normalize_topk``, then the tail shared evenly)
    at the ``candidates`` (n, K) classes, and its shared value at every class outside its
    top-k."""
    ids, top, tail = normalize_topk(indices, probs, residual, classes)
    rest = classes - (ids >= 0).sum(axis=1)
    shared = np.where(rest > 0, tail / np.maximum(rest, 1), 0.0)
    match = candidates[:, :, None] == ids[:, None, :]   # (n, K, k); ids -1 match nothing
    at = np.where(match.any(-1), (match * top[:, None, :]).sum(-1), shared[:, None])
    return at, shared


def combine_top_k(tops: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
                  weights: Sequence[float], rule: str, classes: int,
                  k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k class ids, probabilities and residual of the members' combined dense rows,
    computed from their top-k alone.

    ``tops`` holds each member's (indices (n, k_i), probs (n, k_i), residual (n,)). Under
    marginal smoothing every class outside a member's top-k gets the same share, so the
    combination (mean or geometric mean) takes one common value on every class outside
    the union of the members' top-k: only that union (<= sum k_i classes a row) and the
    common value are computed, O(n · sum k_i) instead of O(n · C), with the same result
    as the top-k of ``combine_distributions`` of the densified rows, up to the order of
    tied classes.
    """
    n = len(tops[0][0])
    candidates = np.concatenate([idx for idx, _, _ in tops], axis=1).astype(np.int64)
    width = candidates.shape[1]
    values = np.zeros((n, width))
    common = np.zeros(n)
    for (idx, probs, residual), weight in zip(tops, weights):
        at, shared = _smoothed(idx, probs, residual, classes, candidates)
        if rule == "mean":
            values += weight * at
            common += weight * shared
        else:
            values += weight * np.log(np.maximum(at, LOG_FLOOR))
            common += weight * np.log(np.maximum(shared, LOG_FLOOR))
    # A class in several members' top-k appears several times: count it once.
    order = np.argsort(candidates, axis=1, kind="stable")
    repeated = np.zeros((n, width), dtype=bool)
    ordered = np.take_along_axis(candidates, order, axis=1)
    np.put_along_axis(repeated, order[:, 1:], ordered[:, 1:] == ordered[:, :-1], axis=1)
    distinct = width - repeated.sum(axis=1)
    if rule != "mean":  # exponentiate, shifted by the row's largest log value
        peak = np.maximum(np.where(repeated, -np.inf, values).max(axis=1), common)
        values, common = np.exp(values - peak[:, None]), np.exp(common - peak)
    values[repeated] = -np.inf
    total = np.where(repeated, 0.0, values).sum(axis=1) + (classes - distinct) * common
    # Classes outside the union, enough to fill a top-k: the smallest ids not in it.
    ids = np.arange(min(width + k, classes))
    inside = (ids[None, :, None] == candidates[:, None, :]).any(-1)           # (n, ids)
    fill = np.argsort(inside, axis=1, kind="stable")[:, :k]
    fill_inside = np.take_along_axis(inside, fill, axis=1)
    pool_ids = np.concatenate([candidates, ids[fill]], axis=1)
    pool = np.concatenate([values, np.where(fill_inside, -np.inf, common[:, None])], axis=1)
    best = np.argpartition(-pool, k - 1, axis=1)[:, :k]
    best = np.take_along_axis(best, np.argsort(-np.take_along_axis(pool, best, axis=1), axis=1,
                                               kind="stable"), axis=1)
    top = np.take_along_axis(pool, best, axis=1) / total[:, None]
    return (np.take_along_axis(pool_ids, best, axis=1), top,
            np.clip(1.0 - top.sum(axis=1), 0.0, 1.0))
