"""Augmentation records: each view's RandAugment ops, erasing boxes and mixing, drawn from
(seed, key, view) and stored explicitly, so replaying a view needs the record, not a seed.

A record holds, per view (the store arrays of ``labelstore/_format.py:SCHEMA``):

- ``aug_ops`` (L,) uint8 and ``aug_levels`` (L,) int8: the RandAugment ops in the order
  applied, as ids of the store's ops table (0: none; an op skipped by timm's ``p``) and
  signed levels in tenths after the ``mstd`` noise (:mod:`.table`);
- ``erase_boxes`` (E, 4) uint8: random-erasing boxes (y0, x0, h, w) as fractions of the
  view on a /255 grid (h = w = 0: no box), filled with the constant ``fill``;
- ``mix_partners`` int32, ``mix_views`` uint8: the row and view whose pixels are mixed in
  (-1: not mixed); ``mix_lambdas`` uint8: the weight of the view's own pixels, λ·255
  (MixUp's λ; for CutMix 1 − the box's area, for reference only); ``mix_boxes`` (4,) uint8:
  the CutMix box on the /255 grid (zero: MixUp).

Boxes on the /255 grid are fractions of the view, so a record replays at any input size
(:func:`.kernels.pixel_rect` rounds each edge to a pixel). View 0, the evaluation view,
is never augmented: its record is empty.

Draws: each part has its own stream, the generator that draws the view's crop
(``views.view_rng(seed, key, view)``) advanced 1, 2 or 3 times 2^96 draws (RandAugment,
erasing, mixing), so turning on erasing or mixing leaves the ops drawn for the same seed
unchanged. The mixing partner is one row per row (drawn from
``view_rng(seed, key, -1)``) — each view draws whether it mixes, which of the partner's
views, λ and the box — so the teacher decodes one extra image per row instead of one per
view. The partner is another row of the same store chunk (``chunk_rows`` rows), so the
teacher pass stays chunk-local and resumable; a last chunk of one row also draws from the
row before it. Nothing depends on workers, ranks, batch or order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping

import numpy as np

from ..views import view_rng
from .policy import AugmentSpec, RandAugmentPolicy
from .table import LEVEL_SCALE, TABLE_VERSION, TABLES

GRID = 255  # erasing and CutMix boxes: fractions of the view in 1/255 steps (uint8)

# record field -> (store array, the record dimension that sizes it)
STORE_ARRAYS = {"ops": ("aug_ops", "op"), "levels": ("aug_levels", "op"),
                "erase_boxes": ("erase_boxes", "erase"), "mix_partners": ("mix_partners", "mix"),
                "mix_views": ("mix_views", "mix"), "mix_lambdas": ("mix_lambdas", "mix"),
                "mix_boxes": ("mix_boxes", "mix")}


@dataclass
class ViewRecords:
    """Records of views with any leading shape ``S`` (one row: (V,); a batch: (n, V))."""

    ops: np.ndarray           # S + (L,) uint8
    levels: np.ndarray        # S + (L,) int8
    erase_boxes: np.ndarray   # S + (E, 4) uint8
    mix_partners: np.ndarray  # S int32, -1: not mixed
    mix_views: np.ndarray     # S uint8
    mix_lambdas: np.ndarray   # S uint8
    mix_boxes: np.ndarray     # S + (4,) uint8

    @classmethod
    def empty(cls, shape: tuple[int, ...], dims: Mapping[str, int]) -> "ViewRecords":
        """Records that change nothing, with ``dims['op']`` ops and ``dims['erase']`` boxes."""
        shape = tuple(shape)
        return cls(ops=np.zeros(shape + (dims.get("op", 0),), np.uint8),
                   levels=np.zeros(shape + (dims.get("op", 0),), np.int8),
                   erase_boxes=np.zeros(shape + (dims.get("erase", 0), 4), np.uint8),
                   mix_partners=np.full(shape, -1, np.int32),
                   mix_views=np.zeros(shape, np.uint8),
                   mix_lambdas=np.full(shape, GRID, np.uint8),
                   mix_boxes=np.zeros(shape + (4,), np.uint8))

    @property
    def shape(self) -> tuple[int, ...]:
        return self.mix_partners.shape

    def padded(self, dims: Mapping[str, int]) -> "ViewRecords":
        """These records with ``dims['op']`` op slots and ``dims['erase']`` erasing boxes
        (the extra ones empty: no op, no box), so records of stores with fewer stack with
        them."""
        out = ViewRecords.empty(self.shape, {name: max(dims.get(name, 0), size) for name, size
                                             in (("op", self.ops.shape[-1]),
                                                 ("erase", self.erase_boxes.shape[-2]))})
        out.ops[..., :self.ops.shape[-1]] = self.ops
        out.levels[..., :self.levels.shape[-1]] = self.levels
        out.erase_boxes[..., :self.erase_boxes.shape[-2], :] = self.erase_boxes
        for name in ("mix_partners", "mix_views", "mix_lambdas", "mix_boxes"):
            setattr(out, name, getattr(self, name).copy())
        return out

    def map(self, function: Callable[[np.ndarray], np.ndarray]) -> "ViewRecords":
        """The same records with ``function`` applied to every array's leading dimensions
        (e.g. ``lambda a: a[rows]``; ``lambda a: a.swapaxes(0, 1)``)."""
        return ViewRecords(**{f.name: function(getattr(self, f.name)) for f in fields(self)})

    def flatten(self) -> "ViewRecords":
        """One leading dimension (views of a batch in row-major order of ``shape``)."""
        count = int(np.prod(self.shape))
        return ViewRecords(**{f.name: getattr(self, f.name).reshape(
            (count,) + getattr(self, f.name).shape[len(self.shape):]) for f in fields(self)})

    @classmethod
    def stack(cls, records: list["ViewRecords"]) -> "ViewRecords":
        return cls(**{f.name: np.stack([getattr(r, f.name) for r in records])
                      for f in fields(cls)})

    @property
    def mixed(self) -> np.ndarray:
        """Views that mix: a partner row (>= 0) or a partner-table entry (<= -2)."""
        return self.mix_partners != -1

    def unmixed(self, views: np.ndarray) -> "ViewRecords":
        """These records with the ``views`` mask not mixed (its mixing fields emptied)."""
        out = self.map(np.copy)
        out.mix_partners[views], out.mix_views[views] = -1, 0
        out.mix_lambdas[views], out.mix_boxes[views] = GRID, 0
        return out

    def without_mixing(self) -> "ViewRecords":
        """The ops and erasing alone: what makes a partner's pixels (never its own mixing)."""
        return self.unmixed(np.ones(self.shape, dtype=bool))

    def store_arrays(self, dims: Mapping[str, int]) -> dict[str, np.ndarray]:
        """The store arrays a store with these record ``dims`` has, by name (what
        ``LabelStoreWriter.write(..., **arrays)`` takes)."""
        return {array: getattr(self, name) for name, (array, dim) in STORE_ARRAYS.items()
                if dims.get(dim, 0)}

    @classmethod
    def from_store(cls, arrays: Mapping[str, Any], dims: Mapping[str, int],
                   shape: tuple[int, ...]) -> "ViewRecords":
        """Records of rows read from a store (``LabelSlice`` or a dict of its arrays);
        arrays the store does not have are empty records."""
        records = cls.empty(shape, dims)
        for name, (array, dim) in STORE_ARRAYS.items():
            if dims.get(dim, 0):
                setattr(records, name, np.asarray(arrays[array]).astype(
                    getattr(records, name).dtype, copy=False))
        return records


# -- draws ------------------------------------------------------------------------------------

class _ViewStreams:
    """The streams of one view's parts (1: RandAugment, 2: erasing, 3: mixing): the view's
    crop generator advanced ``part · 2^96`` draws — far from each other and from the crop's
    own few draws — set up one after the other on one generator (cheaper than a generator
    per part: seeding one costs more than all of a view's draws)."""

    def __init__(self, seed: int, key: str, view: int):
        self.generator = view_rng(seed, key, view)
        self.origin = self.generator.bit_generator.state

    def part(self, part: int) -> np.random.Generator:
        bit_generator = self.generator.bit_generator
        bit_generator.state = self.origin
        bit_generator.advance(part << 96)
        return self.generator


def draw_ops(policy: RandAugmentPolicy, rng: np.random.Generator,
             version: int = TABLE_VERSION) -> tuple[np.ndarray, np.ndarray]:
    """One view's RandAugment (timm's ``RandAugment`` and ``AugmentOp``): ``n`` ops chosen
    with replacement, each applied with probability ``p`` at magnitude ``m`` (+ ``mstd``
    noise, or uniform in [0, m] for infinite ``mstd``) clipped to [0, mmax], its argument
    negated with probability 1/2 where timm does; the level rounded to tenths."""
    table = TABLES[version]
    n = policy.num_ops
    picks = rng.integers(0, len(policy.op_ids), n)
    applied = rng.random(n) < policy.prob
    if math.isinf(policy.magnitude_std):
        magnitude = rng.uniform(0.0, policy.magnitude, n)
    elif policy.magnitude_std > 0:
        magnitude = rng.normal(policy.magnitude, policy.magnitude_std, n)
    else:
        magnitude = np.full(n, float(policy.magnitude))
    negate = rng.random(n) > 0.5
    ops, levels = np.zeros(n, np.uint8), np.zeros(n, np.int8)
    for slot in range(n):  # a few ops: plain Python beats numpy's per-call overhead here
        if not applied[slot]:
            continue
        op_id = policy.op_ids[picks[slot]]
        ops[slot] = op_id
        if table[op_id].arg is not None:
            level = round(min(max(float(magnitude[slot]), 0.0), policy.magnitude_max)
                          * LEVEL_SCALE)
            levels[slot] = -level if table[op_id].signed and negate[slot] else level
    return ops, levels


def _grid_box(top: float, left: float, height: float, width: float) -> np.ndarray:
    """A fractional box inside the view → (y0, x0, h, w) on the /255 grid, h, w >= 1."""
    h = min(max(round(height * GRID), 1), GRID)
    w = min(max(round(width * GRID), 1), GRID)
    y0 = min(round(top * GRID), GRID - h)
    x0 = min(round(left * GRID), GRID - w)
    return np.array([y0, x0, h, w], dtype=np.uint8)


def draw_erase(spec: AugmentSpec, rng: np.random.Generator) -> np.ndarray:
    """One view's random erasing (timm's ``RandomErasing``, in fractions of the view): with
    probability ``erase``, 1..``erase_count`` boxes, each of area ``U(erase_scale) / count``
    and aspect ``exp(U(log erase_ratio))``, placed uniformly; 10 tries per box."""
    boxes = np.zeros((spec.erase_count, 4), dtype=np.uint8)
    if not rng.random() < spec.erase:
        return boxes
    count = int(rng.integers(1, spec.erase_count + 1)) if spec.erase_count > 1 else 1
    log_ratio = (math.log(spec.erase_ratio[0]), math.log(spec.erase_ratio[1]))
    for box in range(count):
        for _ in range(10):
            area = rng.uniform(*spec.erase_scale) / count
            aspect = math.exp(rng.uniform(*log_ratio))
            height, width = math.sqrt(area * aspect), math.sqrt(area / aspect)
            if height < 1 and width < 1:
                boxes[box] = _grid_box(rng.uniform(0, 1 - height), rng.uniform(0, 1 - width),
                                       height, width)
                break
    return boxes


def _grid_edges(centre: float, size: float) -> tuple[int, int]:
    """A CutMix side [centre ± size/2] clipped to the view, on the grid, at least one step."""
    start = round(min(max(centre - size / 2, 0.0), 1.0) * GRID)
    stop = round(min(max(centre + size / 2, 0.0), 1.0) * GRID)
    if stop == start:
        start, stop = (start, start + 1) if start < GRID else (start - 1, start)
    return start, stop - start


def draw_mix(spec: AugmentSpec, rng: np.random.Generator,
             views: int) -> tuple[bool, int, int, np.ndarray]:
    """One view's MixUp/CutMix (timm's ``Mixup`` per element): whether it mixes (``mix_prob``),
    CutMix or MixUp (``switch_prob`` when both are set), λ ~ Beta(α, α), the partner's view,
    and for CutMix a box of side √(1 − λ) around a uniform centre, clipped to the view (λ is
    then 1 − the box's area, timm's ``correct_lam``). Returns (mixed, partner view, λ·255,
    box)."""
    mixed = rng.random() < spec.mix_prob
    if spec.mixup is not None and spec.cutmix is not None:
        use_cutmix = rng.random() < spec.switch_prob
    else:
        use_cutmix = spec.cutmix is not None
    alpha = spec.cutmix if use_cutmix else spec.mixup
    lam = rng.beta(alpha, alpha)
    partner_view = int(rng.integers(0, views))
    box = np.zeros(4, dtype=np.uint8)
    if use_cutmix:
        side = math.sqrt(1.0 - lam)
        (y0, h), (x0, w) = (_grid_edges(centre, side) for centre in rng.random(2))
        box[:] = (y0, x0, h, w)
        lam = 1.0 - (h * w) / (GRID * GRID)
    return mixed, partner_view, round(lam * GRID), box


def partner_window(row: int, rows: int, chunk_rows: int) -> tuple[int, int]:
    """Rows [lo, hi) a row's partner is drawn from: its chunk, and for a last chunk of one
    row the row before it too. ValueError for a store of one row or chunks of one row."""
    if rows < 2 or chunk_rows < 2:
        raise ValueError(f"mixing needs a store of 2 rows or more in chunks of 2 or more "
                         f"(rows {rows}, chunk_rows {chunk_rows})")
    lo = row // chunk_rows * chunk_rows
    hi = min(lo + chunk_rows, rows)
    return (hi - 2, hi) if hi - lo < 2 else (lo, hi)


def draw_partner(rng: np.random.Generator, row: int, rows: int, chunk_rows: int) -> int:
    """Another row of ``row``'s window, uniformly."""
    lo, hi = partner_window(row, rows, chunk_rows)
    partner = lo + int(rng.integers(0, hi - lo - 1))
    return partner + 1 if partner >= row else partner


def plan_records(spec: AugmentSpec, *, seed: int, key: str, row: int, rows: int,
                 chunk_rows: int, views: int) -> ViewRecords:
    """The records of one row's ``views`` views (view 0 empty), from (seed, key, view) and,
    for the partner, the row's place in the store (``row`` of ``rows``, ``chunk_rows``)."""
    dims = spec.dims()
    records = ViewRecords.empty((views,), dims)
    partner = None
    for view in range(1, views):
        streams = _ViewStreams(seed, key, view)
        if spec.policy is not None:
            records.ops[view], records.levels[view] = draw_ops(spec.policy, streams.part(1))
        if dims["erase"]:
            records.erase_boxes[view] = draw_erase(spec, streams.part(2))
        if dims["mix"]:
            mixed, partner_view, lam, box = draw_mix(spec, streams.part(3), views)
            if mixed:
                if partner is None:
                    partner = draw_partner(view_rng(seed, key, -1), row, rows, chunk_rows)
                records.mix_partners[view] = partner
                records.mix_views[view] = partner_view
                records.mix_lambdas[view] = lam
                records.mix_boxes[view] = box
    return records


def check_records(records: ViewRecords, *, rows: np.ndarray, store_rows: int,
                  ops: tuple, table_size: int = 0) -> str | None:
    """The first reason records (n, V) of store rows ``rows`` cannot be replayed — an op id
    outside the store's table ``ops``, a level an op cannot have, a box outside the view,
    a partner that is the row itself or neither a row of the store nor an entry of its
    partner table (``table_size`` entries, referenced as ``-2 - i``), a partner view the
    rows do not have — as ``"row r view v: ..."``; None when they are sound."""
    n, views = records.shape
    own = np.broadcast_to(np.asarray(rows).reshape(-1, 1), (n, views))
    problems: list[tuple[np.ndarray, Callable[[int, int], str]]] = []
    op_ids = records.ops.astype(np.int64)
    known = op_ids < len(ops)
    problems.append((~known.all(-1), lambda i, v: f"op id {int(op_ids[i, v].max())} is not "
                                                  f"in the store's ops table ({len(ops)} ops)"))
    safe = np.where(known, op_ids, 0)
    takes_level = np.array([op.arg is not None for op in ops])[safe]
    signed = np.array([op.signed for op in ops])[safe]
    levels = records.levels.astype(np.int64)
    bad_level = (levels != 0) & ~takes_level | (levels < 0) & ~signed
    problems.append((bad_level.any(-1), lambda i, v: f"levels {records.levels[i, v].tolist()} "
                     f"do not fit ops {records.ops[i, v].tolist()}"))
    for name, boxes in (("erasing box", records.erase_boxes),
                        ("CutMix box", records.mix_boxes[..., None, :])):
        boxes = boxes.astype(np.int64)
        outside = ((boxes[..., 0] + boxes[..., 2] > GRID) | (boxes[..., 1] + boxes[..., 3] > GRID)
                   | ((boxes[..., 2] == 0) != (boxes[..., 3] == 0))).any(-1)
        problems.append((outside, lambda i, v, name=name: f"{name} is not inside the view"))
    cut = records.mix_boxes.astype(np.int64)
    cut_lambda = np.rint((1.0 - cut[..., 2] * cut[..., 3] / (GRID * GRID)) * GRID)
    problems.append(((records.mix_partners != -1) & (cut[..., 2] > 0)
                     & (records.mix_lambdas != cut_lambda),
                     lambda i, v: f"CutMix λ {int(records.mix_lambdas[i, v])}/255 is not 1 − "
                                  f"the box's area ({int(cut_lambda[i, v])}/255)"))
    partners = records.mix_partners.astype(np.int64)
    bad_partner = (partners < -1 - table_size) | (partners >= store_rows) | (partners == own)
    problems.append((bad_partner, lambda i, v: f"mixing partner {int(partners[i, v])} "
                                               f"(store of {store_rows} rows, partner table "
                                               f"of {table_size})"))
    problems.append(((partners != -1) & (records.mix_views >= views),
                     lambda i, v: f"partner view {int(records.mix_views[i, v])} of {views}"))
    first = None
    for mask, message in problems:
        found = np.argwhere(mask)
        if len(found) and (first is None or tuple(found[0]) < first[0]):
            first = (tuple(found[0]), message)
    if first is None:
        return None
    (i, view), message = first
    return f"row {int(own[i, 0])} view {int(view)}: {message(i, view)}"
