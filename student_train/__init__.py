"""Student training: offline distillation from label stores.

>>> from student_train import TrainConfig, train            # doctest: +SKIP
>>> train(TrainConfig(student="mobilenetv3_large_100", stores=("train.zarr",), out="runs/a"))

``train(cfg)`` trains (under ``torchrun`` too) and returns a :class:`TrainResult`;
``evaluate(model, checkpoint, data)`` returns an :class:`EvalResult`. Attributes are imported
on first use, so ``import student_train`` (and ``ssld --help``) does not import torch.
"""
from __future__ import annotations

import importlib

__all__ = ["TrainConfig", "TrainResult", "EvalResult", "TrainingDiverged", "train", "evaluate"]

_WHERE = {"TrainConfig": "config", "TrainResult": "metrics", "EvalResult": "metrics",
          "TrainingDiverged": "trainer", "train": "trainer", "evaluate": "evaluation"}


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'student_train' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
