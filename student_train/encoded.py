"""Training and evaluation batches decoded on the device (``--decoder dali``, or any registry
decoder whose ``worker_mode`` is ``"bytes"``).

:func:`dali_batches` is the public entry point (a user's own loop: docs/own-loop.md); the
trainer's ``--decoder dali`` runs the same :class:`EncodedBatches`.

DataLoader workers only read image bytes (files, or byte ranges of tar shards) and headers and
plan each sample's crop (the same :meth:`StoreDataset.plan` as the PIL path: replayed box,
RandomResizedCrop or eval box), through the teacher pass's own
:func:`teacher_infer.imaging.read_encoded`; the decoder (DALI:
``mixed``, nvJPEG on the GPU; CPU mode without one) decodes, resamples the box, flips and
normalises. Formats DALI cannot read are rendered by PIL in the worker, as in teacher
inference.

Boxes go to the decoder on the store's uint16 grid: a replayed box is exactly the stored one,
and a random or eval box moves by at most 1/65535 of the image. Targets and labels are the PIL
path's exactly; pixels differ where the two resamplers round their 8-bit passes apart: under
half a grey level (of 255) on average, under 1 % of values by more than 2 levels, a few
levels at most on steep edges (tests/test_replay_api.py).
"""
from __future__ import annotations

from collections import deque
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from teacher_infer.imaging import (Batch, DecodeError, Item, ViewSpec, collate, quantize_inside,
                                   read_encoded, render_box)
from teacher_infer.imaging.augment import ViewRecords
from teacher_infer.imaging.decode import render_view

from .failures import BadImages
from .targets import SparseTargets


class _PlannedBytes(Dataset):
    """``(epoch, index)`` → (item, path, target, label): a
    :class:`~student_train.dataset.StoreDataset` sample before decoding, its one view as an
    ``imaging.Item`` (file bytes and the planned box, or PIL pixels). A file that cannot be
    read is an invalid item with its reason, as in the teacher pass: never an exception in
    the worker."""

    def __init__(self, crops, record_dims: dict[str, int] | None = None):
        if crops.augment is not None:
            raise ValueError("--autoaugment works on PIL images: use --decoder pil with it")
        self.crops = crops
        # with records in any store, every item carries (1,) records of these sizes (empty
        # for crop-only rows) and its partner; the decoder applies them on the device
        self.record_dims = record_dims

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        crops = self.crops
        path = crops.samples.path(index)
        chosen = {}

        def plan(height: int, width: int):
            box, flip, view, stored = crops.plan(epoch, index, height, width)
            chosen.update(view=view, stored=stored)
            return quantize_inside(np.asarray(box, dtype=np.float64)[None]), np.array([flip])

        def render(image, boxes, flips) -> torch.Tensor:
            replay = crops.replay_of(index)
            if replay is not None:  # as the teacher rendered this view (the records follow)
                return render_view(image, boxes[0], bool(flips[0]), chosen["view"],
                                   replay.spec, crops.interpolation)[None]
            crop = render_box(image, boxes[0], bool(flips[0]), crops.size, crops.interpolation)
            return torch.from_numpy(np.array(crop, dtype=np.uint8)).permute(2, 0, 1)[None]

        try:
            item = read_encoded(index, crops.samples.read(index), plan, render)
        except (DecodeError, OSError) as exc:
            reason = "missing file" if isinstance(exc, FileNotFoundError) else str(exc)
            item = Item(index, np.zeros((1, 4), np.uint16), np.zeros(1, bool), False, reason)
            if self.record_dims is not None:  # collated with the others: empty records
                item.records = ViewRecords.empty((1,), self.record_dims).padded(self.record_dims)
                item.partners = []
            _, target, label = crops.placeholder(index)
            return item, path, target, label
        if self.record_dims is not None:
            self._records(item, index, chosen["view"])
        return (item, path, crops.target(chosen["stored"], chosen["view"], index),
                int(crops.samples.labels[index]))

    def _records(self, item, index: int, view: int) -> None:
        """The item's records and partner (``ViewReplay.partner_items``), or its failure."""
        replay = self.crops.replay_of(index)
        records, partners = None, []
        if replay is not None:
            try:
                records, partners = replay.partner_items(int(self.crops.samples.rows[index]),
                                                         view)
            except DecodeError as exc:
                item.valid, item.reason = False, str(exc)
        if records is None:
            records = ViewRecords.empty((1,), self.record_dims)
        item.records, item.partners = records.padded(self.record_dims), partners


def _collate(samples: list[tuple]) -> tuple[Batch, list[str], Optional[SparseTargets],
                                            torch.Tensor]:
    items, paths, targets, labels = zip(*samples)
    return (collate(list(items), consecutive=False), list(paths),
            None if targets[0] is None else SparseTargets.stack(targets),
            torch.tensor(labels, dtype=torch.int64))


def _augmentation(crops) -> tuple[Any, dict[str, int] | None]:
    """The augmentation the decoder applies on the device (the record stores' fill and ops
    table, which must be one) and the record sizes items are padded to; (None, None)
    without records."""
    replays = [replay for replay in crops.replays if replay is not None]
    if not replays:
        return None, None
    first = replays[0]
    for other in replays[1:]:
        if (other.augment.fill, other.augment.ops) != (first.augment.fill, first.augment.ops):
            raise ValueError(f"label stores {first.store.path} and {other.store.path} were "
                             "augmented with another fill or ops table; the device applies "
                             "one: train on them with --decoder pil")
    dims = {name: max(r.augment.dims.get(name, 0) for r in replays) for name in ("op", "erase")}
    return first.augment, {**dims, "mix": 1}


class EncodedBatches:
    """Device batches (normalised images, ``SparseTargets`` or None, labels) like
    ``data.DeviceBatches``; images a decoder cannot read are left out as ``bad`` says."""

    def __init__(self, crops, sampler, decoder: type, *, batch_size: int, workers: int,
                 device: torch.device, data_config: dict[str, Any], channels_last: bool,
                 drop_last: bool, bad: BadImages):
        augment, dims = _augmentation(crops)
        self.loader = DataLoader(_PlannedBytes(crops, dims), batch_size=batch_size,
                                 sampler=sampler, num_workers=workers, drop_last=drop_last,
                                 collate_fn=_collate, persistent_workers=workers > 0)
        spec = ViewSpec(views=1, input_size=crops.size, crop_pct=data_config["crop_pct"])
        self.decoder = decoder(spec=spec, interpolation=crops.interpolation,
                               mean=data_config["mean"], std=data_config["std"],
                               max_batch=batch_size, device=device,
                               num_threads=max(1, workers), augment=augment)
        self.device, self.channels_last = device, channels_last
        self.dataset, self.bad = crops, bad

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        pending: deque = deque()

        def batches():
            for batch, paths, targets, labels in self.loader:
                pending.append((paths, targets, labels))
                yield batch

        for batch, images in self.decoder.decode(batches()):
            paths, targets, labels = pending.popleft()
            keep = self.bad.keep(["" if ok else f"{path}\t{reason}" for ok, path, reason
                                  in zip(batch.valid, paths, batch.reasons)])
            if images is None:  # every row failed: an empty batch, still a step on every rank
                images = torch.zeros((1, len(batch), 3) + self.dataset.size, device=self.device)
            images = images[0]
            if keep is not None:
                images = images[keep.to(images.device)]
                labels = labels[keep]
                targets = None if targets is None else targets[keep]
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            yield (images, None if targets is None else targets.to(self.device, non_blocking=True),
                   labels.to(self.device, non_blocking=True))


def dali_batches(dataset, sampler, *, batch_size: int, device: Any = "cpu",
                 num_workers: int = 4, drop_last: bool = False, channels_last: bool = False,
                 decoder: str = "dali", bad_images: str = "stop") -> EncodedBatches:
    """The batches of ``dataset`` in ``sampler`` order, decoded on ``device`` by DALI:
    (normalised float32 images ``(B, 3, S, S)``, ``SparseTargets``, labels), all on ``device``.

    The same samples as ``DataLoader(dataset, sampler=sampler, collate_fn=collate)``: the
    workers read image bytes and plan each crop (the dataset's own plan); DALI decodes
    (``mixed``, nvJPEG, on a GPU; its CPU pipeline with ``device_id=None`` otherwise),
    resamples the box, flips, applies the stored augmentation records and normalises with
    the dataset's ``mean``/``std``. Targets and labels equal the PIL path's; pixels differ
    by under half a grey level (of 255) on average, a few levels on a few pixels (the two
    resamplers round apart).

    Parameters
    ----------
    dataset : StoreDataset
        Without ``autoaugment`` (a PIL transform).
    sampler : ShardedSampler
        Its ``set_epoch`` before each epoch's iteration, as for a DataLoader.
    batch_size : int
        Rows per batch.
    device : str or torch.device
        ``"cuda:N"`` decodes on that GPU, ``"cpu"`` on the CPU.
    num_workers : int
        DataLoader processes reading bytes (and DALI's CPU threads).
    drop_last : bool
        Leave out the last, smaller batch (training).
    channels_last : bool
        Images in channels-last memory format.
    decoder : str
        A registry decoder whose workers read bytes (``dali``).
    bad_images : str
        ``stop`` (raise on an image that cannot be decoded) or ``skip`` (leave it out of its
        batch).

    Examples
    --------
    >>> batches = dali_batches(data, sampler, batch_size=256, device="cuda:0")  # doctest: +SKIP
    >>> for images, targets, labels in batches:                               # doctest: +SKIP
    ...     loss = js_divergence(model(images), targets)
    """
    from teacher_infer.imaging import resolve_decoder

    device = torch.device(device)
    found = resolve_decoder(decoder, device)
    if found.worker_mode != "bytes":
        raise ValueError(f"decoder {decoder!r} decodes in the DataLoader workers: use a "
                         "DataLoader with collate for it")
    return EncodedBatches(dataset, sampler, found, batch_size=batch_size, workers=num_workers,
                          device=device, data_config=dataset.data_config,
                          channels_last=channels_last, drop_last=drop_last,
                          bad=BadImages(bad_images))
