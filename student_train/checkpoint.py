"""Run checkpoints: written atomically, resumed exactly, refused when the options changed.

A checkpoint is a plain dict that ``torch.load(..., weights_only=True)`` reads (tensors, numbers,
strings, lists, dicts -- no pickled classes) and that timm's ``load_checkpoint`` understands:
``state_dict`` holds the student's weights and ``state_dict_ema`` the EMA copy (or None).

``last.pt`` is replaced after every epoch and ``best.pt`` when the watched metric improves, each
through a temporary file in the same directory and ``os.replace``, so a crash or a full disk never
leaves a half-written checkpoint under either name.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
from typing import Any, Optional

import torch

from teacher_infer.runtime import saved_entries

from .config import TrainConfig, changed_options

FORMAT = "ssld.train-student"
FORMAT_VERSION = 1


class _WriteErrors:
    """A binary file for ``torch.save`` that keeps the ``OSError`` a write raised.

    torch's zip writer calls ``write`` from C++ and turns its exception into a
    ``RuntimeError`` ("unexpected pos ..."): kept here, the caller can raise what happened
    (``No space left on device``) instead.
    """

    def __init__(self, handle):
        self.handle = handle
        self.error: Optional[OSError] = None

    def write(self, data) -> int:
        try:
            return self.handle.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def __getattr__(self, name: str) -> Any:  # name, flush, fileno...: the file's own
        return getattr(self.handle, name)


def save_atomic(obj: dict[str, Any], path: str) -> None:
    """``torch.save`` to ``path`` through a temporary file, fsync and an atomic rename.

    A failed write (a full disk) is an ``OSError`` naming ``path`` with the errno of the
    failure, whether it surfaced from the write itself, from torch's writer (which reports
    it as a bare RuntimeError), or from the final flush, fsync or rename.
    """
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as handle:
            writer = _WriteErrors(handle)
            try:
                torch.save(obj, writer)
            except RuntimeError:
                if writer.error is None:
                    raise
                raise writer.error from None
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror or str(exc), path) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def rng_state() -> dict[str, Optional[torch.Tensor]]:
    """This process's torch RNG states (CPU and current CUDA device).

    Sample order, views and augmentation are seeded per sample from (seed, epoch, row), so the
    only stateful generators left are torch's (dropout, drop-path, classifier re-init).
    """
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(state: dict[str, Optional[torch.Tensor]]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def make_checkpoint(*, model: torch.nn.Module, ema: Optional[torch.nn.Module],
                    optimizer: torch.optim.Optimizer, scaler: Any, epoch: int, step: int,
                    cfg: TrainConfig, model_name: str, num_classes: int,
                    data_config: dict[str, Any], rng: list, best: dict[str, Any],
                    metrics: dict[str, Any], class_names: Optional[list] = None,
                    data: Optional[list] = None) -> dict[str, Any]:
    """The dict written to ``last.pt``/``best.pt``; ``epoch`` counts completed epochs."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_name": model_name,
        "num_classes": num_classes,
        "class_names": class_names,     # the training data's, where known: eval matches by name
        "data_config": data_config,     # eval preprocessing: input_size, mean, std, crop_pct, ...
        "state_dict": model.state_dict(),
        "state_dict_ema": None if ema is None else ema.module.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": None if scaler is None else scaler.state_dict(),
        "epoch": epoch,
        "step": step,
        "config": cfg.to_dict(),
        "data": data,                   # what the stores and sources held (changed_data)
        "rng": rng,                     # one entry per rank
        "best": best,
        "metrics": metrics,
    }


def read_checkpoint(path: str, what: str) -> Any:
    """``torch.load`` a checkpoint file; a truncated or garbage file is a ValueError naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # zip, pickle and EOF errors of a damaged file all look different
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise ValueError(f"{what}: {path} cannot be read (truncated or not a torch checkpoint: "
                         f"{reason})") from None


def load_for_resume(run_dir: str, cfg: TrainConfig, *, write: bool = True,
                    log: Optional[logging.Logger] = None) -> dict[str, Any]:
    """``RUN_DIR/last.pt``, after checking it belongs to this run with the same options.

    Raises FileNotFoundError when there is nothing to resume and ValueError naming every
    option that differs from the checkpoint's (changing them would silently train a
    different run than the one being continued). ``best.pt`` is brought in line with the
    checkpoint's record first (:func:`restore_best`; ``write`` on one process only).
    """
    path = os.path.join(run_dir, "last.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--resume: no checkpoint {path} to continue from")
    checkpoint = read_checkpoint(path, "--resume")
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise ValueError(f"--resume: {path} is not a train-student checkpoint")
    changes = changed_options(checkpoint["config"], cfg)
    if changes:
        raise ValueError(f"--resume: options differ from {path}: {'; '.join(changes)} "
                         "(resume with the original options, or start a new --out)")
    note = restore_best(run_dir, checkpoint, write=write)
    if note and log is not None:
        log.warning(note)
    if checkpoint["epoch"] >= cfg.epochs:
        raise ValueError(f"--resume: {path} already finished all {cfg.epochs} epochs"
                         + (f" ({note})" if note else ""))
    return checkpoint


def changed_data(saved: Optional[list], current: list) -> list[str]:
    """The data sources (label stores, ``--data``, ``--val``) whose content differs from what
    a checkpoint recorded, each as ``label store X (probs, indices differ)``.

    Options name the stores by path; a store rewritten at the same path (another teacher, a
    rerun with other settings) is only told apart by its label digests. Checkpoints written
    before digests were recorded (``saved`` None) cannot be checked.
    """
    if saved is None:
        return []
    now = {entry["path"]: entry for entry in current}
    changes = []
    for entry in saved:
        other = now.get(entry["path"])
        if other is None:
            continue  # a changed --store/--data/--val option: the options check names it
        old, new = entry.get("label_sha256") or {}, other.get("label_sha256") or {}
        differ = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if differ:
            changes.append(f"{other['what']} ({', '.join(differ)} differ)")
    return changes


def _saved_epoch(path: str) -> Optional[int]:
    """The ``epoch`` recorded in a checkpoint file; None when it is missing or unreadable."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(saved["epoch"])
    except Exception:
        return None


def restore_best(run_dir: str, checkpoint: dict[str, Any], *, write: bool) -> Optional[str]:
    """Make ``best.pt`` hold the epoch that ``checkpoint["best"]`` records; say what was done.

    ``last.pt`` is saved before ``best.pt``, so a save that fails in between (a full disk)
    leaves a ``last.pt`` whose best epoch is its own epoch while ``best.pt`` is older or
    missing: then ``best.pt`` is rewritten as a copy of ``last.pt``, the same state. A
    ``best.pt`` lost any other way cannot be rebuilt: the record is reset (in ``checkpoint``),
    so the next epoch writes a new ``best.pt`` and the run reports the best from here on.
    """
    best = checkpoint.get("best") or {}
    epoch = best.get("epoch")
    best_path = os.path.join(run_dir, "best.pt")
    if epoch is None or _saved_epoch(best_path) == epoch:
        return None
    if epoch == checkpoint["epoch"]:
        if write:
            tmp = f"{best_path}.tmp.{os.getpid()}"
            try:
                shutil.copyfile(os.path.join(run_dir, "last.pt"), tmp)
                os.replace(tmp, best_path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        return (f"{best_path} did not hold the best epoch {epoch} (an interrupted save): "
                "rewritten from last.pt, which is that epoch")
    checkpoint["best"] = {"top1": None, "epoch": None, "score": -math.inf}
    return (f"{best_path} (best epoch {epoch}) is missing or damaged and cannot be rebuilt; "
            "the best epoch from here on will be written as the new best.pt")


def saved_data_config(path: str) -> Optional[dict[str, Any]]:
    """The preprocessing a train-student checkpoint was trained with; None for other files.

    ``ssld eval`` uses it as the default, so a student trained at 64 px is evaluated at 64 px.
    Reading the weights themselves is teacher_infer's job (``teacher_infer.model``).
    """
    checkpoint = saved_entries(path) or {}
    return checkpoint.get("data_config") if checkpoint.get("format") == FORMAT else None
