"""The configuration of one dedup run (no torch import here): every ``ssld dedup`` option is a
field, with its default and its choices, through ``config_option``."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..runtime.device import DEVICES, PRECISIONS
from .rules import RULES
from .search import DEFAULT_THRESHOLD, DEFAULT_TOP_M
from .sift import DEFAULT_MIN_INLIERS

VERIFY = ("sift", "none")


@dataclass
class DedupConfig:
    """What ``teacher_infer.dedup.dedup(cfg)`` runs; see that function for the output."""

    query: Any                          # store of the query set (e.g. val), with embeddings
    pool: Any                           # pool store with embeddings (path or LabelStore)
    out: str | None = None              # duplicate list to write ("-": stdout; None: none)
    # stage 1: per query the top_m pool rows with cosine similarity >= threshold
    threshold: float = DEFAULT_THRESHOLD
    top_m: int = DEFAULT_TOP_M
    # sift: confirm candidates on the images; none: report the stage-1 pairs
    verify: str = field(default="sift", metadata={"choices": VERIFY})
    min_inliers: int = DEFAULT_MIN_INLIERS   # RANSAC inliers that confirm a duplicate
    query_root: str | None = None       # image root of the query (default: its dataset.root)
    pool_root: str | None = None        # image root of the pool (default: its dataset.root)
    # best: drop confirmed matches; component: every connected component holding one
    rule: str = field(default="best", metadata={"choices": RULES})
    report_thresholds: tuple[float, ...] = ()   # of the per-rule report; () = threshold + steps
    # where stage 1 multiplies, and in what dtype (teacher_infer.runtime's rules); the result
    # is the same on every device and in every precision
    device: str = field(default="auto", metadata={"choices": DEVICES})
    precision: str = field(default="auto", metadata={"choices": PRECISIONS})
    query_batch: int = 4096             # queries per product of the numpy reference
    pool_batch: int | None = None       # pool rows per product; None: by memory (search.py)
    workers: int | None = None          # SIFT threads per process; None: threads
    threads: int | None = None          # CPU threads per process; None: the CPUs per rank
    progress: bool = False              # bars on rank 0, on a terminal (labelstore.progress_bar)

    def __post_init__(self) -> None:
        self.report_thresholds = tuple(float(t) for t in self.report_thresholds)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad value (called on construction)."""
        choices = {"verify": VERIFY, "rule": RULES, "device": DEVICES, "precision": PRECISIONS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name} must be one of {', '.join(allowed)}, got "
                                 f"{getattr(self, name)!r}")
        if not (math.isfinite(self.threshold) and -1.0 <= self.threshold <= 1.0):
            raise ValueError(f"--threshold must be a cosine similarity within [-1, 1], got "
                             f"{self.threshold}")
        for t in self.report_thresholds:
            if not (math.isfinite(t) and self.threshold <= t <= 1.0):
                raise ValueError(f"--report-threshold must be within [--threshold, 1] = "
                                 f"[{self.threshold:g}, 1] (pairs below --threshold are never "
                                 f"found), got {t:g}")
        # the options by their flags; query_batch and pool_batch have none (Python only)
        for name, flag in (("top_m", "--top-m"), ("min_inliers", "--min-inliers"),
                           ("query_batch", "query_batch"), ("pool_batch", "pool_batch"),
                           ("workers", "--num-workers"), ("threads", "--threads")):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
