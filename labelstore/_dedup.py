"""``dedup``: near-duplicates of a query set (e.g. the validation set) inside a pool.

Stage 1 finds candidates by exact cosine similarity of the stored teacher
embeddings: the pool is streamed in blocks and multiplied against the (normalised)
query embeddings held in RAM, keeping per query the ``top_m`` most similar pool
rows above ``threshold`` — memory is O(queries · D + one block), whatever the pool
size. Stage 2 verifies each candidate pair on the images with SIFT keypoints
(OpenCV), Lowe's ratio test and a RANSAC homography; a pair is a duplicate when
enough matches agree with one homography. The output file lists confirmed pairs,
pool key first, so it is a valid ``select-topk --exclude`` file.
"""
from __future__ import annotations

import functools
import os
import posixpath
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from . import _derive
from ._paths import check_disjoint, check_output_file
from ._reader import LabelStore, open as open_store

# Stage 1. Teacher embeddings of an image and its resized / re-encoded / slightly
# cropped copy typically have cosine > 0.9; 0.8 leaves room for heavier edits while
# top_m bounds the number of pairs stage 2 must look at.
DEFAULT_THRESHOLD = 0.8
DEFAULT_TOP_M = 5
# Stage 2. Lowe's ratio (0.75, his paper's value), RANSAC reprojection error in pixels
# of the image scaled to MAX_SIDE, and the inliers one homography must explain:
# unrelated images rarely get more than ~10 geometrically consistent matches,
# near-duplicates get dozens to hundreds.
RATIO = 0.75
RANSAC_PIXELS = 5.0
DEFAULT_MIN_INLIERS = 20
MAX_SIDE = 512   # larger images are downscaled first: SIFT cost grows with pixels
MIN_SIDE = 320   # smaller ones are upscaled: a 120-px thumbnail has too few keypoints to match
MAX_KEYPOINTS = 2000
# Half OpenCV's default (0.04): JPEG-40 and contrast-reduced copies lose weak keypoints,
# and low-texture images then keep too few to reach MIN_INLIERS.
CONTRAST_THRESHOLD = 0.02
FEATURE_CACHE = 512     # pool images whose SIFT features are kept (a few hundred KB each)


@dataclass
class Candidates:
    """Stage-1 pairs, sorted by query row, then cosine descending, then pool row."""

    query_rows: np.ndarray   # (P,) int64
    pool_rows: np.ndarray    # (P,) int64
    cosines: np.ndarray      # (P,) float32

    def __len__(self) -> int:
        return len(self.query_rows)


def _keep_best(query_rows, pool_rows, cosines, top_m: int) -> tuple[np.ndarray, ...]:
    order = np.lexsort((pool_rows, -cosines, query_rows))
    query_rows, pool_rows, cosines = query_rows[order], pool_rows[order], cosines[order]
    keep = _derive.first_in_runs(query_rows, top_m)
    return query_rows[keep], pool_rows[keep], cosines[keep]


def _normalised(embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit rows and a mask of rows that had a usable (finite, non-zero) embedding."""
    norms = np.linalg.norm(embeddings, axis=1)
    usable = np.isfinite(norms) & (norms > 0)
    unit = np.zeros_like(embeddings)
    unit[usable] = embeddings[usable] / norms[usable, None]
    return unit, usable


def require_embeddings(store: LabelStore, role: str) -> None:
    if not store.has_embeddings:
        raise ValueError(f"{role} store {store.path} has no embeddings: run `ssld infer-teacher "
                         "... --embeddings` to write them")


def search(query: LabelStore, pool: LabelStore, *, threshold: float = DEFAULT_THRESHOLD,
           top_m: int = DEFAULT_TOP_M, query_batch: int = 4096, pool_batch: int = 16384,
           progress: bool = False) -> Candidates:
    """Stage 1: per query row, the ``top_m`` pool rows with cosine >= ``threshold``.

    Rows with ``valid=False`` or an all-zero embedding take no part. The pool is
    read ``pool_batch`` rows at a time and compared with ``query_batch`` queries per
    matrix product (float32), so memory is one (pool_batch × query_batch) block.
    """
    require_embeddings(query, "query")
    require_embeddings(pool, "pool")
    if query.embedding_dim != pool.embedding_dim:
        raise ValueError(f"embedding widths differ: {query.path} has {query.embedding_dim}, "
                         f"{pool.path} has {pool.embedding_dim}")
    query_valid = query.valid
    queries, usable = _normalised(query.read_embeddings(slice(None)))
    query_ids = np.flatnonzero(query_valid & usable)
    queries = np.ascontiguousarray(queries[query_ids])
    found: list[tuple[np.ndarray, ...]] = []
    buffered = 0
    bound = max(4 * len(query_ids) * top_m, 1 << 16)
    with _derive.progress_bar(progress, len(pool), "dedup: cosine search") as bar:
        # the next block is read while this one is multiplied
        for lo, hi, data in _derive.read_blocks(pool, ("embeddings", "valid"), step=pool_batch):
            block, usable = _normalised(data["embeddings"].astype(np.float32))
            rows = np.flatnonzero(usable & data["valid"].astype(bool))
            block = block[rows]
            for q0 in range(0, len(queries), query_batch):
                sims = block @ queries[q0:q0 + query_batch].T     # (pool rows, queries)
                hit_pool, hit_query = np.nonzero(sims >= threshold)
                if len(hit_pool):
                    found.append((query_ids[q0 + hit_query], lo + rows[hit_pool],
                                  sims[hit_pool, hit_query]))
                    buffered += len(hit_pool)
                if buffered > bound:  # a low threshold: trim to top_m per query now
                    found = [_keep_best(*map(np.concatenate, zip(*found)), top_m)]
                    buffered = len(found[0][0])
            bar.update(hi - lo)
    if not found:
        empty = np.zeros(0, dtype=np.int64)
        return Candidates(empty, empty, np.zeros(0, dtype=np.float32))
    return Candidates(*_keep_best(*map(np.concatenate, zip(*found)), top_m))


# -- stage 2: SIFT verification ---------------------------------------------------

def _sift_features(path: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(keypoint xy (n, 2), descriptors (n, 128)) of a grayscale image, None if unreadable."""
    import cv2

    try:
        encoded = np.fromfile(path, dtype=np.uint8)   # unlike imread, handles any path
    except OSError:
        return None
    image = cv2.imdecode(encoded, cv2.IMREAD_GRAYSCALE) if encoded.size else None
    if image is None:
        return None
    side = max(image.shape)
    scale = MAX_SIDE / side if side > MAX_SIDE else MIN_SIDE / side if side < MIN_SIDE else 1.0
    if scale != 1.0:
        image = cv2.resize(image, None, fx=scale, fy=scale,
                           interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
    sift = cv2.SIFT_create(nfeatures=MAX_KEYPOINTS, contrastThreshold=CONTRAST_THRESHOLD)
    keypoints, descriptors = sift.detectAndCompute(image, None)
    if descriptors is None:
        return np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32)
    return np.float32([kp.pt for kp in keypoints]), descriptors


def count_inliers(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], *,
                  ratio: float = RATIO) -> int:
    """Matches of ``a`` in ``b`` that pass Lowe's ratio test and fit one RANSAC homography."""
    import cv2

    (xy_a, des_a), (xy_b, des_b) = a, b
    if len(des_a) < 4 or len(des_b) < 4:
        return 0
    pairs = cv2.BFMatcher(cv2.NORM_L2).knnMatch(des_a, des_b, k=2)
    good = [m for m, n in (p for p in pairs if len(p) == 2) if m.distance < ratio * n.distance]
    # One keypoint of b matched by several of a would count one structure many times.
    best: dict[int, Any] = {}
    for match in good:
        if match.trainIdx not in best or match.distance < best[match.trainIdx].distance:
            best[match.trainIdx] = match
    if len(best) < 4:
        return 0
    src = xy_a[[m.queryIdx for m in best.values()]].reshape(-1, 1, 2)
    dst = xy_b[[m.trainIdx for m in best.values()]].reshape(-1, 1, 2)
    _, mask = cv2.findHomography(src, dst, cv2.RANSAC, RANSAC_PIXELS)
    return 0 if mask is None else int(mask.sum())


def _image_root(store: LabelStore, override: str | None, role: str) -> str:
    root = override or (store.attrs.get("dataset") or {}).get("root")
    if not root:
        raise ValueError(f"{role} store {store.path} records no dataset.root: pass --{role}-root "
                         "(or --verify none)")
    if "://" in str(root):
        raise ValueError(f"SIFT verification reads local files, but the {role} root is {root}: "
                         f"pass --{role}-root with a local copy (or --verify none)")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{role} image root {root} is not a directory")
    return str(root)


def verify_pairs(pairs: Candidates, query_keys: np.ndarray, pool_keys: np.ndarray,
                 query_root: str, pool_root: str, *, ratio: float = RATIO,
                 workers: int | None = None, progress: bool = False) -> tuple[np.ndarray, int]:
    """Stage 2: inlier count per pair (-1 where an image could not be read) and the number
    of failed image reads. A pair is a duplicate when its count reaches ``min_inliers``."""
    inliers = np.full(len(pairs), -1, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, pairs.query_rows[1:] != pairs.query_rows[:-1]])
    groups = np.split(np.arange(len(pairs)), starts[1:]) if len(pairs) else []
    # A pool image near many queries (small or uniform data sets) is described once.
    pool_features = functools.lru_cache(maxsize=FEATURE_CACHE)(_sift_features)

    def one_query(members: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        # The query's features are computed once for all of its candidates.
        query = _sift_features(posixpath.join(query_root, query_keys[pairs.query_rows[members[0]]]))
        counts = np.full(len(members), -1, dtype=np.int64)
        unreadable = int(query is None)
        for i, pair in enumerate(members):
            candidate = pool_features(posixpath.join(pool_root, pool_keys[pairs.pool_rows[pair]]))
            unreadable += candidate is None
            if query is not None and candidate is not None:
                counts[i] = count_inliers(query, candidate, ratio=ratio)
        return members, counts, unreadable

    unreadable = 0
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool_exec, \
            _derive.progress_bar(progress, len(pairs), "dedup: SIFT", unit="pairs") as bar:
        for members, counts, missing in pool_exec.map(one_query, groups):
            inliers[members] = counts
            unreadable += missing
            bar.update(len(members))
    return inliers, unreadable


# -- the command ------------------------------------------------------------------

@dataclass
class DedupResult:
    """Confirmed duplicate pairs and how they were found; ``str()`` is the CLI summary."""

    query: str
    pool: str
    threshold: float
    verify: str
    min_inliers: int
    queries: int
    pool_rows: int
    candidates: int
    pool_keys: list[str] = field(default_factory=list)
    query_keys: list[str] = field(default_factory=list)
    cosines: list[float] = field(default_factory=list)
    inliers: list[int] = field(default_factory=list)   # -1 with verify="none"
    unreadable_images: int = 0
    seconds_search: float = 0.0
    seconds_verify: float = 0.0

    @property
    def duplicates(self) -> int:
        return len(self.pool_keys)

    def lines(self) -> list[str]:
        """The output file: a header comment, then ``pool_key\\tquery_key\\tcosine\\tinliers``."""
        head = [f"# ssld dedup: query={self.query} pool={self.pool} threshold={self.threshold} "
                f"verify={self.verify} min_inliers={self.min_inliers}",
                "# pool_key\tquery_key\tcosine\tinliers"]
        return head + [f"{p}\t{q}\t{c:.4f}\t{i if i >= 0 else '-'}" for p, q, c, i in
                       zip(self.pool_keys, self.query_keys, self.cosines, self.inliers)]

    def __str__(self) -> str:
        verified = ("not verified (--verify none)" if self.verify == "none" else
                    f"{self.duplicates:,} confirmed by SIFT (>= {self.min_inliers} RANSAC inliers) "
                    f"in {self.seconds_verify:.1f} s")
        lines = [f"compared {self.queries:,} query rows with {self.pool_rows:,} pool rows: "
                 f"{self.candidates:,} candidate pairs with cosine >= {self.threshold} "
                 f"({self.seconds_search:.1f} s)",
                 f"duplicates: {verified}; {len(set(self.pool_keys)):,} distinct pool keys"]
        if self.unreadable_images:
            lines.append(f"warning: {self.unreadable_images:,} image reads failed; those pairs "
                         "were not confirmed")
        return "\n".join(lines)


def dedup(query: Any, pool: Any, out: str | None = None, *,
          threshold: float = DEFAULT_THRESHOLD, verify: str = "sift",
          top_m: int = DEFAULT_TOP_M, min_inliers: int = DEFAULT_MIN_INLIERS,
          query_root: str | None = None, pool_root: str | None = None,
          query_batch: int = 4096, pool_batch: int = 16384, workers: int | None = None,
          progress: bool = False) -> DedupResult:
    """Find near-duplicates of ``query`` rows inside ``pool`` (both label stores).

    Parameters
    ----------
    query, pool : path or LabelStore
        Stores written with embeddings (``ssld infer-teacher --embeddings``); a
        query given as an image folder is not embedded here — run infer-teacher
        on it first.
    out : path, optional
        Output file (``-`` for stdout): a header comment, then one line per
        confirmed pair ``pool_key<TAB>query_key<TAB>cosine<TAB>inliers``; usable
        as ``select-topk --exclude`` as is.
    threshold, top_m : float, int
        Stage 1 keeps, per query, the ``top_m`` most similar pool rows with cosine
        similarity >= ``threshold``.
    verify : {"sift", "none"}
        ``"sift"`` reads both images (``dataset.root`` + key, or the ``*_root``
        overrides) and confirms a pair with >= ``min_inliers`` RANSAC inliers;
        ``"none"`` reports every stage-1 pair.
    query_batch, pool_batch : int
        Block sizes of the matrix products (memory: pool_batch × query_batch floats).
    workers : int, optional
        Threads for SIFT (default: CPU count).
    """
    if verify not in ("sift", "none"):
        raise ValueError(f"verify must be 'sift' or 'none', got {verify!r}")
    if not -1.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must be a cosine similarity within [-1, 1], got {threshold}")
    for name, value in (("top_m", top_m), ("min_inliers", min_inliers),
                        ("query_batch", query_batch), ("pool_batch", pool_batch)):
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    query_store, pool_store = (_open_embedded(query, "query"), _open_embedded(pool, "pool"))
    roots = None
    if verify == "sift":
        roots = (_image_root(query_store, query_root, "query"),
                 _image_root(pool_store, pool_root, "pool"))
    if out is not None and str(out) != "-":
        _check_out(out, {"--query": query_store.path, "--pool": pool_store.path,
                         "an image root": list(roots or ())})

    started = time.perf_counter()
    pairs = search(query_store, pool_store, threshold=float(threshold), top_m=int(top_m),
                   query_batch=int(query_batch), pool_batch=int(pool_batch), progress=progress)
    searched = time.perf_counter()
    query_keys, pool_keys = query_store.keys, pool_store.keys
    unreadable = 0
    if roots is None:
        inliers, confirmed = np.full(len(pairs), -1), np.ones(len(pairs), dtype=bool)
    else:
        inliers, unreadable = verify_pairs(pairs, query_keys, pool_keys, *roots, workers=workers,
                                           progress=progress)
        confirmed = inliers >= int(min_inliers)
    result = DedupResult(
        query=query_store.path, pool=pool_store.path, threshold=float(threshold), verify=verify,
        min_inliers=int(min_inliers), queries=len(query_store), pool_rows=len(pool_store),
        candidates=len(pairs), pool_keys=pool_keys[pairs.pool_rows[confirmed]].tolist(),
        query_keys=query_keys[pairs.query_rows[confirmed]].tolist(),
        cosines=pairs.cosines[confirmed].tolist(), inliers=inliers[confirmed].tolist(),
        unreadable_images=unreadable, seconds_search=searched - started,
        seconds_verify=time.perf_counter() - searched)
    if out is not None:
        text = "\n".join(result.lines()) + "\n"
        if str(out) == "-":
            sys.stdout.write(text)
        else:
            with open(out, "w", encoding="utf-8") as handle:
                handle.write(text)
    return result


def _check_out(out: str, inputs: dict) -> None:
    """Before the search: ``out`` overlaps no input, and replaces only an earlier dedup
    output (its first line is the header this command writes)."""
    check_output_file(str(out), "--out")  # not a folder, its folder exists
    check_disjoint(out, inputs)
    if os.path.lexists(out):
        try:
            with open(out, encoding="utf-8") as handle:
                ours = handle.readline().startswith("# ssld dedup:")
        except (OSError, UnicodeDecodeError):
            ours = False
        if not ours or not os.path.isfile(out):
            raise ValueError(f"--out {out} exists and is not an ssld dedup output; refusing to "
                             "replace it (remove it yourself or choose another --out)")


def _open_embedded(source: Any, role: str) -> LabelStore:
    if isinstance(source, LabelStore):
        store = source
    else:
        path = str(source)
        if os.path.isdir(path) and not os.path.exists(os.path.join(path, "zarr.json")):
            raise ValueError(f"--{role} {path} is an image folder, not a label store: embed it "
                             "first with `ssld infer-teacher --data ... --embeddings --out "
                             f"{role}.zarr`")
        store = open_store(path)
    store.require_complete()
    require_embeddings(store, role)
    return store
