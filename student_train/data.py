"""Batches for the trainer: the replay API (:mod:`student_train.dataset`) in DataLoaders, on
the device.

``train-student`` builds its training batches from the public pieces a user's own loop uses --
``StoreDataset``, ``ShardedSampler``, ``collate`` (docs/own-loop.md) -- adding only what a run
needs around them: unreadable images left out of their batch (:mod:`student_train.failures`),
normalisation on the device, the DALI path (:mod:`student_train.encoded`), and the checks and
validation set of a run. Batches are (images, ``SparseTargets`` or None, labels) on the device;
the loss makes the dense targets there.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from teacher_infer.imaging import pixels_to_input, resolve_decoder
from teacher_infer.runtime import cpus_per_rank, saved_class_names

from . import distributed as D
from .dataset import StoreDataset, check_replayable, collate
from .failures import BadImages, UnreadableImage
from .samples import Classes, SampleSet, open_source, open_stores, store_top1
from .sampling import ShardedSampler


class _Guarded(Dataset):
    """A :class:`StoreDataset` for the DataLoader workers: a sample whose image cannot be read
    becomes its placeholder, marked ``"path<TAB>reason"`` (``""`` when fine), instead of an
    exception in the worker (see :mod:`student_train.failures`)."""

    def __init__(self, crops: StoreDataset):
        self.crops = crops

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, key: tuple[int, int]):
        try:
            return (*self.crops[key], "")
        except UnreadableImage as exc:
            return (*self.crops.placeholder(key[1]), f"{exc.path}\t{exc.reason}")


def _guarded_collate(samples: list[tuple]):
    """:func:`~student_train.dataset.collate` of the samples, and their failure marks."""
    return (*collate([sample[:3] for sample in samples]), [sample[3] for sample in samples])


class DeviceBatches:
    """A DataLoader's uint8 batches as normalised float tensors on the device, without the
    rows whose image could not be read (``bad`` records them, or stops the run)."""

    def __init__(self, loader: DataLoader, device: torch.device, mean, std,
                 channels_last: bool, bad: BadImages):
        self.loader, self.device, self.channels_last = loader, device, channels_last
        self.dataset: StoreDataset = loader.dataset.crops   # the samples and their crops
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device)
        self.std = torch.tensor(std, dtype=torch.float32, device=device)
        self.bad = bad

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for pixels, targets, labels, failures in self.loader:
            keep = self.bad.keep(failures)
            if keep is not None:
                pixels, labels = pixels[keep], labels[keep]
                targets = None if targets is None else targets[keep]
            images = pixels_to_input(pixels.to(self.device, non_blocking=True), self.mean,
                                     self.std)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            yield (images, None if targets is None else targets.to(self.device, non_blocking=True),
                   labels.to(self.device, non_blocking=True))


@dataclass
class TrainData:
    """What the trainer iterates: ``train`` (an epoch of batches) and optional ``val``."""

    train: Any
    val: Any
    sampler: ShardedSampler
    bad_images: BadImages        # what both loaders left out since the trainer last asked
    num_classes: int
    num_train: int
    crop: str
    describe: dict[str, Any] = field(default_factory=dict)
    class_names: Optional[list] = None   # recorded in checkpoints: eval matches folders to them
    identity: list = field(default_factory=list)  # recorded in checkpoints: --resume compares

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)


def default_workers(env: D.DistEnv) -> int:
    """Worker processes per rank: this machine's cores shared by its ranks, at most 8."""
    return min(8, cpus_per_rank(env.dist))


def training_crop(cfg, samples: SampleSet) -> str:
    """The crop a run trains with (see the module docstring)."""
    if cfg.freeze_backbone:
        return "center"
    if not cfg.distill_from_stores or cfg.views == "global":
        return "random"
    if cfg.views == "replay":
        return "replay"
    return "replay" if max(s.num_views for s in samples.stores) > 1 else "random"


def build_data(cfg, env: D.DistEnv, data_config: dict[str, Any], *, log: logging.Logger,
               teacher_classes: Optional[int] = None) -> TrainData:
    """Open and check the training (and validation) data and build their loaders.

    With an online teacher, the student has the teacher's ``teacher_classes`` classes and
    the data must fit them; otherwise the stores (or the labeled source) set the count.
    """
    if cfg.stores:
        samples = open_stores(cfg.stores, env=env, roots=cfg.store_roots or None)
    else:
        classes = None
        if teacher_classes is not None:  # the teacher's class space: folders match its names
            classes = Classes(teacher_classes,
                              saved_class_names(cfg.teacher_checkpoint, teacher_classes),
                              f"--teacher-checkpoint {cfg.teacher_checkpoint}")
        samples = open_source(cfg.data, cfg.root, env=env, what="--data", classes=classes)
    if teacher_classes is not None:
        if samples.stores and samples.num_classes != teacher_classes:
            raise ValueError(f"label store {samples.stores[0].path} has {samples.num_classes} "
                             f"classes but the teacher has {teacher_classes}")
        if samples.labels.max() >= teacher_classes:
            raise ValueError(f"--data {cfg.data} has label {samples.labels.max()} but the "
                             f"teacher has {teacher_classes} classes")
        samples.num_classes = teacher_classes
    check_replayable(cfg.autoaugment, samples.stores or [])
    describe: dict[str, Any] = {"store_top1": store_top1(samples)}
    if describe["store_top1"] is not None:
        log.info(f"stored labels' view-0 top-1 vs ground truth: {100 * describe['store_top1']:.2f}%"
                 f" over {(samples.labels >= 0).sum():,} labeled rows")
    if cfg.supervised:
        labeled = samples.labels >= 0
        if not labeled.any():
            raise ValueError(f"--supervised needs ground-truth labels; "
                             f"{cfg.data or ', '.join(cfg.stores)} has none")
        samples = samples.subset(labeled)
    crop = training_crop(cfg, samples)
    decoder = resolve_decoder(cfg.decoder, env.device)
    workers = default_workers(env) if cfg.num_workers is None else cfg.num_workers
    channels_last = D.resolve_channels_last(cfg.channels_last, env.device)
    sampler = ShardedSampler(len(samples), rank=env.rank, world_size=env.world_size,
                             seed=cfg.seed, shuffle=True)
    if len(sampler) < cfg.batch_size:
        raise ValueError(f"{len(samples):,} training images give {len(sampler):,} per process, "
                         f"fewer than one batch of {cfg.batch_size}: lower --batch-size")
    train_set = StoreDataset.from_samples(samples, crop=crop, data_config=data_config,
                                          seed=cfg.seed, with_targets=cfg.distill_from_stores,
                                          crop_scale=cfg.crop_scale, autoaugment=cfg.autoaugment)
    bad_images = BadImages(cfg.bad_images, hint=f" (--bad-images stop; with --bad-images skip "
                           f"it is left out and listed in {cfg.out}/failed.txt)")
    batching = dict(batch_size=cfg.batch_size, workers=workers, env=env,
                    data_config=data_config, channels_last=channels_last, decoder=decoder,
                    bad=bad_images)
    train = make_batches(train_set, sampler, drop_last=True, **batching)
    val, identity = None, list(samples.identity)
    if cfg.val:
        val_samples = open_source(cfg.val, cfg.val_root, env=env, what="--val",
                                  classes=Classes.of(samples))
        val_samples = val_samples.subset(val_samples.labels >= 0)
        if len(val_samples) == 0:
            raise ValueError(f"--val {cfg.val} has no labeled images")
        if val_samples.labels.max() >= samples.num_classes:
            raise ValueError(f"--val {cfg.val} has label {val_samples.labels.max()} but the "
                             f"student has {samples.num_classes} classes")
        val_set = StoreDataset.from_samples(val_samples, crop="center", data_config=data_config,
                                            seed=cfg.seed, with_targets=False)
        val_sampler = ShardedSampler(len(val_samples), rank=env.rank,
                                     world_size=env.world_size, shuffle=False)
        val = make_batches(val_set, val_sampler, drop_last=False, **batching)
        describe["num_val"] = len(val_samples)
        identity += val_samples.identity
    describe.update(crop=crop, decoder=decoder.name, num_workers=workers,
                    num_train=len(samples))
    log.info(f"data: {len(samples):,} training images ({crop} crops, {decoder.name} decoding, "
             f"{workers} worker(s) per process)"
             + (f", {describe['num_val']:,} validation images" if val is not None else ""))
    return TrainData(train=train, val=val, sampler=sampler, bad_images=bad_images,
                     num_classes=samples.num_classes,
                     num_train=len(samples), crop=crop, describe=describe,
                     class_names=samples.class_names,
                     identity=identity)


def make_batches(dataset: StoreDataset, sampler: ShardedSampler, *, batch_size: int,
                 workers: int, env: D.DistEnv, data_config: dict[str, Any], channels_last: bool,
                 decoder: type, drop_last: bool, bad: BadImages):
    """Device batches of ``dataset`` in ``sampler`` order: rendered by PIL in the workers, or
    read as file bytes there and decoded on the device by ``decoder`` (a registry class,
    ``teacher_infer.imaging.resolve_decoder``). Samples whose image cannot be read are left
    out of their batch, or stop the run, as ``bad`` says."""
    if decoder.worker_mode == "bytes":
        from .encoded import EncodedBatches

        return EncodedBatches(dataset, sampler, decoder, batch_size=batch_size, workers=workers,
                              device=env.device, data_config=data_config,
                              channels_last=channels_last, drop_last=drop_last, bad=bad)
    loader = DataLoader(_Guarded(dataset), batch_size=batch_size, sampler=sampler,
                        num_workers=workers, drop_last=drop_last, collate_fn=_guarded_collate,
                        pin_memory=env.device.type == "cuda", persistent_workers=workers > 0)
    return DeviceBatches(loader, env.device, data_config["mean"], data_config["std"],
                         channels_last, bad)
