"""dedup: near-duplicates of a query set (e.g. the validation set) inside a pool.

Stage 1 (:mod:`.search`) finds candidates by exact cosine similarity of the stored teacher
embeddings: the pool is streamed in blocks through the prefetching reader and multiplied, with
torch on the CPU or a GPU, against the normalised query embeddings held on the device, keeping
per query the ``top_m`` most similar pool rows above ``threshold``. Stage 2 (:mod:`.sift`)
verifies each candidate pair on the images with SIFT keypoints (OpenCV), Lowe's ratio test and
a RANSAC homography. Under ``torchrun`` both stages are shared by the ranks; stage 2 keeps its
results in progress files, so a killed run resumes. The output lists the pairs the rule
(:mod:`.rules`) drops, pool key first, so it is a valid ``select-topk --exclude`` file.
"""
from __future__ import annotations

import datetime
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import labelstore
from labelstore import (LabelStore, OutputLock, check_disjoint, check_output_file, local_path,
                        read_text)

from ..roots import check_image_root
from ..runtime import Dist, resolve_device, set_threads
from .config import DedupConfig
from .rules import removed_pairs, report_thresholds, rule_report
from .search import Candidates, require_embeddings, search
from .sift import (POOL_UNREADABLE, QUERY_UNREADABLE, Progress, stage2_settings,
                   verify_shared)

# Ranks wait for each other at the end of stage 1 and of stage 2; uneven shares of a 14 M-row
# pool can differ by far more than gloo's default 30 minutes.
GROUP_TIMEOUT = datetime.timedelta(hours=12)


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
    # each of them: (query | pool, key, why); their pairs could not be confirmed
    unreadable: list[tuple[str, str, str]] = field(default_factory=list)
    unreadable_pairs: int = 0          # candidate pairs with an image that could not be read
    # valid rows with an all-zero embedding, which could not be compared, by role
    not_compared: dict[str, list[str]] = field(default_factory=dict)
    rules: list[dict] = field(default_factory=list)    # per threshold: images each rule removes
    seconds_search: float = 0.0
    seconds_verify: float = 0.0

    @property
    def duplicates(self) -> int:
        return len(self.pool_keys)

    def lines(self) -> list[str]:
        """The output file: a header comment, then ``pool_key\\tquery_key\\tcosine\\tinliers``,
        then, as comments (so that it stays an exclude file), every image that could not be
        read and every row that could not be compared."""
        head = [f"# ssld dedup: query={self.query} pool={self.pool} threshold={self.threshold} "
                f"verify={self.verify} min_inliers={self.min_inliers} rule={self.rule}",
                "# pool_key\tquery_key\tcosine\tinliers"]
        tail = [f"# unreadable (its pairs are not confirmed): {role}\t{key}\t{why}"
                for role, key, why in self.unreadable]
        tail += [f"# not compared (all-zero embedding): {role}\t{key}"
                 for role, keys in self.not_compared.items() for key in keys]
        return head + [f"{p}\t{q}\t{c:.4f}\t{i if i >= 0 else '-'}" for p, q, c, i in
                       zip(self.pool_keys, self.query_keys, self.cosines, self.inliers)] + tail

    def to_dict(self) -> dict:
        """The per-threshold report written beside the output (``OUT.rules.json``)."""
        return {"query": self.query, "pool": self.pool, "threshold": self.threshold,
                "verify": self.verify, "min_inliers": self.min_inliers, "rule": self.rule,
                "candidates": self.candidates, "confirmed": self.confirmed,
                "excluded_pool_images": len(set(self.pool_keys)), "thresholds": self.rules,
                "unreadable": [{"role": role, "key": key, "reason": why}
                               for role, key, why in self.unreadable],
                "not_compared": self.not_compared}

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
            shown = ", ".join(f"{role} {key} ({why})" for role, key, why in self.unreadable[:3])
            more = self.unreadable_images - min(3, len(self.unreadable))
            lines.append(f"warning: {self.unreadable_images:,} images could not be read, so "
                         f"{self.unreadable_pairs:,} candidate pairs were not confirmed: "
                         f"{shown}{f' and {more:,} more' if more else ''} (all listed in the "
                         "output)")
        if any(self.not_compared.values()):
            query, pool = (self.not_compared.get(role, []) for role in ("query", "pool"))
            first = ", ".join(f"{role} {keys[0]}" for role, keys in (("query", query),
                                                                     ("pool", pool)) if keys)
            lines.append(f"warning: {_rows(len(query), 'query')} and {_rows(len(pool), 'pool')} "
                         f"{'has' if len(query) + len(pool) == 1 else 'have'} an all-zero "
                         f"embedding and were not compared (first: {first}); their duplicates "
                         "cannot be found")
        return "\n".join(lines)


def _rows(count: int, role: str) -> str:
    return f"{count:,} {role} row{'' if count == 1 else 's'}"


def dedup(cfg: DedupConfig) -> DedupResult:
    """Find near-duplicates of ``cfg.query`` rows inside ``cfg.pool`` (see
    :class:`~.config.DedupConfig` for every setting).

    Under ``torchrun`` every rank searches a share of the pool blocks and verifies a share of
    the candidate pairs; rank 0 merges and writes ``cfg.out``; every rank returns the same
    result.

    - ``query``, ``pool``: stores written with embeddings (``ssld infer-teacher
      --embeddings``); a query given as an image folder is not embedded here (run
      infer-teacher on it first).
    - ``out``: a header comment, then one line per listed pair ``pool_key<TAB>query_key<TAB>
      cosine<TAB>inliers``, usable as ``select-topk --exclude`` as is (``-``: stdout). Beside
      a file output: the rule report ``OUT.rules.json`` and, while stage 2 runs,
      ``OUT.progress.RANK`` files from which a killed run resumes.
    - stage 1 keeps, per query, the ``top_m`` most similar pool rows with cosine similarity
      >= ``threshold`` (exact, ties to the lower pool row), on ``device`` in ``precision``
      (the result is the same; only the speed changes).
    - ``verify="sift"`` reads both images (``dataset.root`` + key, or the ``*_root``
      overrides; a row of shard data from its shard by the offset its store records) and
      confirms a pair with >= ``min_inliers`` RANSAC inliers; ``"none"``
      confirms every stage-1 pair.
    - ``rule="best"`` lists the confirmed pairs; ``"component"`` every pair of a connected
      component (of pairs >= threshold) that holds a confirmed one; ``report_thresholds``
      (>= threshold; default: threshold and +0.05, +0.1, +0.15) are those of the per-rule
      report.
    - ``threads`` CPU threads per process (``teacher_infer.runtime.set_threads``; SIFT runs
      ``workers`` of them at once, default ``threads``).
    """
    query_store, pool_store = (_open_embedded(cfg.query, "query"),
                               _open_embedded(cfg.pool, "pool"))
    roots = None
    if cfg.verify == "sift":   # the roots must hold the keys: checked before the search
        roots = (_image_root(query_store, cfg.query_root, "query"),
                 _image_root(pool_store, cfg.pool_root, "pool"))
    if cfg.out is not None and str(cfg.out) != "-":
        _check_out(cfg.out, {"--query": query_store.path, "--pool": pool_store.path,
                             "an image root": list(roots or ())})
    dist = Dist.from_env()
    threads = set_threads(cfg.threads, dist)
    import torch

    device = resolve_device(cfg.device, dist)
    # object collectives only (stage 1 exchanges no tensors): gloo, whatever the device
    owns_group = dist.init(torch.device("cpu"), timeout=GROUP_TIMEOUT)
    # one run per output: two runs would append to the same stage-2 progress files and
    # replace each other's list (OUT.lock beside OUT; none for stdout or object storage)
    lock = OutputLock(cfg.out, command="dedup") if cfg.out is not None and \
        str(cfg.out) != "-" else None
    try:
        if lock is not None:
            dist.on_main(lock.acquire)  # the ranks of this run share the output
        return _run(cfg, query_store, pool_store, dist, roots, device,
                    workers=cfg.workers or threads)
    finally:
        if lock is not None:
            lock.release()
        if owns_group:
            dist.close()


def _run(cfg: DedupConfig, query_store: LabelStore, pool_store: LabelStore, dist: Dist, roots,
         device, workers: int) -> DedupResult:
    started = time.perf_counter()
    threshold, top_m, out = float(cfg.threshold), int(cfg.top_m), cfg.out
    pairs = search(query_store, pool_store, threshold=threshold, top_m=top_m, device=device,
                   precision=cfg.precision, query_batch=int(cfg.query_batch),
                   pool_batch=cfg.pool_batch,
                   part=(dist.rank, dist.world_size) if dist.enabled else None,
                   progress=cfg.progress and dist.is_main)
    if dist.enabled:
        pairs = Candidates.best_of(dist.gather(pairs), top_m)
    searched = time.perf_counter()
    query_keys, pool_keys = query_store.keys, pool_store.keys
    resumed, unreadable, unreadable_pairs, progress_file = 0, [], 0, None
    if roots is None:
        inliers, confirmed = np.full(len(pairs), -1), np.ones(len(pairs), dtype=bool)
    else:
        if out is not None and str(out) != "-" and local_path(out) is not None:
            # object storage cannot append: there stage 2 starts afresh when rerun
            progress_file = Progress(out, stage2_settings(query_store, pool_store, roots))
        inliers, flags, resumed = verify_shared(pairs, query_store, pool_store, roots, dist,
                                                progress_file, workers=workers,
                                                progress=cfg.progress)
        confirmed = inliers >= cfg.min_inliers
        unreadable = _unreadable(pairs, flags, (query_store, pool_store), roots)
        unreadable_pairs = int((flags > 0).sum())
    listed = removed_pairs(pairs, confirmed, cfg.rule, threshold)
    result = DedupResult(
        query=query_store.path, pool=pool_store.path, threshold=threshold, verify=cfg.verify,
        min_inliers=cfg.min_inliers, queries=len(query_store), pool_rows=len(pool_store),
        candidates=len(pairs), rule=cfg.rule, device=str(device), world_size=dist.world_size,
        pool_keys=pool_keys[pairs.pool_rows[listed]].tolist(),
        query_keys=query_keys[pairs.query_rows[listed]].tolist(),
        cosines=pairs.cosines[listed].tolist(), inliers=inliers[listed].tolist(),
        confirmed=int(confirmed.sum()), resumed_pairs=resumed,
        unreadable_images=len(unreadable), unreadable=unreadable,
        unreadable_pairs=unreadable_pairs,
        not_compared={"query": query_keys[pairs.unusable_queries].tolist(),
                      "pool": pool_keys[pairs.unusable_pool].tolist()},
        rules=rule_report(pairs, confirmed,
                          report_thresholds(threshold, list(cfg.report_thresholds) or None)),
        seconds_search=searched - started, seconds_verify=time.perf_counter() - searched)
    if dist.is_main and out is not None:
        _write_outputs(result, str(out), progress_file)
    dist.barrier()
    return result


def _check_out(out: str, inputs: dict) -> None:
    """Before the search: ``out`` (a path or an fsspec URL) can be written, overlaps no
    input, and replaces only an earlier dedup output (its first line is the header this
    command writes)."""
    import fsspec

    check_output_file(str(out), "--out")  # not a folder; its folder (or bucket) exists
    check_disjoint(out, inputs)
    if labelstore.exists(out):
        local = local_path(out)
        try:
            ours = read_text(out, "dedup output").startswith("# ssld dedup:")
        except (OSError, ValueError):  # a folder, unreadable, not UTF-8: not ours
            ours = False
        if not ours or (local is not None and not os.path.isfile(local)):
            raise ValueError(f"--out {out} exists and is not an ssld dedup output; refusing to "
                             "replace it (remove it yourself or choose another --out)")


def _write_outputs(result: DedupResult, out: str, progress_file: Progress | None) -> None:
    """The list and its rule report beside it (``OUT.rules.json``), on a local disk or on
    object storage alike."""
    import fsspec

    text = "\n".join(result.lines()) + "\n"
    if out == "-":
        sys.stdout.write(text)
        return
    with fsspec.open(out, "w", encoding="utf-8") as handle:
        handle.write(text)
    with fsspec.open(out + ".rules.json", "w", encoding="utf-8") as handle:
        json.dump(result.to_dict(), handle, indent=2)
        handle.write("\n")
    if progress_file is not None:   # the output holds every result now
        progress_file.remove()


def _unreadable(pairs, flags: np.ndarray, stores, roots) -> list[tuple[str, str, str]]:
    """(role, key, why) of every image stage 2 could not read, queries first: ``missing``
    (no file, or its shard missing or changed since the teacher pass) or ``cannot be
    decoded``."""
    from ..images import ImageSource

    found = []
    for role, bit, pair_rows, store, root in (
            ("query", QUERY_UNREADABLE, pairs.query_rows, stores[0], roots[0]),
            ("pool", POOL_UNREADABLE, pairs.pool_rows, stores[1], roots[1])):
        rows = np.unique(pair_rows[(flags & bit) > 0])
        if not len(rows):
            continue
        images = ImageSource(str(root))
        keys = [str(key) for key in store.keys[rows]]
        tar = store.read_tar(rows) if store.tar_fields else None
        for i, key in enumerate(keys):   # few: the images that failed
            missing, _ = images.problems(keys, tar, rows=[i], limit=0)
            found.append((role, key, "missing" if missing else "cannot be decoded"))
    return found


def _image_root(store: LabelStore, override: str | None, role: str) -> str:
    """The folder stage 2 reads ``role``'s images from; refused before the search unless it
    holds the store's keys (``teacher_infer.roots``)."""
    root = override or (store.attrs.get("dataset") or {}).get("root")
    if not root:
        raise ValueError(f"{role} store {store.path} records no dataset.root: pass --{role}-root "
                         "(or --verify none)")
    check_image_root(str(root), store, option=f"--{role}-root", given=override is not None,
                     name=f"the {role} store {store.path}")
    return str(root)


def _open_embedded(source: Any, role: str) -> LabelStore:
    if isinstance(source, LabelStore):
        store = source
    else:
        path = str(source)
        if os.path.isdir(path) and not os.path.exists(os.path.join(path, "zarr.json")):
            raise ValueError(f"--{role} {path} is an image folder, not a label store: embed it "
                             "first with `ssld infer-teacher --data ... --embeddings --out "
                             f"{role}.zarr`")
        store = labelstore.open(path)
    store.require_complete()
    require_embeddings(store, role)
    return store
