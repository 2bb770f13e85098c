"""Student training: offline distillation from label stores.

>>> from student_train import TrainConfig, train            # doctest: +SKIP
>>> train(TrainConfig(student="mobilenetv3_large_100", stores=("train.zarr",), out="runs/a"))

``train(cfg)`` trains (under ``torchrun`` too) and returns a :class:`TrainResult`;
``evaluate(model, checkpoint, data)`` returns an :class:`EvalResult`.

The replay API, for a training loop of your own (docs/own-loop.md), is what ``train`` itself
runs on: :class:`StoreDataset` (the views the teacher labeled, targets kept sparse),
:class:`ShardedSampler` (each rank's order, pure in seed and epoch), :func:`collate`,
:class:`SparseTargets`, the losses (:func:`js_divergence`, :func:`symmetric_kl`,
:func:`kl_divergence`, :func:`soft_cross_entropy`, :class:`DistillationLoss`), and
:func:`dali_batches` (the same batches decoded by DALI). Attributes are imported on first
use, so ``import student_train`` (and ``ssld --help``) does not import torch.
"""
from __future__ import annotations

import importlib

__all__ = ["TrainConfig", "TrainResult", "EvalResult", "TrainingDiverged", "train", "evaluate",
           "StoreDataset", "ShardedSampler", "collate", "SparseTargets", "js_divergence",
           "symmetric_kl", "kl_divergence", "soft_cross_entropy", "DistillationLoss",
           "dali_batches"]

_WHERE = {"TrainConfig": "config", "TrainResult": "metrics", "EvalResult": "metrics",
          "TrainingDiverged": "trainer", "train": "trainer", "evaluate": "evaluation",
          "StoreDataset": "dataset", "ShardedSampler": "sampling", "collate": "dataset",
          "SparseTargets": "targets", "js_divergence": "losses", "symmetric_kl": "losses",
          "kl_divergence": "losses", "soft_cross_entropy": "losses",
          "DistillationLoss": "losses", "dali_batches": "encoded"}


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'student_train' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
