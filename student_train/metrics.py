"""What a run reports: top-k counts, ``metrics.csv``, the log file, the final summary."""
from __future__ import annotations

import csv
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from labelstore import read_lines

COLUMNS = ("epoch", "lr", "train_loss", "val_top1", "val_top5", "ema_top1", "ema_top5",
           "agreement", "images_per_s", "epoch_s", "skipped")


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)
                 ) -> list[torch.Tensor]:
    """Number of rows whose label is among the top-k logits, for each k (k capped at C)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return [hits[:, :min(k, logits.shape[1])].any(dim=1).sum() for k in ks]


@dataclass
class _Throughput:
    images: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")


@dataclass
class EvalResult(_Throughput):
    """Top-1/top-5 accuracy (fractions) of a model on a data set, and its throughput."""

    top1: float = 0.0
    top5: float = 0.0

    def __str__(self) -> str:
        return (f"top-1 {100 * self.top1:.2f}%  top-5 {100 * self.top5:.2f}%  on {self.images:,} "
                f"images  ({self.images_per_s:,.0f} images/s)")


@dataclass
class EpochStats(_Throughput):
    """Global (all-rank) figures of one training epoch."""

    loss: float = float("nan")
    agreement: Optional[float] = None  # student top-1 == teacher top-1, None without a teacher
    lr: float = 0.0


@dataclass
class TrainResult:
    """What ``train(cfg)`` returns (and prints as its summary)."""

    run_dir: str
    epochs: int
    best_epoch: Optional[int]
    best_top1: Optional[float]
    last: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    images_per_s: float = 0.0
    store_top1: Optional[float] = None  # stored labels' own top-1 vs ground truth
    unreadable: int = 0                 # images left out because they could not be read

    def summary(self) -> str:
        lines = [f"run {self.run_dir}: {self.epochs} epoch(s) in {self.seconds:.1f} s, "
                 f"{self.images_per_s:,.0f} training images/s"]
        if self.best_top1 is not None:
            lines.append(f"best val top-1 {100 * self.best_top1:.2f}% (epoch {self.best_epoch})")
        last = {k: v for k, v in self.last.items() if v not in (None, "")}
        if last:
            lines.append("last epoch: " + ", ".join(f"{k} {_fmt(v)}" for k, v in last.items()))
        if self.store_top1 is not None:
            lines.append(f"stored labels' top-1 vs ground truth: {100 * self.store_top1:.2f}%")
        if self.unreadable:
            lines.append(f"images that could not be read, left out: {self.unreadable:,} (listed "
                         f"in {os.path.join(self.run_dir, 'failed.txt')})")
        lines.append(f"checkpoints: {os.path.join(self.run_dir, 'last.pt')}, best.pt")
        return "\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class MetricsCSV:
    """``metrics.csv``, one row per epoch; on resume, rows after the checkpoint are dropped
    (they belong to an epoch that ends up being trained again)."""

    def __init__(self, path: str, *, keep_epochs: int = 0):
        self.path = path
        rows = []
        if keep_epochs and os.path.exists(path):
            rows = [r for r in csv.DictReader(read_lines(path, "metrics file"))
                    if int(r["epoch"]) <= keep_epochs]
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    def append(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", newline="") as handle:
            csv.DictWriter(handle, COLUMNS).writerow(
                {k: ("" if row.get(k) is None else _csv_value(row[k])) for k in COLUMNS})


def _csv_value(value: Any) -> Any:
    return f"{value:.6g}" if isinstance(value, float) else value


def setup_logger(run_dir: Optional[str], *, is_main: bool) -> logging.Logger:
    """The ``ssld.train`` logger: INFO to stderr and ``RUN_DIR/train.log`` on rank 0 only.

    Records logged with ``extra={"file_only": True}`` (the final summary, which the command
    prints itself) go to the file only.
    """
    logger = logging.getLogger("ssld.train")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.propagate = False
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    if is_main:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(logging.Formatter("%(message)s"))
        stream.addFilter(lambda record: not getattr(record, "file_only", False))
        logger.addHandler(stream)
        if run_dir is not None:
            file = logging.FileHandler(os.path.join(run_dir, "train.log"))
            file.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
            logger.addHandler(file)
    return logger
