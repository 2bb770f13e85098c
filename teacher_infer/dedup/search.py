"""Stage 1 of dedup: exact top-m cosine search of a query set against a streamed pool.

The result is defined without reference to how it is computed, so that the numpy
path and the torch path (CPU or CUDA, any block size, any number of ranks) return
the same pairs:

- an embedding takes part when its row is valid and its stored values are not all
  zero (they are finite: the reader refuses a chunk that is not, docs/format.md); valid
  rows with an all-zero embedding cannot be compared and are reported
  (``Candidates.unusable_queries`` / ``unusable_pool``), never left out in silence;
- the cosine of a pair is ``x·y / (‖x‖ ‖y‖)`` of the stored values in float64,
  rounded to float32: that float32 value is the pair's score;
- a pair is a candidate when its score >= ``threshold`` (compared in float64); per
  query the ``top_m`` candidates with the highest score are kept, equal scores
  ordered by lower pool row first (exact copies of one image are ties, and the first
  copy wins).

Both paths score blocks fast and approximately (float32 BLAS; the torch path in the
precision ``teacher_infer.runtime.resolve_precision`` gives: bf16 on CUDA, fp32 on the CPU,
or what was asked for), keep what could be in the top m given a proven bound on
the approximation error (:func:`slack`), and re-score those pairs exactly on the CPU
from the block that is already in memory. The torch path keeps a running top-K
(K = top_m + EXTRA) per query on the device and afterwards certifies each query: no
pair outside its top-K can beat its m-th exact score. The rare query that cannot be
certified (more than K rows within the error bound of its m-th score: many copies of
one image) is searched again with a larger K.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from labelstore import LabelStore, first_in_runs, progress_bar, read_blocks

from ..runtime import Dist, resolve_device, resolve_precision

# Teacher embeddings of an image and its resized / re-encoded / slightly cropped copy typically
# have cosine > 0.9; 0.8 leaves room for heavier edits while top_m bounds the number of pairs
# stage 2 must look at.
DEFAULT_THRESHOLD = 0.8
DEFAULT_TOP_M = 5
# Candidates the device keeps per query beyond top_m: room for near-ties at the m-th
# place, so that nearly every query is certified in one pass over the pool.
EXTRA = 16
# Scores held at once per pool block: queries × block rows × 4 bytes stays under this.
SCORE_BYTES = {"cpu": 256 << 20, "cuda": 2 << 30}
MAX_BLOCK = 1 << 16


@dataclass
class Candidates:
    """Stage-1 pairs, sorted by query row, then score descending, then pool row."""

    query_rows: np.ndarray   # (P,) int64
    pool_rows: np.ndarray    # (P,) int64
    cosines: np.ndarray      # (P,) float32: the score defined above
    passes: int = 1          # passes over the pool (more when a query had many near-ties)
    # valid rows whose embedding is all zero: they take no part (no direction to compare)
    unusable_queries: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    unusable_pool: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def __len__(self) -> int:
        return len(self.query_rows)

    @classmethod
    def empty(cls) -> "Candidates":
        none = np.zeros(0, dtype=np.int64)
        return cls(none, none, np.zeros(0, dtype=np.float32))

    @classmethod
    def best_of(cls, parts: list["Candidates"], top_m: int) -> "Candidates":
        """The top ``top_m`` per query of the union of ``parts`` (e.g. one per pool share)."""
        unusable = {name: np.unique(np.concatenate([np.zeros(0, np.int64)] + [
            getattr(p, name) for p in parts])) for name in ("unusable_queries", "unusable_pool")}
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls(*cls.empty().arrays(), **unusable)
        return cls(*keep_best(np.concatenate([p.query_rows for p in parts]),
                              np.concatenate([p.pool_rows for p in parts]),
                              np.concatenate([p.cosines for p in parts]), top_m), **unusable)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.query_rows, self.pool_rows, self.cosines


def keep_best(query_rows, pool_rows, cosines, top_m: int) -> tuple[np.ndarray, ...]:
    """Per query the ``top_m`` highest scores, ties by lower pool row; sorted as Candidates."""
    order = np.lexsort((pool_rows, -cosines, query_rows))
    query_rows, pool_rows, cosines = query_rows[order], pool_rows[order], cosines[order]
    keep = first_in_runs(query_rows, top_m)
    return query_rows[keep], pool_rows[keep], cosines[keep]


def usable_rows(embeddings: np.ndarray) -> np.ndarray:
    """Mask of rows that are finite and not all zero (the same test on every path)."""
    return np.isfinite(embeddings).all(axis=1) & (embeddings != 0).any(axis=1)


def _unusable(valid: np.ndarray, usable: np.ndarray) -> np.ndarray:
    """Rows (positions) that are valid but cannot be compared."""
    return np.flatnonzero(np.asarray(valid, dtype=bool) & ~usable)


def exact_scores(query_raw: np.ndarray, query_norms: np.ndarray, query_pos: np.ndarray,
                 pool_raw: np.ndarray, pool_pos: np.ndarray) -> np.ndarray:
    """float32 scores of pairs (query_raw[query_pos], pool_raw[pool_pos]): float64 cosine.

    Each pair's dot product is summed on its own (einsum over one row pair), so the
    value does not depend on which other pairs are in the batch.
    """
    q = query_raw[query_pos].astype(np.float64)
    p = pool_raw[pool_pos].astype(np.float64)
    pool_norms = np.sqrt(np.einsum("ij,ij->i", p, p))
    return (np.einsum("ij,ij->i", q, p) / (query_norms[query_pos] * pool_norms)).astype(np.float32)


def eligible(scores: np.ndarray, threshold: float) -> np.ndarray:
    """score >= threshold, compared in float64 (not in float32, NumPy's default here)."""
    return scores.astype(np.float64) >= threshold


# Unit roundoff of the dtypes the device may multiply in.
UNIT_ROUNDOFF = {"fp32": 2.0 ** -24, "fp16": 2.0 ** -11, "bf16": 2.0 ** -8}


def slack(dim: int, precision: str = "fp32") -> float:
    """Bound on |approximate − float64 cosine| of unit vectors, with a factor 2 of margin.

    With u the unit roundoff of the compute dtype: rounding both unit vectors to it
    costs ≤ 2u (plus 4·2^-24 for their float32 normalisation), a length-D dot product
    accumulated in float32 ≤ (D + 2)·2^-24 (Higham's γ_D, as ‖x‖ = ‖y‖ = 1), and
    rounding the product to the compute dtype ≤ u; 1e-6 covers fp16 subnormals and the
    float32 rounding of the score.
    """
    u = UNIT_ROUNDOFF[precision]
    return 2 * (3 * u + 4 * 2.0 ** -24 + (dim + 2) * 2.0 ** -24) + 1e-6


def _queries(query: LabelStore) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(rows taking part, their stored embeddings as float32, their float64 norms, valid
    rows that cannot take part)."""
    raw = query.read_embeddings(slice(None))
    usable = usable_rows(raw)
    ids = np.flatnonzero(query.valid & usable)
    raw = np.ascontiguousarray(raw[ids])
    norms = np.concatenate([np.zeros(0)] + [
        np.sqrt(np.einsum("ij,ij->i", part, part)) for part in
        (raw[i:i + 4096].astype(np.float64) for i in range(0, len(raw), 4096))])
    return ids, raw, norms, _unusable(query.valid, usable)


def _unit(raw: np.ndarray, norms: np.ndarray) -> np.ndarray:
    return raw / norms.astype(np.float32)[:, None]


def _pool_blocks(pool: LabelStore, part, unusable: list
                 ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(first row, usable rows within the block, stored embeddings) per prefetched block;
    the valid rows that cannot be compared are appended to ``unusable``."""
    for lo, _, data in read_blocks(pool, ("embeddings", "valid"), part=part):
        raw = data["embeddings"]
        usable = usable_rows(raw)
        unusable.append(lo + _unusable(data["valid"], usable))
        yield lo, np.flatnonzero(data["valid"].astype(bool) & usable), raw


def require_embeddings(store: LabelStore, role: str) -> None:
    if not store.has_embeddings:
        raise ValueError(f"{role} store {store.path} has no embeddings: run `ssld infer-teacher "
                         "... --embeddings` to write them")


def search(query: LabelStore, pool: LabelStore, *, threshold: float = DEFAULT_THRESHOLD,
           top_m: int = DEFAULT_TOP_M, device: str = "auto", precision: str = "auto",
           query_batch: int = 4096, pool_batch: int | None = None,
           part: tuple[int, int] | None = None, progress: bool = False) -> Candidates:
    """Stage 1: per query row, the ``top_m`` pool rows with cosine >= ``threshold``.

    The result is exact and the same on every ``device`` (see the module doc):
    ``"auto"``, ``"cpu"`` or ``"cuda"`` (``teacher_infer.runtime.resolve_device``; or a
    ``torch.device`` resolved already) run the torch path (queries held on the device,
    running top-K per query there); ``"numpy"`` runs the float32-BLAS reference. ``precision``
    is the dtype of the torch products (``teacher_infer.runtime.resolve_precision``:
    ``"auto"`` is bf16 on CUDA, fp32 on the CPU; ``"bf16"`` is fast on CPUs with
    AVX512-BF16/AMX); it changes the speed, not the result. Rows with ``valid=False`` or an
    all-zero embedding take no part (the latter, when valid, are listed in the result's
    ``unusable_queries`` / ``unusable_pool``).
    ``pool_batch`` sets the pool rows per matrix product (default: the score matrix
    stays under 256 MiB on the CPU, 2 GiB on CUDA; 16384 rows for numpy, with
    ``query_batch`` queries per product); ``part=(i, n)`` searches only every n-th
    pool block from block i (one rank's share).
    """
    require_embeddings(query, "query")
    require_embeddings(pool, "pool")
    if query.embedding_dim != pool.embedding_dim:
        raise ValueError(f"embedding widths differ: {query.path} has {query.embedding_dim}, "
                         f"{pool.path} has {pool.embedding_dim}")
    options = dict(threshold=float(threshold), top_m=int(top_m), pool_batch=pool_batch,
                   part=part)
    with progress_bar(progress, len(pool), "dedup: cosine search") as bar:
        if device == "numpy":
            return search_numpy(query, pool, query_batch=int(query_batch), bar=bar, **options)
        dev = resolve_device(device, Dist.from_env()) if isinstance(device, str) else device
        return search_torch(query, pool, device=dev, precision=resolve_precision(precision, dev),
                            bar=bar, **options)


# -- numpy: the reference -------------------------------------------------------------

def search_numpy(query: LabelStore, pool: LabelStore, *, threshold: float, top_m: int,
                 query_batch: int = 4096, pool_batch: int | None = None,
                 part: tuple[int, int] | None = None, bar=None) -> Candidates:
    """Stage 1 in numpy (float32 BLAS), the baseline the torch path is checked against.

    Every pair within :func:`slack` of ``threshold`` is re-scored exactly, so the
    kept set can be trimmed to ``top_m`` per query at any time.
    """
    ids, queries_raw, query_norms, unusable_queries = _queries(query)
    queries = _unit(queries_raw, query_norms)
    low = threshold - slack(queries.shape[1], "fp32")
    found: list[tuple[np.ndarray, ...]] = []
    unusable: list[np.ndarray] = []
    buffered, bound = 0, max(4 * len(ids) * top_m, 1 << 16)
    for lo, rows, raw in _pool_blocks(pool, part, unusable):
        step = pool_batch or 16384
        for b0 in range(0, len(rows), step):
            sub = rows[b0:b0 + step]
            block = raw[sub].astype(np.float32)
            block /= np.linalg.norm(block, axis=1, keepdims=True)
            for q0 in range(0, len(queries), query_batch):
                sims = block @ queries[q0:q0 + query_batch].T     # (pool rows, queries)
                hit_pool, hit_query = np.nonzero(sims >= low)
                if not len(hit_pool):
                    continue
                scores = exact_scores(queries_raw, query_norms, q0 + hit_query, raw,
                                      sub[hit_pool])
                keep = eligible(scores, threshold)
                found.append((q0 + hit_query[keep], lo + sub[hit_pool[keep]], scores[keep]))
                buffered += int(keep.sum())
                if buffered > bound:  # a low threshold: trim to top_m per query now
                    found = [keep_best(*map(np.concatenate, zip(*found)), top_m)]
                    buffered = len(found[0][0])
        if bar is not None:
            bar.update(len(raw))
    skipped = dict(unusable_queries=unusable_queries,
                   unusable_pool=np.concatenate([np.zeros(0, np.int64)] + unusable))
    if not found:
        return Candidates(*Candidates.empty().arrays(), **skipped)
    positions, pool_rows, scores = keep_best(*map(np.concatenate, zip(*found)), top_m)
    return Candidates(ids[positions], pool_rows, scores, **skipped)


# -- torch: queries on the device, running top-K ----------------------------------------

@contextmanager
def _exact_matmul():
    """No TF32, no fp16/bf16 partial sums while searching: :func:`slack` assumes fp32 sums."""
    import torch

    matmul = torch.backends.cuda.matmul
    flags = ("allow_tf32", "allow_fp16_reduced_precision_reduction",
             "allow_bf16_reduced_precision_reduction")
    saved = torch.get_float32_matmul_precision(), [getattr(matmul, flag) for flag in flags]
    torch.set_float32_matmul_precision("highest")
    for flag in flags:
        setattr(matmul, flag, False)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        for flag, value in zip(flags, saved[1]):
            setattr(matmul, flag, value)


def block_rows(num_queries: int, dim: int, device_type: str) -> int:
    """Pool rows per matrix product: the (queries × rows) score matrix and the float32
    (rows × D) block each stay under SCORE_BYTES."""
    widest = 4 * max(num_queries, dim, 1)
    return int(min(MAX_BLOCK, max(256, SCORE_BYTES[device_type] // widest)))


def search_torch(query: LabelStore, pool: LabelStore, *, threshold: float, top_m: int,
                 device="cpu", precision: str = "fp32", pool_batch: int | None = None,
                 part: tuple[int, int] | None = None, bar=None) -> Candidates:
    """Stage 1 with torch on ``device`` (resolved already: a ``torch.device`` or its name):
    the same pairs as :func:`search_numpy`.

    Memory on the device: queries × D × (2 bytes in bf16/fp16, 4 in fp32), one pool block
    × D, the (queries × block) score matrix (bounded by ``SCORE_BYTES``, or set by
    ``pool_batch``) and the running top-K, queries × K × 12 bytes. ``precision`` (fp32,
    bf16 or fp16) is the dtype of the products; bf16 is ~4× faster than fp32 on CPUs with
    AVX512-BF16 or AMX (slow elsewhere); the result does not depend on it (a coarser dtype
    only widens the error bound).
    """
    import torch

    device = torch.device(device)
    if precision not in UNIT_ROUNDOFF:
        raise ValueError(f"precision must be one of {', '.join(UNIT_ROUNDOFF)}, got "
                         f"{precision!r}")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    ids, queries_raw, query_norms, unusable_queries = _queries(query)
    if not len(ids):   # nothing to compare: the pool is not read
        return Candidates(*Candidates.empty().arrays(), unusable_queries=unusable_queries)
    dim = queries_raw.shape[1]
    error = slack(dim, precision)
    low = threshold - error
    pending = np.arange(len(ids))
    width = top_m + EXTRA
    kept: list[tuple[np.ndarray, ...]] = []
    unusable: list[np.ndarray] = []
    passes = 0
    with torch.inference_mode(), _exact_matmul():
        while len(pending):
            unit = torch.from_numpy(_unit(queries_raw[pending], query_norms[pending]))
            on_device = unit.to(device, dtype)
            found, kth, total = _stream(on_device, pool, width, low, threshold, queries_raw,
                                        query_norms, pending, pool_batch, part, bar,
                                        unusable if not passes else [])
            bar = None     # a second pass is not drawn as progress
            positions, pool_rows, scores = keep_best(*found, top_m)
            done = _certified(positions, scores, pending, kth, error, threshold,
                              top_m, width >= total)
            mine = np.isin(positions, pending[done])
            kept.append((positions[mine], pool_rows[mine], scores[mine]))
            pending, width = pending[~done], width * 4
            passes += 1
    positions, pool_rows, scores = keep_best(*map(np.concatenate, zip(*kept)), top_m)
    return Candidates(ids[positions], pool_rows, scores, passes=passes,
                      unusable_queries=unusable_queries,
                      unusable_pool=np.concatenate([np.zeros(0, np.int64)] + unusable))


def _stream(queries, pool, width, low, threshold, queries_raw, query_norms, pending,
            pool_batch, part, bar, unusable: list):
    """One pass over the pool: every pair that ever entered a query's running top-K,
    re-scored exactly; the final K-th approximate score per query; usable pool rows.
    Valid pool rows that cannot be compared are appended to ``unusable``."""
    import torch

    dev, n = queries.device, len(queries)
    step = pool_batch or block_rows(n, queries.shape[1], dev.type)
    top_values = torch.full((n, width), -math.inf, device=dev)
    top_rows = torch.full((n, width), -1, dtype=torch.int64, device=dev)
    found: list[tuple[np.ndarray, ...]] = []
    total = 0
    for lo, _, data in read_blocks(pool, ("embeddings", "valid"), part=part):
        raw = data["embeddings"]
        stored, valid = torch.from_numpy(raw), torch.from_numpy(data["valid"].astype(bool))
        for b0 in range(0, len(raw), step):
            # Usable rows are picked on the device from the float32 norms: for float16
            # values (|x| <= 65504, squares within float32's range) a finite, non-zero
            # norm is exactly usable_rows' test, at a fraction of its cost.
            block = stored[b0:b0 + step].to(dev).float()
            norms = block.norm(dim=1)
            usable = valid[b0:b0 + step].to(dev) & torch.isfinite(norms) & (norms > 0)
            if stored.dtype != torch.float16:
                usable &= torch.isfinite(block).all(dim=1) & (block != 0).any(dim=1)
            if not bool(usable.all()):
                unusable.append(lo + b0 + _unusable(
                    valid[b0:b0 + step].numpy(), usable.cpu().numpy()))
            usable = usable.nonzero().squeeze(1)
            if not len(usable):
                continue
            total += len(usable)
            if len(usable) < len(block):
                block, norms = block[usable], norms[usable]
            block = block.div_(norms[:, None]).to(queries.dtype)   # in place in float32
            scores = queries @ block.T                                   # (queries, rows)
            values, where = scores.topk(min(width, len(usable)), dim=1)
            values = values.float().masked_fill_(values < low, -math.inf)
            values = torch.cat([top_values, values], dim=1)
            top_values, slot = values.topk(width, dim=1)
            top_rows = torch.cat([top_rows, (usable + lo + b0)[where]], dim=1).gather(1, slot)
            entered = (slot >= width) & torch.isfinite(top_values)
            query_pos, rank = (t.cpu().numpy() for t in entered.nonzero(as_tuple=True))
            if len(query_pos):
                pool_rows = top_rows[query_pos, rank].cpu().numpy()
                exact = exact_scores(queries_raw, query_norms, pending[query_pos], raw,
                                     pool_rows - lo)
                keep = eligible(exact, threshold)
                found.append((pending[query_pos[keep]], pool_rows[keep], exact[keep]))
        if bar is not None:
            bar.update(len(raw))
    found_arrays = (tuple(map(np.concatenate, zip(*found))) if found else
                    (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)))
    return found_arrays, top_values[:, -1].cpu().numpy().astype(np.float64), total


def _certified(positions, scores, pending, kth, error, threshold, top_m, saw_all) -> np.ndarray:
    """Per pending query: True when no pair outside its running top-K can enter its top m.

    A pair that never entered has approximate score <= the final K-th one, so its
    exact score is <= kth + error and its float32 score <= float32(kth + error) = bar.
    Certified when the top-K never filled (every pair above threshold − error
    entered), when bar < threshold, or when the m-th kept score exceeds bar.
    """
    if saw_all:
        return np.ones(len(pending), dtype=bool)
    bar = (kth + error).astype(np.float32).astype(np.float64)
    index = np.searchsorted(pending, positions)
    counts = np.bincount(index, minlength=len(pending))
    mth = np.full(len(pending), np.inf)
    last = np.flatnonzero(first_in_runs(positions, top_m)
                          & ~first_in_runs(positions, top_m - 1))
    mth[index[last]] = scores[last]
    return ~np.isfinite(kth) | (bar < threshold) | ((counts >= top_m) & (bar < mth))
