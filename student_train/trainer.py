"""The student trainer, top-down: ``train_one_epoch``, ``validate``, then ``train(cfg)``.

One code path for every device: the device, precision (autocast) and memory format are
parameters, and DDP is a wrapper that the loop never needs to know about.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

import labelstore
from labelstore import OutputLock, check_disjoint, is_store_dir, local_path, progress_bar

from teacher_infer.runtime import autocast, resolve_precision

from . import distributed as D
from .checkpoint import (changed_data, load_for_resume, make_checkpoint, rng_state, save_atomic,
                         set_rng_state)
from .config import TrainConfig
from .failures import FailedFile, gather_left_out
from .metrics import EpochStats, EvalResult, MetricsCSV, TrainResult, setup_logger, topk_correct
from .optim import build_optimizer, lr_at, make_ema, scale_lr, set_lr

# How often (steps) the loss is summed across ranks, checked for NaN/inf and shown by the bar:
# each check synchronises the device, so not every step.
CHECK_EVERY = 20


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint was kept."""


def train_one_epoch(model: nn.Module, batches: Iterable, loss_fn: Callable, optimizer,
                    lr_for_step: Callable[[int], float], *, first_step: int, env: D.DistEnv,
                    precision: str, scaler=None, ema=None, teacher: Optional[Callable] = None,
                    desc: str = "", images_per_step: int = 0, progress: bool = True
                    ) -> EpochStats:
    """One pass over ``batches`` of (images, teacher_probs, labels) already on the device;
    returns global (all-rank) figures.

    ``teacher_probs`` are the stores' ``SparseTargets`` (the loss makes the dense rows), or
    None when there are none in the data: then ``teacher`` (online distillation) computes
    them from the same images, or the loss uses ``labels`` only.
    ``images_per_step`` (all ranks) makes the progress bar count images: images/s and an ETA;
    ``progress`` asks for the bar (drawn on rank 0, on a terminal: ``labelstore.progress_bar``).
    """
    model.train()
    step, seen, with_teacher = first_step, 0, False
    totals = torch.zeros(3, dtype=torch.float64, device=env.device)  # loss·n, agreeing rows, n
    start = time.perf_counter()
    steps = len(batches)
    # On a terminal only: logs keep the one line per epoch instead.
    bar = progress_bar(env.is_main and progress, steps * (images_per_step or 1), desc,
                       unit="img" if images_per_step else "batch", unit_scale=False,
                       mininterval=0.5)
    lr = lr_for_step(step)
    for i, (images, teacher_probs, labels) in enumerate(batches):
        lr = lr_for_step(step)
        set_lr(optimizer, lr)
        with autocast(precision, env.device):
            if teacher is not None:
                teacher_probs = teacher(images)
            logits = model(images)
            # a batch whose every image was unreadable (left out) still takes its step on
            # every rank (DDP), with a zero loss instead of a mean over no rows (NaN)
            loss = loss_fn(logits, teacher_probs, labels) if len(images) else logits.sum() * 0
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
        if teacher_probs is not None:
            with_teacher = True
            totals[1] += (logits.detach().argmax(1) == teacher_probs.argmax(-1)).sum()
        bar.update(images_per_step or 1)
        if (i + 1) % CHECK_EVERY == 0 or i + 1 == steps:
            summed = D.all_reduce_sum(totals, env)  # every rank sees a NaN of any rank
            if not math.isfinite(summed[0].item()):
                raise TrainingDiverged(f"loss became {summed[0].item()} at step {step} ({desc})")
            seen = int(summed[2].item())
            bar.set_postfix(loss=f"{summed[0].item() / seen:.4f}", lr=f"{lr:.3g}", refresh=False)
    bar.close()
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
    care which one it runs; the teacher probabilities (None) are ignored.
    """

    def __init__(self, label_smoothing: float = 0.1):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, teacher_probs: Any,
                labels: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits.float(), labels.long(),
                                           label_smoothing=self.label_smoothing)


@torch.no_grad()
def validate(model: nn.Module, batches: Iterable, *, env: D.DistEnv, precision: str,
             desc: str = "eval", progress: bool = True) -> EvalResult:
    """Top-1/top-5 over all ranks' batches of (images, _, labels), and images/s."""
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=env.device)  # top-1, top-5, n
    start = time.perf_counter()
    total = len(batches) if hasattr(batches, "__len__") else None
    with progress_bar(env.is_main and progress, total, desc, unit="batch",
                      unit_scale=False) as bar:
        for images, _, labels in batches:
            with autocast(precision, env.device):
                logits = model(images)
            top1, top5 = topk_correct(logits.float(), labels)
            counts += torch.stack([top1, top5,
                                   torch.tensor(len(labels), device=env.device)]).double()
            bar.update(1)
    seconds = time.perf_counter() - start
    counts = D.all_reduce_sum(counts, env)
    n = int(counts[2].item())
    if n == 0:
        raise ValueError("the evaluation data set is empty")
    return EvalResult(top1=counts[0].item() / n, top5=counts[1].item() / n, images=n,
                      seconds=seconds)


def train(cfg: TrainConfig) -> TrainResult:
    """Train a student as ``cfg`` says; under ``torchrun`` every process calls this."""
    _check_out(cfg)
    env = D.setup(cfg.device, cfg.threads)
    lock = OutputLock(cfg.out, command="train-student")
    try:
        if env.is_main:  # one run per run directory; the processes of this run share it
            lock.acquire()
        return _train(cfg, env)
    finally:
        lock.release()
        D.teardown(env)


def _check_out(cfg: TrainConfig) -> None:
    """The run directory is no label store and overlaps no input (stores, images, files)."""
    local = local_path(cfg.out)
    if local is None:
        raise ValueError(f"--out {cfg.out}: the run directory must be a local path")
    if is_store_dir(local):
        raise ValueError(f"--out {cfg.out} is a label store; a run directory must be another "
                         "folder (e.g. runs/student)")
    roots, opened = list(cfg.store_roots), []
    for path in cfg.stores:
        try:
            opened.append(labelstore.open(path))
            if not cfg.store_roots:
                roots.append((opened[-1].attrs.get("dataset") or {}).get("root"))
        except (ValueError, FileNotFoundError):
            pass  # reported with its own message when the data is built
    from .dataset import check_replayable

    check_replayable(cfg.autoaugment, opened)  # before the run directory exists
    check_disjoint(cfg.out, {"a --store": list(cfg.stores), "the image root of a --store": roots,
                             "--data": cfg.data, "--root": cfg.root, "--val": cfg.val,
                             "--val-root": cfg.val_root, "--init": cfg.init,
                             "--teacher-checkpoint": cfg.teacher_checkpoint})


def _train(cfg: TrainConfig, env: D.DistEnv) -> TrainResult:
    # A run that stops before its first epoch (a refusal of its data or options, above all)
    # leaves nothing behind: the run folder it made, with its log, is removed again.
    made = env.is_main and not os.path.lexists(cfg.out)
    try:
        log = _open_run_dir(cfg, env)
        checkpoint = load_for_resume(cfg.out, cfg, write=env.is_main,
                                     log=log if env.is_main else None) if cfg.resume else None
        torch.manual_seed(cfg.seed)
        run = _build(cfg, env, log)  # every refusal about the data happens in here
        start_epoch, step, best = _restore(run, checkpoint)
        if env.is_main:
            _write_config(run)
        metrics = MetricsCSV(os.path.join(cfg.out, "metrics.csv"), keep_epochs=start_epoch) \
            if env.is_main else None
    except BaseException:
        if made:
            setup_logger(None, is_main=True)   # closes train.log
            shutil.rmtree(cfg.out, ignore_errors=True)
        raise

    images, seconds, last = 0, 0.0, {}
    for epoch in range(start_epoch, cfg.epochs):
        run.data.set_epoch(epoch)
        try:
            stats = train_one_epoch(run.net, run.data.train, run.loss_fn, run.optimizer,
                                    run.schedule, first_step=step, env=env,
                                    precision=run.precision, scaler=run.scaler, ema=run.ema,
                                    teacher=run.teacher, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                                    images_per_step=cfg.batch_size * env.world_size,
                                    progress=cfg.progress)
        except TrainingDiverged as exc:
            kept = (f"the last good checkpoint {os.path.join(cfg.out, 'last.pt')} (epoch "
                    f"{epoch}) is kept" if epoch else "no checkpoint was written")
            log.error(f"stopped: {exc}; {kept}")
            raise TrainingDiverged(f"{exc}; training stopped, {kept}") from None
        step += run.steps_per_epoch
        images, seconds = images + stats.images, seconds + stats.seconds
        last = _evaluate_epoch(run, epoch, stats)
        # with --val, only validated epochs compete for best.pt (no mixing with -loss)
        score = last.get("val_top1", None if run.data.val is not None else -stats.loss)
        improved = score is not None and score > best["score"]
        if improved:
            best = {"top1": last.get("val_top1"), "epoch": epoch + 1, "score": score}
        # The row goes first: a crash before the checkpoint repeats the epoch, and resuming
        # drops rows after the checkpoint's epoch, so no epoch's row is lost or doubled.
        if metrics is not None:
            metrics.append(last)
        _save(run, epoch=epoch + 1, step=step, best=best, row=last, improved=improved)
        log.info(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in last.items() if v is not None))

    result = TrainResult(run_dir=cfg.out, epochs=cfg.epochs, best_epoch=best["epoch"],
                         best_top1=best["top1"], last=last, seconds=seconds,
                         images_per_s=images / seconds if seconds else 0.0,
                         store_top1=run.data.describe.get("store_top1"),
                         unreadable=len(run.failed) if run.failed is not None else 0)
    log.info(result.summary(), extra={"file_only": True})
    return result


@dataclass
class _Run:
    """What a run is made of once built: what the loop, evaluation and checkpoints use."""

    cfg: TrainConfig
    env: D.DistEnv
    log: logging.Logger
    data: Any                    # data.TrainData
    model_name: str
    data_config: dict
    model: nn.Module             # the student itself (checkpoints, evaluation)
    net: nn.Module               # what trains: the student, or DDP around it
    teacher: Optional[nn.Module]
    failed: Optional[FailedFile]  # RUN_DIR/failed.txt, on rank 0
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Callable[[int], float]
    steps_per_epoch: int
    precision: str
    scaler: Any
    ema: Any


def _open_run_dir(cfg: TrainConfig, env: D.DistEnv) -> logging.Logger:
    if not cfg.resume and os.path.exists(os.path.join(cfg.out, "last.pt")):
        raise FileExistsError(f"{cfg.out} already holds a run (last.pt): pass --resume to "
                              "continue it, or choose another --out")
    if env.is_main:
        os.makedirs(cfg.out, exist_ok=True)
    D.barrier(env)
    return setup_logger(cfg.out, is_main=env.is_main)


def _build(cfg: TrainConfig, env: D.DistEnv, log: logging.Logger) -> _Run:
    """Data (with its checks), student, teacher, loss, optimizer and schedule."""
    from .data import build_data
    from .losses import DistillationLoss
    from .models import build_student, build_teacher, student_data_config

    precision = resolve_precision(cfg.precision, env.device)
    channels_last = D.resolve_channels_last(cfg.channels_last, env.device)
    model_name, data_config = student_data_config(cfg)
    teacher = None
    if cfg.teacher:
        teacher = build_teacher(cfg.teacher, cfg.teacher_checkpoint,
                                student_mean_std=(data_config["mean"], data_config["std"]),
                                device=env.device, channels_last=channels_last)
    data = build_data(cfg, env, data_config, log=log,
                      teacher_classes=None if teacher is None else teacher.model.num_classes)
    model = build_student(model_name, data.num_classes, init=cfg.init, log=log)
    model.to(env.device, memory_format=torch.channels_last if channels_last else
             torch.contiguous_format)
    loss_fn = HardLabelLoss(cfg.label_smoothing) if cfg.supervised else \
        DistillationLoss(cfg.loss, cfg.temperature, cfg.label_weight)
    # lr is given for 256 images per step: scale it to the global batch
    base_lr = scale_lr(cfg.lr, cfg.batch_size * env.world_size)
    optimizer = build_optimizer(model, lr=base_lr, weight_decay=cfg.weight_decay,
                                momentum=cfg.momentum, nesterov=cfg.nesterov,
                                lr_mult=cfg.lr_mult, freeze_backbone=cfg.freeze_backbone)
    steps_per_epoch = len(data.train)
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = min(round(cfg.warmup_epochs * steps_per_epoch), total_steps)
    schedule = partial(lr_at, total_steps=total_steps, warmup_steps=warmup_steps,
                       base_lr=base_lr)
    net = model
    if env.distributed:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[env.device] if env.device.type == "cuda" else None)
    log.info(f"{model_name}: {data.num_train:,} training images, {steps_per_epoch} steps of "
             f"{cfg.batch_size * env.world_size} per epoch, lr {base_lr:.4g}, {precision} on "
             f"{env.device}{f' × {env.world_size}' if env.distributed else ''}")
    return _Run(cfg=cfg, env=env, log=log, data=data, model_name=model_name,
                data_config=data_config, model=model, net=net, teacher=teacher,
                failed=FailedFile(cfg.out, resume=cfg.resume) if env.is_main else None,
                loss_fn=loss_fn, optimizer=optimizer, schedule=schedule,
                steps_per_epoch=steps_per_epoch, precision=precision,
                scaler=torch.amp.GradScaler("cuda") if precision == "fp16" else None,
                ema=make_ema(model, cfg.ema) if cfg.ema is not None else None)


def _restore(run: _Run, checkpoint: Optional[dict]) -> tuple[int, int, dict]:
    """(first epoch, global step, best-so-far) -- from the checkpoint when resuming."""
    if checkpoint is None:
        return 0, 0, {"top1": None, "epoch": None, "score": -math.inf}
    changed = changed_data(checkpoint.get("data"), run.data.identity)
    if changed:
        raise ValueError(f"--resume: {'; '.join(changed)} since "
                         f"{os.path.join(run.cfg.out, 'last.pt')} was written; resume with the "
                         "data the run started from, or start a new --out")
    if len(checkpoint["rng"]) != run.env.world_size:
        # another process count changes the global batch, the lr and every rank's samples
        raise ValueError(f"--resume: {run.cfg.out} was trained by {len(checkpoint['rng'])} "
                         f"process(es), this run has {run.env.world_size}; resume with the "
                         "same torchrun --nproc_per_node/--nnodes")
    run.model.load_state_dict(checkpoint["state_dict"])
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    if run.ema is not None:
        run.ema.module.load_state_dict(checkpoint["state_dict_ema"])
    if run.scaler is not None:
        run.scaler.load_state_dict(checkpoint["scaler"])
    set_rng_state(checkpoint["rng"][run.env.rank])
    run.log.info(f"resuming {run.cfg.out} after epoch {checkpoint['epoch']} "
                 f"(step {checkpoint['step']})")
    return checkpoint["epoch"], checkpoint["step"], checkpoint["best"]


def _write_config(run: _Run) -> None:
    """``config.json``: the options as given plus what they resolved to."""
    cfg, env = run.cfg, run.env
    resolved = {"model": run.model_name, "num_classes": run.data.num_classes,
                "data_config": run.data_config, "world_size": env.world_size,
                "global_batch": cfg.batch_size * env.world_size,
                "base_lr": scale_lr(cfg.lr, cfg.batch_size * env.world_size),
                "steps_per_epoch": run.steps_per_epoch, "precision": run.precision,
                "channels_last": D.resolve_channels_last(cfg.channels_last, env.device),
                "device": str(env.device), "threads": torch.get_num_threads(),
                **run.data.describe}
    with open(os.path.join(cfg.out, "config.json"), "w") as handle:
        json.dump({**cfg.to_dict(), "resolved": resolved}, handle, indent=2)


def _evaluate_epoch(run: _Run, epoch: int, stats: EpochStats) -> dict[str, Any]:
    """The epoch's metrics row; syncs batch-norm statistics and validates when asked."""
    D.broadcast_buffers(run.model, run.env)
    if run.ema is not None:
        D.broadcast_buffers(run.ema.module, run.env)
    row = {"epoch": epoch + 1, "lr": stats.lr, "train_loss": stats.loss,
           "agreement": stats.agreement, "images_per_s": stats.images_per_s,
           "epoch_s": stats.seconds}
    if run.data.val is not None and ((epoch + 1) % run.cfg.val_every == 0
                                     or epoch + 1 == run.cfg.epochs):
        result = validate(run.model, run.data.val, env=run.env, precision=run.precision,
                          progress=run.cfg.progress)
        row.update(val_top1=result.top1, val_top5=result.top5)
        if run.ema is not None:
            result = validate(run.ema.module, run.data.val, env=run.env,
                              precision=run.precision, desc="eval ema",
                              progress=run.cfg.progress)
            row.update(ema_top1=result.top1, ema_top5=result.top5)
    row["skipped"] = gather_left_out(run.data.bad_images, run.failed, run.env)
    if row["skipped"]:
        run.log.warning(f"epoch {epoch + 1}: {row['skipped']} image(s) could not be read and "
                        f"were left out ({os.path.join(run.cfg.out, 'failed.txt')} lists them)")
    return row


def _save(run: _Run, *, epoch: int, step: int, best: dict, row: dict, improved: bool) -> None:
    """``last.pt`` (and ``best.pt`` when improved) on rank 0, with every rank's RNG state."""
    rngs = D.all_gather(rng_state(), run.env)
    if run.env.is_main:
        state = make_checkpoint(model=run.model, ema=run.ema, optimizer=run.optimizer,
                                scaler=run.scaler, epoch=epoch, step=step, cfg=run.cfg,
                                model_name=run.model_name, num_classes=run.data.num_classes,
                                data_config=run.data_config, rng=rngs, best=best, metrics=row,
                                class_names=run.data.class_names, data=run.data.identity)
        save_atomic(state, os.path.join(run.cfg.out, "last.pt"))
        if improved:
            save_atomic(state, os.path.join(run.cfg.out, "best.pt"))
    D.barrier(run.env)
