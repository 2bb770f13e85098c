"""``--decoder dali``: training and evaluation batches decoded and cropped by NVIDIA DALI.

DataLoader workers only read file bytes and image headers and plan each sample's crop (the
same :meth:`CropDataset.plan` as the PIL path: replayed box, RandomResizedCrop or eval box);
teacher_infer's :class:`~teacher_infer.dali.DaliDecoder` decodes (``mixed``: nvJPEG on the GPU;
CPU mode without one), resamples the box, flips and normalises. Formats DALI cannot read are
rendered by PIL in the worker, as in teacher inference.

Boxes go to DALI on the store's uint16 grid: a replayed box is exactly the stored one, and a
random or eval box moves by at most 1/65535 of the image.
"""
from __future__ import annotations

import io
from collections import deque
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from teacher_infer.dali import DaliDecoder
from teacher_infer.decode import DALI_FORMATS, Batch, header_size, open_rgb, render_box
from teacher_infer.views import ViewSpec, quantize_inside


class _PlannedBytes(Dataset):
    """``(epoch, index)`` → (path, file bytes or None, decoded height, uint16 box, flip, PIL
    pixels or None, target, label): a :class:`~student_train.data.CropDataset` sample before
    decoding."""

    def __init__(self, crops):
        if crops.augment is not None:
            raise ValueError("--autoaugment works on PIL images: use --decoder pil with it")
        self.crops = crops

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        crops = self.crops
        path = crops.samples.paths[index]
        with open(path, "rb") as handle:
            data = handle.read()
        height, width, fmt = header_size(data)
        box, flip, view, stored = crops.plan(epoch, index, height, width)
        box = quantize_inside(np.asarray(box, dtype=np.float64)[None])[0]
        pixels, encoded = None, np.frombuffer(data, dtype=np.uint8)
        if fmt not in DALI_FORMATS:
            crop = render_box(open_rgb(io.BytesIO(data)), box, flip, crops.size,
                              crops.interpolation)
            pixels = torch.from_numpy(np.array(crop, dtype=np.uint8)).permute(2, 0, 1)
            encoded = None
        return (path, encoded, height, box, flip, pixels, crops.target(stored, view),
                int(crops.samples.labels[index]))


def _collate(items: list[tuple]) -> tuple[Batch, list[str], torch.Tensor, torch.Tensor]:
    paths, encoded, heights, boxes, flips, pixels, targets, labels = zip(*items)
    rendered = np.array([p is not None for p in pixels], dtype=bool)
    stacked = None
    if rendered.any():
        shape = next(p.shape for p in pixels if p is not None)
        stacked = torch.zeros((1, len(items)) + tuple(shape), dtype=torch.uint8)
        for i, p in enumerate(pixels):
            if p is not None:
                stacked[0, i] = p
    batch = Batch(start=0, boxes=np.stack(boxes)[:, None], flips=np.array(flips)[:, None],
                  valid=np.ones(len(items), dtype=bool), reasons=[None] * len(items),
                  pixels=stacked, rendered=rendered, encoded=list(encoded),
                  heights=np.array(heights, dtype=np.int64))
    return batch, list(paths), torch.stack(targets), torch.tensor(labels, dtype=torch.int64)


class DaliBatches:
    """Device batches (images, teacher probs, labels) like ``data.DeviceBatches``."""

    def __init__(self, crops, sampler, *, batch_size: int, workers: int, device: torch.device,
                 data_config: dict[str, Any], channels_last: bool, drop_last: bool):
        self.loader = DataLoader(_PlannedBytes(crops), batch_size=batch_size, sampler=sampler,
                                 num_workers=workers, drop_last=drop_last, collate_fn=_collate,
                                 persistent_workers=workers > 0)
        spec = ViewSpec(views=1, input_size=crops.size, crop_pct=data_config["crop_pct"])
        self.decoder = DaliDecoder(spec=spec, interpolation=crops.interpolation,
                                   mean=data_config["mean"], std=data_config["std"],
                                   max_batch=batch_size, device=device,
                                   num_threads=max(1, workers))
        self.device, self.channels_last = device, channels_last

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
            if not batch.valid.all():
                bad = int(np.flatnonzero(~batch.valid)[0])
                raise ValueError(f"cannot decode {paths[bad]}: {batch.reasons[bad]}")
            images = images[0]
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            yield (images, targets.to(self.device, non_blocking=True),
                   labels.to(self.device, non_blocking=True))
