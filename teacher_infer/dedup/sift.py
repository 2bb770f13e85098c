"""Stage 2 of dedup: a candidate pair is confirmed on the images themselves.

SIFT keypoints (OpenCV) of both images, Lowe's ratio test, and a RANSAC homography: a pair is
a duplicate when enough matches agree with one homography. Images are read through
``teacher_infer.ImageSource`` (files, or byte ranges of tar shards for stores of shard data).
Under ``torchrun`` the ranks share the pairs (whole queries each); the results go to progress
files beside the output as each query is done, so a killed run resumes (:class:`Progress`).
"""
from __future__ import annotations

import functools
import glob
import json
import os
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

import numpy as np

from labelstore import LabelStore, progress_bar

from ..runtime import Dist
from .search import Candidates

# Lowe's ratio (0.75, his paper's value), RANSAC reprojection error in pixels of the image
# scaled to MAX_SIDE, and the inliers one homography must explain: unrelated images rarely get
# more than ~10 geometrically consistent matches, near-duplicates get dozens to hundreds.
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


def sift_features(image: str | bytes | None) -> tuple[np.ndarray, np.ndarray] | None:
    """(keypoint xy (n, 2), descriptors (n, 128)) of a grayscale image (a file, or the
    image's bytes), None if unreadable."""
    import cv2

    if image is None:
        return None
    try:
        encoded = (np.frombuffer(image, dtype=np.uint8) if isinstance(image, bytes)
                   else np.fromfile(image, dtype=np.uint8))   # unlike imread, any path
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


QUERY_UNREADABLE, POOL_UNREADABLE = 1, 2   # per-pair flags of stage 2


def verify_pairs(pairs: Candidates, query_keys: np.ndarray, pool_keys: np.ndarray,
                 query_root: Any, pool_root: Any, *, ratio: float = RATIO,
                 workers: int | None = None, progress: bool = False,
                 on_group=None, query_tar: Any = None,
                 pool_tar: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Stage 2: inlier count per pair (-1 where an image could not be read) and per-pair
    flags (QUERY_UNREADABLE | POOL_UNREADABLE). A pair is a duplicate when its count
    reaches ``min_inliers``. ``on_group(members, counts, flags)`` is called in the
    caller's thread as each query's pairs are done (the progress file).

    Roots are folders or URLs (or ``ImageSource`` s); ``query_tar`` / ``pool_tar`` map a
    row to its ``tar`` row for stores of shard data (an array, or a dict of the rows the
    pairs name; None: every image is a file)."""
    from ..images import ImageSource

    query_images, pool_images = (root if isinstance(root, ImageSource) else ImageSource(root)
                                 for root in (query_root, pool_root))

    def features(images: ImageSource, keys: np.ndarray, tar: Any, row: int):
        try:
            data = images.read(str(keys[row]), None if tar is None else tar[row])
        except OSError:  # missing, or a shard that changed: the pair is not confirmed
            return None
        return sift_features(data)

    inliers = np.full(len(pairs), -1, dtype=np.int64)
    flags = np.zeros(len(pairs), dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, pairs.query_rows[1:] != pairs.query_rows[:-1]])
    groups = np.split(np.arange(len(pairs)), starts[1:]) if len(pairs) else []
    # A pool image near many queries (small or uniform data sets) is described once.
    pool_features = functools.lru_cache(maxsize=FEATURE_CACHE)(
        lambda row: features(pool_images, pool_keys, pool_tar, row))

    def one_query(members: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # The query's features are computed once for all of its candidates.
        query = features(query_images, query_keys, query_tar,
                         int(pairs.query_rows[members[0]]))
        counts = np.full(len(members), -1, dtype=np.int64)
        failed = np.full(len(members), QUERY_UNREADABLE if query is None else 0, dtype=np.int64)
        for i, pair in enumerate(members):
            candidate = pool_features(int(pairs.pool_rows[pair]))
            if candidate is None:
                failed[i] |= POOL_UNREADABLE
            elif query is not None:
                counts[i] = count_inliers(query, candidate, ratio=ratio)
        return members, counts, failed

    executor = ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1)
    try:
        with progress_bar(progress, len(pairs), "dedup: SIFT", unit="pairs") as bar:
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
                what = ("was written by a dedup run with other stores or stage-2 settings"
                        if lines[0].startswith(b"# ssld dedup progress ") else
                        "does not start with the header dedup writes (damaged)")
                raise ValueError(f"progress file {path} {what}: delete it to start stage 2 "
                                 "afresh")
            for number, line in enumerate(lines[1:], start=2):
                try:
                    query_row, pool_row, inliers, flags = map(int, line.split(b"\t"))
                except ValueError:   # every complete line was fsynced whole: this is damage
                    raise ValueError(
                        f"progress file {path} line {number} is damaged ({line[:40]!r}, not "
                        "'query_row<TAB>pool_row<TAB>inliers<TAB>flags'): delete it to "
                        "start stage 2 afresh") from None
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


def verify_shared(pairs: Candidates, query: LabelStore, pool: LabelStore, roots, dist: Dist,
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
                                      progress=progress and dist.is_main, on_group=on_group,
                                      query_tar=_tar_of(query, share.query_rows),
                                      pool_tar=_tar_of(pool, share.pool_rows))
    finally:
        if progress_file is not None:
            progress_file.close()
    for part, part_counts, part_flags in dist.gather((mine, counts, failed)):
        inliers[part], flags[part] = part_counts, part_flags
    return inliers, flags, int(known.sum())


def _tar_of(store: LabelStore, rows: np.ndarray) -> dict[int, np.ndarray] | None:
    """The ``tar`` rows of ``rows`` of a store of shard data, by row (None: files); only the
    rows the pairs name are read (a pool's whole array would be 32 B a row)."""
    if not store.tar_fields:
        return None
    rows = np.unique(rows)
    return dict(zip(rows.tolist(), store.read_tar(rows)))


def stage2_settings(query: LabelStore, pool: LabelStore, roots) -> dict:
    """What the stored inlier counts depend on: the two key lists and the SIFT settings."""
    def identity(store):
        dataset = store.attrs.get("dataset") or {}
        return {"rows": len(store), "fingerprint": dataset.get("fingerprint")}

    return {"query": identity(query), "pool": identity(pool), "roots": list(roots),
            "sift": [RATIO, RANSAC_PIXELS, MAX_SIDE, MIN_SIDE, MAX_KEYPOINTS,
                     CONTRAST_THRESHOLD]}
