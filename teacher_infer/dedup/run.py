"""``dedup``: near-duplicates of a query set (e.g. the validation set) inside a pool.

Stage 1 (``_dedup_search``) finds candidates by exact cosine similarity of the
stored teacher embeddings: the pool is streamed in blocks through the prefetching
reader and multiplied, with torch on the CPU or a GPU, against the normalised query
embeddings held on the device, keeping per query the ``top_m`` most similar pool
rows above ``threshold``. Stage 2 verifies each candidate pair on the images with
SIFT keypoints (OpenCV), Lowe's ratio test and a RANSAC homography; a pair is a
duplicate when enough matches agree with one homography. Under ``torchrun`` both
stages are shared by the ranks; stage 2 keeps its results in progress files, so a
killed run resumes. The output lists the pairs the rule (``_dedup_rules``) drops,
pool key first, so it is a valid ``select-topk --exclude`` file.
"""
from __future__ import annotations

import functools
import glob
import json
import os
import posixpath
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ._dist import Dist
from . import _dedup_rules as _rules, _dedup_search as _search, _derive
from ._dedup_search import Candidates
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


def require_embeddings(store: LabelStore, role: str) -> None:
    if not store.has_embeddings:
        raise ValueError(f"{role} store {store.path} has no embeddings: run `ssld infer-teacher "
                         "... --embeddings` to write them")


def search(query: LabelStore, pool: LabelStore, *, threshold: float = DEFAULT_THRESHOLD,
           top_m: int = DEFAULT_TOP_M, device: str = "auto", precision: str = "auto",
           query_batch: int = 4096, pool_batch: int | None = None,
           part: tuple[int, int] | None = None, progress: bool = False) -> Candidates:
    """Stage 1: per query row, the ``top_m`` pool rows with cosine >= ``threshold``.

    The result is exact and the same on every ``device`` (see ``_dedup_search``):
    ``"auto"``, ``"cpu"`` or ``"cuda"`` run the torch path (queries held on the
    device, running top-K per query there); ``"numpy"`` runs the float32-BLAS
    reference. ``precision`` is the dtype of the torch products (``"auto"``: fp16 on
    CUDA, fp32 on the CPU; ``"bf16"``: fast on CPUs with AVX512-BF16/AMX); it changes
    the speed, not the result. Rows with ``valid=False`` or an all-zero embedding take no part.
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
    with _derive.progress_bar(progress, len(pool), "dedup: cosine search") as bar:
        if device == "numpy":
            return _search.search_numpy(query, pool, query_batch=int(query_batch), bar=bar,
                                        **options)
        return _search.search_torch(query, pool, device=device, precision=precision, bar=bar,
                                    **options)


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


QUERY_UNREADABLE, POOL_UNREADABLE = 1, 2   # per-pair flags of stage 2


def verify_pairs(pairs: Candidates, query_keys: np.ndarray, pool_keys: np.ndarray,
                 query_root: str, pool_root: str, *, ratio: float = RATIO,
                 workers: int | None = None, progress: bool = False,
                 on_group=None) -> tuple[np.ndarray, np.ndarray]:
    """Stage 2: inlier count per pair (-1 where an image could not be read) and per-pair
    flags (QUERY_UNREADABLE | POOL_UNREADABLE). A pair is a duplicate when its count
    reaches ``min_inliers``. ``on_group(members, counts, flags)`` is called in the
    caller's thread as each query's pairs are done (the progress file)."""
    inliers = np.full(len(pairs), -1, dtype=np.int64)
    flags = np.zeros(len(pairs), dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, pairs.query_rows[1:] != pairs.query_rows[:-1]])
    groups = np.split(np.arange(len(pairs)), starts[1:]) if len(pairs) else []
    # A pool image near many queries (small or uniform data sets) is described once.
    pool_features = functools.lru_cache(maxsize=FEATURE_CACHE)(_sift_features)

    def one_query(members: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # The query's features are computed once for all of its candidates.
        query = _sift_features(posixpath.join(query_root, query_keys[pairs.query_rows[members[0]]]))
        counts = np.full(len(members), -1, dtype=np.int64)
        failed = np.full(len(members), QUERY_UNREADABLE if query is None else 0, dtype=np.int64)
        for i, pair in enumerate(members):
            candidate = pool_features(posixpath.join(pool_root, pool_keys[pairs.pool_rows[pair]]))
            if candidate is None:
                failed[i] |= POOL_UNREADABLE
            elif query is not None:
                counts[i] = count_inliers(query, candidate, ratio=ratio)
        return members, counts, failed

    executor = ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1)
    try:
        with _derive.progress_bar(progress, len(pairs), "dedup: SIFT", unit="pairs") as bar:
            for future in as_completed([executor.submit(one_query, g) for g in groups]):
                members, counts, failed = future.result()
                inliers[members], flags[members] = counts, failed
                if on_group is not None:
                    on_group(members, counts, failed)
                bar.update(len(members))
    finally:   # a failure or Ctrl-C: do not run the queued queries
        executor.shutdown(wait=True, cancel_futures=True)
    return inliers, flags


class Progress:
    """Stage-2 results kept beside the output so that a killed run resumes.

    One append-only file per rank, ``OUT.progress.RANK``: a header line with the
    settings the inlier counts depend on, then ``query_row<TAB>pool_row<TAB>inliers
    <TAB>flags`` lines, flushed and fsynced after each query's pairs. A last line
    without its newline (the run died while writing it) is ignored and cut off
    before appending. The files are removed once the output is written.
    """

    def __init__(self, out: str, settings: dict):
        self.out, self.settings = str(out), settings
        self.header = "# ssld dedup progress " + json.dumps(settings, sort_keys=True) + "\n"
        self._file = None

    def files(self) -> list[str]:
        return sorted(glob.glob(glob.escape(self.out) + ".progress.*"))

    def load(self) -> dict[tuple[int, int], tuple[int, int]]:
        """(query_row, pool_row) -> (inliers, flags) from every rank's file."""
        done: dict[tuple[int, int], tuple[int, int]] = {}
        for path in self.files():
            with open(path, "rb") as handle:
                lines = handle.read().split(b"\n")[:-1]   # the last piece lacks its newline
            if not lines:
                continue
            if lines[0].decode("utf-8", "replace") + "\n" != self.header:
                raise ValueError(f"progress file {path} was written by a dedup run with other "
                                 "stores or stage-2 settings: delete it to start stage 2 afresh")
            for line in lines[1:]:
                query_row, pool_row, inliers, flags = map(int, line.split(b"\t"))
                done[(query_row, pool_row)] = (inliers, flags)
        return done

    def open(self, rank: int) -> None:
        path = f"{self.out}.progress.{rank}"
        with open(path, "ab+") as handle:   # cut a torn last line; keep complete ones
            handle.seek(0)
            data = handle.read()
            handle.truncate(data.rfind(b"\n") + 1)
        self._file = open(path, "ab")
        if self._file.tell() == 0:
            self._write(self.header.encode())

    def append(self, pairs: Candidates, members, counts, flags) -> None:
        self._write("".join(f"{pairs.query_rows[m]}\t{pairs.pool_rows[m]}\t{c}\t{f}\n"
                            for m, c, f in zip(members, counts, flags)).encode())

    def _write(self, data: bytes) -> None:
        self._file.write(data)
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def remove(self) -> None:
        for path in self.files():
            os.remove(path)


def _verify_shared(pairs: Candidates, query: LabelStore, pool: LabelStore, roots, dist,
                   progress_file: Progress | None, *, workers, progress):
    """Stage 2 over the ranks: each verifies its share of the pairs the progress files do
    not hold yet (whole queries, dealt round-robin); every rank gets all results."""
    done = dist.broadcast(progress_file.load() if progress_file and dist.is_main else {})
    inliers = np.full(len(pairs), -1, dtype=np.int64)
    flags = np.zeros(len(pairs), dtype=np.int64)
    known = np.array([(q, p) in done for q, p in zip(pairs.query_rows.tolist(),
                                                     pairs.pool_rows.tolist())], dtype=bool)
    for i in np.flatnonzero(known):
        inliers[i], flags[i] = done[(int(pairs.query_rows[i]), int(pairs.pool_rows[i]))]
    todo = np.flatnonzero(~known)
    queries = np.unique(pairs.query_rows[todo])
    mine = todo[np.isin(pairs.query_rows[todo], queries[dist.rank::dist.world_size])]
    share = Candidates(pairs.query_rows[mine], pairs.pool_rows[mine], pairs.cosines[mine])
    on_group = None
    if progress_file is not None:
        progress_file.open(dist.rank)
        on_group = functools.partial(progress_file.append, share)
    try:
        counts, failed = verify_pairs(share, query.keys, pool.keys, *roots, workers=workers,
                                      progress=progress and dist.is_main, on_group=on_group)
    finally:
        if progress_file is not None:
            progress_file.close()
    for part, part_counts, part_flags in dist.gather((mine, counts, failed)):
        inliers[part], flags[part] = part_counts, part_flags
    return inliers, flags, int(known.sum())


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
    rule: str = "best"
    device: str = "cpu"
    world_size: int = 1
    pool_keys: list[str] = field(default_factory=list)
    query_keys: list[str] = field(default_factory=list)
    cosines: list[float] = field(default_factory=list)
    inliers: list[int] = field(default_factory=list)   # -1 with verify="none"
    confirmed: int = 0                 # pairs that passed stage 2
    resumed_pairs: int = 0             # stage-2 results taken from the progress files
    unreadable_images: int = 0         # distinct images that could not be read
    rules: list[dict] = field(default_factory=list)    # per threshold: images each rule removes
    seconds_search: float = 0.0
    seconds_verify: float = 0.0

    @property
    def duplicates(self) -> int:
        return len(self.pool_keys)

    def lines(self) -> list[str]:
        """The output file: a header comment, then ``pool_key\\tquery_key\\tcosine\\tinliers``."""
        head = [f"# ssld dedup: query={self.query} pool={self.pool} threshold={self.threshold} "
                f"verify={self.verify} min_inliers={self.min_inliers} rule={self.rule}",
                "# pool_key\tquery_key\tcosine\tinliers"]
        return head + [f"{p}\t{q}\t{c:.4f}\t{i if i >= 0 else '-'}" for p, q, c, i in
                       zip(self.pool_keys, self.query_keys, self.cosines, self.inliers)]

    def to_dict(self) -> dict:
        """The per-threshold report written beside the output (``OUT.rules.json``)."""
        return {"query": self.query, "pool": self.pool, "threshold": self.threshold,
                "verify": self.verify, "min_inliers": self.min_inliers, "rule": self.rule,
                "candidates": self.candidates, "confirmed": self.confirmed,
                "excluded_pool_images": len(set(self.pool_keys)), "thresholds": self.rules}

    def __str__(self) -> str:
        verified = ("not verified (--verify none)" if self.verify == "none" else
                    f"{self.confirmed:,} confirmed by SIFT (>= {self.min_inliers} RANSAC inliers) "
                    f"in {self.seconds_verify:.1f} s"
                    + (f", {self.resumed_pairs:,} pairs from the progress file"
                       if self.resumed_pairs else ""))
        ranks = f" on {self.world_size} ranks" if self.world_size > 1 else ""
        lines = [f"compared {self.queries:,} query rows with {self.pool_rows:,} pool rows "
                 f"({self.device}{ranks}): {self.candidates:,} candidate pairs with cosine >= "
                 f"{self.threshold} ({self.seconds_search:.1f} s)",
                 f"duplicates: {verified}; rule {self.rule}: {self.duplicates:,} pairs listed, "
                 f"{len(set(self.pool_keys)):,} distinct pool keys to exclude"]
        if self.rules:
            lines.append("pool images each rule removes, by threshold:")
            for name, key, spec in (("threshold", "threshold", "g"), ("pairs", "pairs", ","),
                                    ("best", "best", ","), ("component", "component", ",")):
                lines.append(f"  {name:<10}" + "".join(f"{r[key]:>9{spec}}" for r in self.rules))
        if self.unreadable_images:
            lines.append(f"warning: {self.unreadable_images:,} images could not be read; "
                         "their pairs were not confirmed")
        return "\n".join(lines)


def dedup(query: Any, pool: Any, out: str | None = None, *,
          threshold: float = DEFAULT_THRESHOLD, verify: str = "sift",
          top_m: int = DEFAULT_TOP_M, min_inliers: int = DEFAULT_MIN_INLIERS,
          query_root: str | None = None, pool_root: str | None = None,
          device: str = "auto", precision: str = "auto", rule: str = "best",
          report_thresholds: Sequence[float] | None = None,
          query_batch: int = 4096, pool_batch: int | None = None, workers: int | None = None,
          progress: bool = False) -> DedupResult:
    """Find near-duplicates of ``query`` rows inside ``pool`` (both label stores).

    Under ``torchrun`` every rank searches a share of the pool blocks and verifies a
    share of the candidate pairs; rank 0 merges and writes ``out``; every rank
    returns the same result.

    Parameters
    ----------
    query, pool : path or LabelStore
        Stores written with embeddings (``ssld infer-teacher --embeddings``); a
        query given as an image folder is not embedded here — run infer-teacher
        on it first.
    out : path, optional
        Output file (``-`` for stdout): a header comment, then one line per
        listed pair ``pool_key<TAB>query_key<TAB>cosine<TAB>inliers``; usable
        as ``select-topk --exclude`` as is. Beside a file output: the rule report
        ``OUT.rules.json`` and, while stage 2 runs, ``OUT.progress.RANK`` files
        from which a killed run resumes.
    threshold, top_m : float, int
        Stage 1 keeps, per query, the ``top_m`` most similar pool rows with cosine
        similarity >= ``threshold`` (exact; ties go to the lower pool row).
    verify : {"sift", "none"}
        ``"sift"`` reads both images (``dataset.root`` + key, or the ``*_root``
        overrides) and confirms a pair with >= ``min_inliers`` RANSAC inliers;
        ``"none"`` confirms every stage-1 pair.
    device : {"auto", "cpu", "cuda"}
        Where stage 1 multiplies (``"numpy"``: the float32-BLAS reference).
    precision : {"auto", "fp32", "bf16", "fp16"}
        dtype of the stage-1 products (``"auto"``: fp16 on CUDA, fp32 on the CPU);
        the result is the same, only the speed changes.
    rule : {"best", "component"}
        ``"best"`` lists the confirmed pairs; ``"component"`` every pair of a
        connected component (of pairs >= threshold) that holds a confirmed one.
    report_thresholds : floats, optional
        Thresholds (>= ``threshold``) of the per-rule report (default: threshold
        and +0.05, +0.1, +0.15).
    query_batch, pool_batch : int
        Block sizes of the matrix products (see :func:`search`).
    workers : int, optional
        Threads for SIFT per rank (default: CPU count).
    """
    if verify not in ("sift", "none"):
        raise ValueError(f"verify must be 'sift' or 'none', got {verify!r}")
    if rule not in _rules.RULES:
        raise ValueError(f"rule must be one of {', '.join(_rules.RULES)}, got {rule!r}")
    if not -1.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must be a cosine similarity within [-1, 1], got {threshold}")
    for name, value in (("top_m", top_m), ("min_inliers", min_inliers),
                        ("query_batch", query_batch), ("pool_batch", pool_batch or 1)):
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
    dist = Dist.from_env()
    if device != "numpy":
        device = str(_search.resolve_device(device))
        if dist.enabled and device == "cuda":
            device = f"cuda:{dist.local_rank}"
    owns_group = _init_group(dist)
    try:
        return _run(query_store, pool_store, out, dist, roots, threshold=float(threshold),
                    verify=verify, top_m=int(top_m), min_inliers=int(min_inliers),
                    device=device, precision=precision, rule=rule,
                    report_thresholds=report_thresholds,
                    query_batch=int(query_batch), pool_batch=pool_batch, workers=workers,
                    progress=progress)
    finally:
        if owns_group:
            import torch.distributed

            torch.distributed.destroy_process_group()


def _init_group(dist) -> bool:
    """A gloo group for the object collectives (stage 1 itself exchanges no tensors)."""
    if not dist.enabled:
        return False
    import datetime

    import torch.distributed

    if torch.distributed.is_initialized():
        return False
    # Ranks wait for each other at the end of stage 1 and of stage 2; uneven shares of
    # a 14 M-row pool can differ by far more than gloo's default 30 minutes.
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(hours=12))
    return True


def _run(query_store, pool_store, out, dist, roots, *, threshold, verify, top_m, min_inliers,
         device, precision, rule, report_thresholds, query_batch, pool_batch, workers,
         progress) -> DedupResult:
    started = time.perf_counter()
    pairs = search(query_store, pool_store, threshold=threshold, top_m=top_m, device=device,
                   precision=precision, query_batch=query_batch, pool_batch=pool_batch,
                   part=(dist.rank, dist.world_size) if dist.enabled else None,
                   progress=progress and dist.is_main)
    if dist.enabled:
        pairs = Candidates.best_of(dist.gather(pairs), top_m)
    searched = time.perf_counter()
    query_keys, pool_keys = query_store.keys, pool_store.keys
    resumed, unreadable, progress_file = 0, 0, None
    if roots is None:
        inliers, confirmed = np.full(len(pairs), -1), np.ones(len(pairs), dtype=bool)
    else:
        if out is not None and str(out) != "-":
            progress_file = Progress(out, _stage2_settings(query_store, pool_store, roots))
        inliers, flags, resumed = _verify_shared(pairs, query_store, pool_store, roots, dist,
                                                 progress_file, workers=workers,
                                                 progress=progress)
        confirmed = inliers >= min_inliers
        unreadable = (len(np.unique(pairs.query_rows[(flags & QUERY_UNREADABLE) > 0]))
                      + len(np.unique(pairs.pool_rows[(flags & POOL_UNREADABLE) > 0])))
    listed = _rules.removed_pairs(pairs, confirmed, rule, threshold)
    result = DedupResult(
        query=query_store.path, pool=pool_store.path, threshold=threshold, verify=verify,
        min_inliers=min_inliers, queries=len(query_store), pool_rows=len(pool_store),
        candidates=len(pairs), rule=rule, device=device, world_size=dist.world_size,
        pool_keys=pool_keys[pairs.pool_rows[listed]].tolist(),
        query_keys=query_keys[pairs.query_rows[listed]].tolist(),
        cosines=pairs.cosines[listed].tolist(), inliers=inliers[listed].tolist(),
        confirmed=int(confirmed.sum()), resumed_pairs=resumed, unreadable_images=unreadable,
        rules=_rules.rule_report(pairs, confirmed,
                                 _rules.report_thresholds(threshold, report_thresholds)),
        seconds_search=searched - started, seconds_verify=time.perf_counter() - searched)
    if dist.is_main and out is not None:
        _write_outputs(result, str(out), progress_file)
    dist.barrier()
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


def _stage2_settings(query: LabelStore, pool: LabelStore, roots) -> dict:
    """What the stored inlier counts depend on: the two key lists and the SIFT settings."""
    def identity(store):
        dataset = store.attrs.get("dataset") or {}
        return {"rows": len(store), "fingerprint": dataset.get("fingerprint")}

    return {"query": identity(query), "pool": identity(pool), "roots": list(roots),
            "sift": [RATIO, RANSAC_PIXELS, MAX_SIDE, MIN_SIDE, MAX_KEYPOINTS,
                     CONTRAST_THRESHOLD]}


def _write_outputs(result: DedupResult, out: str, progress_file: Progress | None) -> None:
    text = "\n".join(result.lines()) + "\n"
    if out == "-":
        sys.stdout.write(text)
        return
    with open(out, "w", encoding="utf-8") as handle:
        handle.write(text)
    with open(out + ".rules.json", "w", encoding="utf-8") as handle:
        json.dump(result.to_dict(), handle, indent=2)
        handle.write("\n")
    if progress_file is not None:   # the output holds every result now
        progress_file.remove()


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
