"""``ssld eval``: top-1/top-5 and throughput of a checkpoint on a labeled image source."""
from __future__ import annotations

import json
from typing import Optional

import torch

from . import distributed as D
from .checkpoint import saved_data_config
from .config import EVAL_BATCH_SIZE
from .metrics import EvalResult


def evaluate(model: str, checkpoint: str, data: str, *, root: Optional[str] = None,
             input_size: Optional[int] = None, batch_size: int = EVAL_BATCH_SIZE,
             device: str = "auto", decoder: str = "auto", precision: str = "auto",
             num_workers: Optional[int] = None, channels_last: Optional[bool] = None,
             threads: Optional[int] = None, progress: bool = True) -> EvalResult:
    """Evaluate ``checkpoint`` (a train-student checkpoint or a plain state dict) on ``data``.

    Images get the model's evaluation preprocessing (resize + center crop at its crop_pct) at
    ``input_size``, which defaults to the size a train-student checkpoint was trained at, else
    the model's pretrained-config size. The class count is read from the checkpoint's
    classifier. Weights are read as ``infer-teacher --checkpoint`` reads them: a checkpoint's
    EMA weights are preferred when it has them (timm's rule).

    Returns an :class:`EvalResult` (fractions and images/s); runs under ``torchrun`` too,
    each rank evaluating a disjoint share, on ``threads`` CPU threads per rank (None: the CPUs
    available per rank); ``progress``: a bar on rank 0 (on a terminal).
    """
    from teacher_infer import resolve_model_name
    from teacher_infer.imaging import resolve_decoder
    from teacher_infer.runtime import resolve_precision, saved_class_names

    from .data import default_workers, make_batches
    from .dataset import StoreDataset
    from .failures import BadImages
    from .models import data_config_for, load_model
    from .samples import Classes, open_source
    from .sampling import ShardedSampler
    from .trainer import validate

    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    env = D.setup(device, threads)
    try:
        name = resolve_model_name(model)
        if input_size is None:
            input_size = (saved_data_config(checkpoint) or {}).get("input_size")
        data_config = data_config_for(name, input_size)
        net = load_model(name, checkpoint)
        samples = open_source(data, root, env=env, what="--data", classes=Classes(
            net.num_classes, saved_class_names(checkpoint, net.num_classes),
            f"--checkpoint {checkpoint}"))
        samples = samples.subset(samples.labels >= 0)
        num_classes = net.num_classes
        if len(samples) == 0:
            raise ValueError(f"--data {data} has no labeled images to evaluate on")
        if samples.labels.max() >= num_classes:
            raise ValueError(f"--data {data} has label {samples.labels.max()} but the checkpoint "
                             f"has {num_classes} classes")
        channels_last = D.resolve_channels_last(channels_last, env.device)
        net.to(env.device, memory_format=torch.channels_last if channels_last
               else torch.contiguous_format)
        dataset = StoreDataset.from_samples(samples, crop="center", data_config=data_config,
                                            seed=0, with_targets=False)
        sampler = ShardedSampler(len(samples), rank=env.rank, world_size=env.world_size,
                                 shuffle=False)
        workers = default_workers(env) if num_workers is None else num_workers
        batches = make_batches(dataset, sampler, batch_size=batch_size, workers=workers,
                               env=env, data_config=data_config, channels_last=channels_last,
                               decoder=resolve_decoder(decoder, env.device), drop_last=False,
                               bad=BadImages("stop"))  # a score over every image, or none
        return validate(net, batches, env=env, precision=resolve_precision(precision,
                                                                             env.device),
                        progress=progress)
    finally:
        D.teardown(env)


def report(result: EvalResult, model: str, checkpoint: str, data: str, *,
           as_json: bool = False) -> str:
    """What ``ssld eval`` prints: one line, or (``as_json``) one JSON object for scripts."""
    if not as_json:
        return f"{model} {checkpoint}: {result}"
    return json.dumps({"model": model, "checkpoint": checkpoint, "data": data,
                       "top1": result.top1, "top5": result.top5, "images": result.images,
                       "seconds": result.seconds, "images_per_s": result.images_per_s})
