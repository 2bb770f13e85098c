"""The student trainer, top-down: ``train_one_epoch``, ``validate``, then ``train(cfg)``.

One code path for every device: the device, precision (autocast) and memory format are
parameters, and DDP is a wrapper that the loop never needs to know about.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Callable, Iterable, Optional

import torch
from torch import nn
from tqdm import tqdm

from . import distributed as D
from .checkpoint import load_for_resume, make_checkpoint, rng_state, save_atomic, set_rng_state
from .config import TrainConfig
from .metrics import EpochStats, EvalResult, MetricsCSV, TrainResult, setup_logger, topk_correct
from .optim import build_optimizer, lr_at, make_ema, scale_lr, set_lr

# How often (steps) the loss is summed across ranks, checked for NaN/inf and shown by tqdm:
# each check synchronises the device, so not every step.
CHECK_EVERY = 20


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint was kept."""


def train_one_epoch(model: nn.Module, batches: Iterable, loss_fn: Callable, optimizer,
                    lr_for_step: Callable[[int], float], *, first_step: int, env: D.DistEnv,
                    precision: str, scaler=None, ema=None, teacher: Optional[Callable] = None,
                    desc: str = "") -> EpochStats:
    """One pass over ``batches`` of (images, teacher_probs, labels) already on the device;
    returns global (all-rank) figures.

    ``teacher_probs`` is empty (B, 0) when there are none in the data: then ``teacher`` (online
    distillation) computes them from the same images, or the loss uses ``labels`` only.
    """
    model.train()
    step, seen, with_teacher = first_step, 0, False
    totals = torch.zeros(3, dtype=torch.float64, device=env.device)  # loss·n, agreeing rows, n
    start = time.perf_counter()
    bar = tqdm(batches, desc=desc, unit="batch", leave=False, disable=not env.is_main or None)
    lr = lr_for_step(step)
    for i, (images, teacher_probs, labels) in enumerate(bar):
        lr = lr_for_step(step)
        set_lr(optimizer, lr)
        with D.autocast(precision, env.device):
            if teacher is not None:
                teacher_probs = teacher(images)
            logits = model(images)
            loss = loss_fn(logits, teacher_probs, labels)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        step += 1
        if ema is not None:
            ema.update(model, step=step)
        n = images.shape[0]
        totals[0] += loss.detach().double() * n
        totals[2] += n
        if teacher_probs.numel():
            with_teacher = True
            totals[1] += (logits.detach().argmax(1) == teacher_probs.argmax(1)).sum()
        if (i + 1) % CHECK_EVERY == 0 or i + 1 == len(bar):
            summed = D.all_reduce_sum(totals, env)  # every rank sees a NaN of any rank
            if not math.isfinite(summed[0].item()):
                raise TrainingDiverged(f"loss became {summed[0].item()} at step {step} ({desc})")
            seen = int(summed[2].item())
            bar.set_postfix(loss=f"{summed[0].item() / seen:.4f}", lr=f"{lr:.3g}",
                            img_s=f"{seen / (time.perf_counter() - start):.0f}")
    summed = D.all_reduce_sum(totals, env)
    seen = int(summed[2].item())
    if seen == 0:
        raise ValueError("an epoch had no batches: the training set is smaller than one batch")
    agreement = summed[1].item() / seen if with_teacher else None
    return EpochStats(loss=summed[0].item() / seen, agreement=agreement, images=seen,
                      seconds=time.perf_counter() - start, lr=lr)


class HardLabelLoss(nn.Module):
    """``--supervised``: cross-entropy on ground-truth labels with label smoothing.

    Same call signature as :class:`~student_train.losses.DistillationLoss` so the loop does not
    care which one it runs; the (empty) teacher probabilities are ignored.
    """

    def __init__(self, label_smoothing: float = 0.1):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, teacher_probs: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits.float(), labels.long(),
                                           label_smoothing=self.label_smoothing)


@torch.no_grad()
def validate(model: nn.Module, batches: Iterable, *, env: D.DistEnv, precision: str,
             desc: str = "eval") -> EvalResult:
    """Top-1/top-5 over all ranks' batches of (images, _, labels), and images/s."""
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=env.device)  # top-1, top-5, n
    start = time.perf_counter()
    for images, _, labels in tqdm(batches, desc=desc, unit="batch", leave=False,
                                  disable=not env.is_main or None):
        with D.autocast(precision, env.device):
            logits = model(images)
        top1, top5 = topk_correct(logits.float(), labels)
        counts += torch.stack([top1, top5, torch.tensor(len(labels), device=env.device)]).double()
    seconds = time.perf_counter() - start
    counts = D.all_reduce_sum(counts, env)
    n = int(counts[2].item())
    if n == 0:
        raise ValueError("the evaluation data set is empty")
    return EvalResult(top1=counts[0].item() / n, top5=counts[1].item() / n, images=n,
                      seconds=seconds)


def train(cfg: TrainConfig) -> TrainResult:
    """Train a student as ``cfg`` says; under ``torchrun`` every process calls this."""
    env = D.setup(cfg.device)
    try:
        return _train(cfg, env)
    finally:
        D.teardown(env)


def _train(cfg: TrainConfig, env: D.DistEnv) -> TrainResult:
    from .data import build_data
    from .models import build_student, build_teacher, student_data_config
    from .losses import DistillationLoss

    if env.is_main:
        os.makedirs(cfg.out, exist_ok=True)
    D.barrier(env)
    log = setup_logger(cfg.out, is_main=env.is_main)
    precision = D.resolve_precision(cfg.precision, env.device)
    channels_last = env.device.type == "cuda" if cfg.channels_last is None else cfg.channels_last
    checkpoint = load_for_resume(cfg.out, cfg) if cfg.resume else None
    if not cfg.resume and os.path.exists(os.path.join(cfg.out, "last.pt")):
        raise FileExistsError(f"{cfg.out} already holds a run (last.pt): pass --resume to "
                              "continue it, or choose another --out")
    torch.manual_seed(cfg.seed)

    # -- data: every refusal (incomplete store, class count, missing images) happens here
    model_name, data_config = student_data_config(cfg)
    data = build_data(cfg, env, data_config, log=log)
    model = build_student(model_name, data.num_classes, init=cfg.init, log=log)
    model.to(env.device, memory_format=torch.channels_last if channels_last else
             torch.contiguous_format)
    teacher = None
    if cfg.teacher:
        teacher = build_teacher(cfg.teacher, cfg.teacher_checkpoint, data.num_classes,
                                student_mean_std=(data_config["mean"], data_config["std"]),
                                device=env.device, channels_last=channels_last)

    # -- optimisation: lr given for 256 images, scaled to the global batch
    global_batch = cfg.batch_size * env.world_size
    base_lr = scale_lr(cfg.lr, global_batch)
    optimizer = build_optimizer(model, lr=base_lr, weight_decay=cfg.weight_decay,
                                momentum=cfg.momentum, nesterov=cfg.nesterov,
                                lr_mult=cfg.lr_mult, freeze_backbone=cfg.freeze_backbone)
    steps_per_epoch = len(data.train)
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = min(round(cfg.warmup_epochs * steps_per_epoch), total_steps)
    schedule = lambda step: lr_at(step, total_steps=total_steps,  # noqa: E731
                                  warmup_steps=warmup_steps, base_lr=base_lr)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    ema = make_ema(model, cfg.ema) if cfg.ema is not None else None
    if cfg.supervised:
        loss_fn = HardLabelLoss(cfg.label_smoothing)
    else:
        loss_fn = DistillationLoss(cfg.loss, cfg.temperature, cfg.label_weight)

    start_epoch, step, best = 0, 0, {"top1": None, "epoch": None, "score": -math.inf}
    if checkpoint is not None:
        model.load_state_dict(checkpoint["state_dict"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if ema is not None:
            ema.module.load_state_dict(checkpoint["state_dict_ema"])
        if scaler is not None:
            scaler.load_state_dict(checkpoint["scaler"])
        set_rng_state(checkpoint["rng"][env.rank])
        start_epoch, step, best = checkpoint["epoch"], checkpoint["step"], checkpoint["best"]
        log.info(f"resuming {cfg.out} after epoch {start_epoch} (step {step})")
    net = model
    if env.distributed:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device] if env.device.type == "cuda" else None)

    if env.is_main:
        resolved = {**cfg.to_dict(), "resolved": {
            "model": model_name, "num_classes": data.num_classes, "data_config": data_config,
            "world_size": env.world_size, "global_batch": global_batch, "base_lr": base_lr,
            "steps_per_epoch": steps_per_epoch, "precision": precision,
            "channels_last": channels_last, "device": str(env.device), **data.describe}}
        with open(os.path.join(cfg.out, "config.json"), "w") as handle:
            json.dump(resolved, handle, indent=2)
    metrics = MetricsCSV(os.path.join(cfg.out, "metrics.csv"), keep_epochs=start_epoch) \
        if env.is_main else None
    log.info(f"{model_name}: {data.num_train:,} training images, {steps_per_epoch} steps of "
             f"{global_batch} per epoch, lr {base_lr:.4g}, {precision} on {env.device}"
             f"{f' × {env.world_size}' if env.distributed else ''}")

    # -- the loop
    run_start, images_total, train_seconds, last = time.perf_counter(), 0, 0.0, {}
    for epoch in range(start_epoch, cfg.epochs):
        data.set_epoch(epoch)
        try:
            stats = train_one_epoch(net, data.train, loss_fn, optimizer, schedule,
                                    first_step=step, env=env, precision=precision, scaler=scaler,
                                    ema=ema, teacher=teacher,
                                    desc=f"epoch {epoch + 1}/{cfg.epochs}")
        except TrainingDiverged as exc:
            kept = (f"the last good checkpoint {os.path.join(cfg.out, 'last.pt')} (epoch "
                    f"{epoch}) is kept" if epoch else "no checkpoint was written")
            log.error(f"stopped: {exc}; {kept}")
            raise TrainingDiverged(f"{exc}; training stopped, {kept}") from None
        D.broadcast_buffers(model, env)
        if ema is not None:
            D.broadcast_buffers(ema.module, env)
        step += steps_per_epoch
        images_total += stats.images
        train_seconds += stats.seconds
        row = {"epoch": epoch + 1, "lr": stats.lr, "train_loss": stats.loss,
               "agreement": stats.agreement, "images_per_s": stats.images_per_s,
               "epoch_s": stats.seconds}
        if data.val is not None:
            result = validate(model, data.val, env=env, precision=precision)
            row.update(val_top1=result.top1, val_top5=result.top5)
            if ema is not None:
                result = validate(ema.module, data.val, env=env, precision=precision,
                                  desc="eval ema")
                row.update(ema_top1=result.top1, ema_top5=result.top5)
        score = row.get("val_top1", -stats.loss)
        improved = score > best["score"]
        if improved:
            best = {"top1": row.get("val_top1"), "epoch": epoch + 1, "score": score}
        rngs = D.all_gather(rng_state(), env)
        if env.is_main:
            state = make_checkpoint(model=model, ema=ema, optimizer=optimizer, scaler=scaler,
                                    epoch=epoch + 1, step=step, cfg=cfg, model_name=model_name,
                                    num_classes=data.num_classes, data_config=data_config,
                                    rng=rngs, best=best, metrics=row)
            save_atomic(state, os.path.join(cfg.out, "last.pt"))
            if improved:
                save_atomic(state, os.path.join(cfg.out, "best.pt"))
            metrics.append(row)
        D.barrier(env)
        log.info(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in row.items() if v is not None))
        last = row

    seconds = time.perf_counter() - run_start
    result = TrainResult(run_dir=cfg.out, epochs=cfg.epochs, best_epoch=best["epoch"],
                         best_top1=best["top1"], last=last, seconds=seconds,
                         images_per_s=images_total / train_seconds if train_seconds else 0.0,
                         store_top1=data.describe.get("store_top1"))
    log.info(result.summary())
    return result
