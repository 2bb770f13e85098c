"""Run checkpoints: written atomically, resumed exactly, refused when the options changed.

A checkpoint is a plain dict that ``torch.load(..., weights_only=True)`` reads (tensors, numbers,
strings, lists, dicts -- no pickled classes) and that timm's ``load_checkpoint`` understands:
``state_dict`` holds the student's weights and ``state_dict_ema`` the EMA copy (or None).

``last.pt`` is replaced after every epoch and ``best.pt`` when the watched metric improves, each
through a temporary file in the same directory and ``os.replace``, so a crash or a full disk never
leaves a half-written checkpoint under either name.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import torch

from .config import TrainConfig, changed_options

FORMAT = "ssld.train-student"
FORMAT_VERSION = 1


def save_atomic(obj: dict[str, Any], path: str) -> None:
    """``torch.save`` to ``path`` through a temporary file and an atomic rename."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
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
                    metrics: dict[str, Any]) -> dict[str, Any]:
    """The dict written to ``last.pt``/``best.pt``; ``epoch`` counts completed epochs."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_name": model_name,
        "num_classes": num_classes,
        "data_config": data_config,     # eval preprocessing: input_size, mean, std, crop_pct, ...
        "state_dict": model.state_dict(),
        "state_dict_ema": None if ema is None else ema.module.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": None if scaler is None else scaler.state_dict(),
        "epoch": epoch,
        "step": step,
        "config": cfg.to_dict(),
        "rng": rng,                     # one entry per rank
        "best": best,
        "metrics": metrics,
    }


def load_for_resume(run_dir: str, cfg: TrainConfig) -> dict[str, Any]:
    """``RUN_DIR/last.pt``, after checking it belongs to this run with the same options.

    Raises FileNotFoundError when there is nothing to resume and ValueError naming every
    option that differs from the checkpoint's (changing them would silently train a
    different run than the one being continued).
    """
    path = os.path.join(run_dir, "last.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--resume: no checkpoint {path} to continue from")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise ValueError(f"--resume: {path} is not a train-student checkpoint")
    changes = changed_options(checkpoint["config"], cfg)
    if changes:
        raise ValueError(f"--resume: options differ from {path}: {'; '.join(changes)} "
                         "(resume with the original options, or start a new --out)")
    if checkpoint["epoch"] >= cfg.epochs:
        raise ValueError(f"--resume: {path} already finished all {cfg.epochs} epochs")
    return checkpoint


def saved_data_config(path: str) -> Optional[dict[str, Any]]:
    """The preprocessing a train-student checkpoint was trained with; None for other files.

    ``ssld eval`` uses it as the default, so a student trained at 64 px is evaluated at 64 px.
    Reading the weights themselves is teacher_infer's job (``teacher_infer.model``).
    """
    if path.endswith(".safetensors") or not os.path.isfile(path):
        return None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a zip-format torch file: the weights reader reports it
        return None
    if isinstance(checkpoint, dict) and checkpoint.get("format") == FORMAT:
        return checkpoint.get("data_config")
    return None
