"""Batches for the trainer: crops (replayed, random or eval), teacher targets, labels.

A sample is cropped with a box (y0, x0, h, w as fractions of the decoded image) and a flip, then
resized to the input size -- with the teacher's own crop code (``teacher_infer.imaging``), so that
a replayed view is the region the teacher labeled, resampled the same way (at the teacher's
input size, views >= 1 are pixel-identical to what the teacher saw; view 0, which the teacher
renders with timm's two-step eval transform, differs by at most a grey level or two on a few
pixels):

- ``replay``: the box and flip of one stored view, chosen from (seed, epoch, index); the target
  is that view's teacher distribution (consistent teaching);
- ``random``: RandomResizedCrop + horizontal flip drawn from (seed, epoch, index); the target is
  view 0's distribution (SSLD's approximation, ``--views global``);
- ``center``: the evaluation crop (resize + center crop at crop_pct), for validation and for
  ``--freeze-backbone`` (FixRes: the same preprocessing for training and testing).

Workers return uint8 images; normalisation happens on the device (:class:`DeviceBatches`).
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

import labelstore
from teacher_infer.imaging import (DecodeError, ViewSpec, decode_rgb, eval_box,
                                   pixels_to_input, random_resized_crop_box, render_box,
                                   render_eval, resolve_decoder)
from teacher_infer.imaging.augment import AugmentSpec, ViewReplay, resolve_table
from teacher_infer.runtime import cpus_per_rank, saved_class_names

from . import distributed as D
from .sampling import ShardedSampler, replay_view, sample_rng
from .failures import BadImages, UnreadableImage
from .samples import Classes, SampleSet, open_source, open_stores, store_top1

CROP_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop aspect range (torchvision, timm, PaddleClas)
_EMPTY = torch.zeros(0)


class CropDataset(Dataset):
    """``dataset[(epoch, index)]`` → (uint8 (3, S, S) image, teacher probs (C,) or (0,), label).

    Parameters
    ----------
    samples : SampleSet
        Paths, labels and (for targets or replay) the label stores.
    crop : str
        ``replay``, ``random`` or ``center`` (see the module docstring).
    data_config : dict
        ``input_size``, ``interpolation``, ``mean``, ``crop_pct``, ``crop_mode`` of the student.
    with_targets : bool
        Return the stored teacher distribution of the sample's view.
    autoaugment : str, optional
        A timm AutoAugment/RandAugment/AugMix policy applied after the crop. It changes the
        pixels the teacher labeled, so it weakens replay's consistency (refused for stores
        with augmentation records).

    A replayed view of a store with augmentation records is the view the teacher labeled,
    records applied, mixing partner included (``teacher_infer.imaging.augment.ViewReplay``);
    a store with stored logits gives targets from them (``labelstore.densify_logits``).
    """

    def __init__(self, samples: SampleSet, *, crop: str, data_config: dict[str, Any], seed: int,
                 with_targets: bool, crop_scale: tuple[float, float] = (0.08, 1.0),
                 autoaugment: Optional[str] = None):
        if crop not in ("replay", "random", "center"):
            raise ValueError(f"crop must be replay, random or center, got {crop!r}")
        if (crop == "replay" or with_targets) and samples.stores is None:
            raise ValueError(f"crop={crop!r} / teacher targets need label stores")
        self.samples, self.crop, self.seed = samples, crop, seed
        self.with_targets, self.crop_scale = with_targets, tuple(crop_scale)
        size = int(data_config["input_size"])
        self.size, self.interpolation = (size, size), data_config["interpolation"]
        self.eval_spec = ViewSpec(views=1, input_size=self.size, crop_pct=data_config["crop_pct"],
                                  crop_mode=data_config.get("crop_mode", "center"))
        self.augment = None if autoaugment is None else \
            make_autoaugment(autoaugment, size, data_config)
        # stores with records: their views replayed as labeled (one per store, else None)
        self.replays = [None] * len(samples.stores or [])
        if crop == "replay":
            self.replays = [ViewReplay(store, root=images, input_size=size,
                                       interpolation=self.interpolation)
                            if store.augment_dims else None
                            for store, images in zip(samples.stores, samples.images)]

    def __len__(self) -> int:
        return len(self.samples)

    def view_of(self, epoch: int, index: int) -> int:
        """The stored view sample ``index`` shows in ``epoch`` (0 unless replaying)."""
        if self.crop != "replay":
            return 0
        store = self.samples.stores[self.samples.store_of[index]]
        return replay_view(self.seed, epoch, index, store.num_views)

    def plan(self, epoch: int, index: int, height: int, width: int):
        """(box, flip, view, stored row) of a sample whose decoded image is height × width."""
        samples = self.samples
        stored = None
        if self.crop == "replay" or self.with_targets:
            stored = samples.stores[samples.store_of[index]].read(int(samples.rows[index]))
        view = self.view_of(epoch, index)
        if self.crop == "replay":
            return stored.boxes[0, view], bool(stored.flips[0, view]), view, stored
        if self.crop == "random":
            rng = sample_rng(self.seed, epoch, index)
            box = random_resized_crop_box(rng, height, width, self.crop_scale, CROP_RATIO)
            return box, bool(rng.uniform() < 0.5), view, stored
        return eval_box(height, width, self.eval_spec), False, view, stored

    def target(self, stored, view: int, index: int | None = None) -> torch.Tensor:
        """The dense teacher distribution (C,) of a stored view, or an empty tensor; from
        the stored logits when the sample's store has them (``index``)."""
        if not self.with_targets:
            return _EMPTY
        store = None if index is None else self.samples.stores[self.samples.store_of[index]]
        if store is not None and store.has_logits:
            found = store.read_rows(int(self.samples.rows[index]), ("logits", "log_partition"))
            return torch.from_numpy(labelstore.densify_logits(
                stored.indices[:, view], found["logits"][:, view],
                found["log_partition"][:, view], self.samples.num_classes,
                float(store.attrs.get("temperature", 1.0)))[0])
        return torch.from_numpy(labelstore.densify(
            stored.indices[:, view], stored.probs[:, view], stored.residual[:, view],
            self.samples.num_classes)[0])

    def placeholder(self, index: int):
        """What a sample whose image cannot be read stands in with until its batch drops it:
        black pixels, a zero target, its label."""
        size = (3,) + self.size
        target = torch.zeros(self.samples.num_classes) if self.with_targets else _EMPTY
        return torch.zeros(size, dtype=torch.uint8), target, int(self.samples.labels[index])

    def replay_of(self, index: int) -> ViewReplay | None:
        """The replay of the sample's store when its views carry records (replay crops)."""
        if self.crop != "replay":
            return None
        return self.replays[self.samples.store_of[index]]

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        path = self.samples.path(index)
        try:  # a file, or the exact byte range its store records in a tar shard
            image = decode_rgb(self.samples.read(index))
        except DecodeError as exc:  # a store's row was valid when the teacher read it
            raise UnreadableImage(path, str(exc)) from None
        box, flip, view, stored = self.plan(epoch, index, image.height, image.width)
        replay = self.replay_of(index)
        if replay is not None:  # the view as labeled: records applied, partner included
            try:
                pixels = replay(int(self.samples.rows[index]), view, image)
            except DecodeError as exc:  # its mixing partner's image: the row is skipped too
                raise UnreadableImage(path, f"cannot replay its view: {exc}") from None
            return pixels, self.target(stored, view, index), int(self.samples.labels[index])
        if self.crop == "center":  # timm's own two steps: bit-identical to its eval transform
            crop = render_eval(image, self.eval_spec, self.interpolation)
        else:
            crop = render_box(image, box, flip, self.size, self.interpolation)
        if self.augment is not None:
            crop = self._autoaugment(crop, epoch, index)
        pixels = torch.from_numpy(np.array(crop, dtype=np.uint8)).permute(2, 0, 1).contiguous()
        return pixels, self.target(stored, view, index), int(self.samples.labels[index])

    def _autoaugment(self, crop, epoch: int, index: int):
        # timm's policies draw from the global `random` and `np.random`: seed them per sample
        # (so workers and resumes agree) and restore them afterwards.
        saved = random.getstate(), np.random.get_state()
        seed = int(sample_rng(self.seed, epoch, index).integers(2**32))
        random.seed(seed)
        np.random.seed(seed)
        try:
            return self.augment(crop)
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])


def make_autoaugment(policy: str, size: int, data_config: dict[str, Any]):
    """timm's AutoAugment (``original``, ``v0``...), RandAugment (``rand-m9-mstd0.5``) or
    AugMix (``augmix-m5``) on PIL images, with timm's hyper-parameters for ``size``."""
    from timm.data.auto_augment import (augment_and_mix_transform, auto_augment_transform,
                                        rand_augment_transform)
    from timm.data.transforms import str_to_pil_interp

    hparams = {"translate_const": int(size * 0.45),
               "img_mean": tuple(min(255, round(255 * m)) for m in data_config["mean"]),
               "interpolation": str_to_pil_interp(data_config["interpolation"])}
    try:
        if policy.startswith("rand"):
            return rand_augment_transform(policy, hparams)
        if policy.startswith("augmix"):
            return augment_and_mix_transform(policy, {**hparams, "translate_pct": 0.3})
        return auto_augment_transform(policy, hparams)
    except (AssertionError, KeyError, ValueError, IndexError) as exc:
        raise ValueError(f"--autoaugment {policy!r} is not a timm policy "
                         f"(e.g. rand-m9-mstd0.5, original, v0, augmix-m5): {exc}") from None


class _Guarded(Dataset):
    """A :class:`CropDataset` for the DataLoader workers: a sample whose image cannot be read
    becomes its placeholder, marked ``"path<TAB>reason"`` (``""`` when fine), instead of an
    exception in the worker (see :mod:`student_train.failures`)."""

    def __init__(self, crops: CropDataset):
        self.crops = crops

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, key: tuple[int, int]):
        try:
            return (*self.crops[key], "")
        except UnreadableImage as exc:
            return (*self.crops.placeholder(key[1]), f"{exc.path}\t{exc.reason}")


class DeviceBatches:
    """A DataLoader's uint8 batches as normalised float tensors on the device, without the
    rows whose image could not be read (``bad`` records them, or stops the run)."""

    def __init__(self, loader: DataLoader, device: torch.device, mean, std,
                 channels_last: bool, bad: BadImages):
        self.loader, self.device, self.channels_last = loader, device, channels_last
        self.dataset: CropDataset = loader.dataset.crops   # the samples and their crops
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device)
        self.std = torch.tensor(std, dtype=torch.float32, device=device)
        self.bad = bad

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for pixels, targets, labels, failures in self.loader:
            keep = self.bad.keep(failures)
            if keep is not None:
                pixels, targets, labels = pixels[keep], targets[keep], labels[keep]
            images = pixels_to_input(pixels.to(self.device, non_blocking=True), self.mean,
                                     self.std)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            yield (images, targets.to(self.device, non_blocking=True),
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


def check_replayable(cfg, stores) -> None:
    """ValueError (one line) for a store whose augmentation records this run cannot replay:
    settings or an ops table this ssld does not know, or ``--autoaugment``, which would
    change the pixels after the teacher labeled them (crop-only stores keep it)."""
    for store in stores:
        if not store.augment_dims:
            continue
        where = f"label store {store.path}"
        AugmentSpec.from_attrs(store.attrs.get("augment"), where=where)
        resolve_table((store.attrs.get("augment") or {}).get("ops_table"), where)
        if cfg.autoaugment:
            raise ValueError(f"--autoaugment {cfg.autoaugment}: {where} holds augmented views "
                             "whose records training replays; augmenting them again after the "
                             "teacher labeled them would break that consistency (leave "
                             "--autoaugment out)")


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
        samples = open_stores(cfg.stores, env=env)
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
    check_replayable(cfg, samples.stores or [])
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
    train_set = CropDataset(samples, crop=crop, data_config=data_config, seed=cfg.seed,
                            with_targets=cfg.distill_from_stores, crop_scale=cfg.crop_scale,
                            autoaugment=cfg.autoaugment)
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
        val_set = CropDataset(val_samples, crop="center", data_config=data_config,
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


def make_batches(dataset: CropDataset, sampler: ShardedSampler, *, batch_size: int,
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
                        num_workers=workers, drop_last=drop_last,
                        pin_memory=env.device.type == "cuda", persistent_workers=workers > 0)
    return DeviceBatches(loader, env.device, data_config["mean"], data_config["std"],
                         channels_last, bad)
