"""The replay API: label stores as a map-style ``torch.utils.data.Dataset`` of the views the
teacher labeled, with their soft targets kept sparse (what ``train-student`` itself trains
on; docs/own-loop.md puts it in a plain PyTorch loop).

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

Keys are ``(epoch, index)`` pairs, as :class:`~student_train.sampling.ShardedSampler` yields
them: every random choice of a sample is a pure function of (seed, epoch, index), so workers,
ranks and resumed runs agree. There is no ``dataset[i]`` with a ``set_epoch`` on the dataset:
with ``persistent_workers`` each worker holds its own copy of the dataset, which a
``set_epoch`` in the main process never reaches -- every epoch would silently replay epoch 0's
views. The sampler's epoch travels in the key instead.

Workers return uint8 images (normalisation happens on the device:
``teacher_infer.imaging.pixels_to_input``) and :class:`~student_train.targets.SparseTargets`.
"""
from __future__ import annotations

import random
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from teacher_infer.imaging import (DecodeError, ViewSpec, decode_rgb, eval_box,
                                   random_resized_crop_box, render_box, render_eval)
from teacher_infer.imaging.augment import AugmentSpec, ViewReplay, resolve_table

from .failures import UnreadableImage
from .samples import SampleSet
from .sampling import replay_view, sample_rng
from .targets import SparseTargets

CROP_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop aspect range (torchvision, timm, PaddleClas)
CROPS = ("replay", "random", "center")


class StoreDataset(Dataset):
    """``dataset[(epoch, index)]`` → (uint8 ``(3, S, S)`` image, ``SparseTargets`` of
    ``(K,)``, ground-truth label (-1: unknown)) over the valid rows of one or more stores.

    Parameters
    ----------
    stores : str or sequence of str
        Label stores (complete, one class space; their k and views may differ). Their rows
        are concatenated in order: index i < len(first store's valid rows) is in the first.
    data_config : dict
        The student's preprocessing: ``input_size`` (an int, or timm's ``(3, S, S)``),
        and optionally ``interpolation`` (bilinear), ``crop_pct`` (0.875), ``crop_mode``
        and ``mean`` -- e.g. ``timm.data.resolve_model_data_config(model)``.
    roots : str or sequence of str, optional
        Where the images are (a folder, a URL, or the folder of the tar shards), one for all
        stores or one per store; default: each store's recorded ``dataset.root``.
    crop : str
        ``replay`` (default), ``random`` or ``center`` (see the module docstring).
    seed : int
        Every random choice is a pure function of (seed, epoch, index).
    crop_scale : tuple of float
        RandomResizedCrop's area range (``random`` crops).
    autoaugment : str, optional
        A timm AutoAugment/RandAugment/AugMix policy applied after the crop. It changes the
        pixels the teacher labeled, so it weakens replay's consistency (refused for stores
        with augmentation records).

    Notes
    -----
    A replayed view of a store with augmentation records is the view the teacher labeled,
    records applied, mixing partner included (``teacher_infer.imaging.augment.ViewReplay``);
    a store with stored logits gives targets from them (``labelstore.densify_logits``'s
    sparse parts). Opening checks what ``train-student`` checks (complete stores, one class
    space, every image present); constructed after ``torch.distributed.init_process_group``,
    the ranks share the image check.

    Examples
    --------
    >>> data = StoreDataset("train.zarr", {"input_size": 224})   # doctest: +SKIP
    >>> image, target, label = data[(0, 17)]          # epoch 0, sample 17  # doctest: +SKIP
    >>> image.shape, target.dense().shape                                 # doctest: +SKIP
    (torch.Size([3, 224, 224]), torch.Size([1000]))
    """

    def __init__(self, stores: str | Sequence[str], data_config: dict[str, Any], *,
                 roots: str | Sequence[str] | None = None, crop: str = "replay",
                 seed: int = 0, crop_scale: tuple[float, float] = (0.08, 1.0),
                 autoaugment: Optional[str] = None):
        from teacher_infer.runtime import Dist

        from . import distributed as D
        from .samples import open_stores

        paths = [stores] if isinstance(stores, (str, bytes)) or hasattr(stores, "__fspath__") \
            else list(stores)
        paths = [str(p) for p in paths]
        ranks = Dist.from_env() if (torch.distributed.is_available()
                                    and torch.distributed.is_initialized()) else Dist()
        samples = open_stores(paths, env=D.DistEnv(ranks, torch.device("cpu")), roots=roots)
        check_replayable(autoaugment, samples.stores)
        self._setup(samples, crop=crop, data_config=preprocessing(data_config), seed=seed,
                    with_targets=True, crop_scale=crop_scale, autoaugment=autoaugment)

    @classmethod
    def from_samples(cls, samples: SampleSet, *, crop: str, data_config: dict[str, Any],
                     seed: int, with_targets: bool,
                     crop_scale: tuple[float, float] = (0.08, 1.0),
                     autoaugment: Optional[str] = None) -> "StoreDataset":
        """``train-student``'s constructor: samples already opened and checked (stores, or an
        image source without them: then ``with_targets=False`` and targets are None)."""
        self = cls.__new__(cls)
        self._setup(samples, crop=crop, data_config=data_config, seed=seed,
                    with_targets=with_targets, crop_scale=crop_scale, autoaugment=autoaugment)
        return self

    def _setup(self, samples: SampleSet, *, crop: str, data_config: dict[str, Any], seed: int,
               with_targets: bool, crop_scale: tuple[float, float],
               autoaugment: Optional[str]) -> None:
        if crop not in CROPS:
            raise ValueError(f"crop must be replay, random or center, got {crop!r}")
        if (crop == "replay" or with_targets) and samples.stores is None:
            raise ValueError(f"crop={crop!r} / teacher targets need label stores")
        self.samples, self.crop, self.seed = samples, crop, seed
        self.data_config = data_config
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

    @property
    def num_classes(self) -> int:
        """C, the stores' class count."""
        return self.samples.num_classes

    @property
    def class_names(self) -> Optional[list]:
        """The stores' class names, where they record them."""
        return self.samples.class_names

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

    def target(self, stored, view: int, index: int) -> Optional[SparseTargets]:
        """The sparse teacher distribution ``(K,)`` of a stored view (from the stored logits
        when the sample's store has them), or None without targets."""
        if not self.with_targets:
            return None
        store = self.samples.stores[self.samples.store_of[index]]
        classes = self.samples.num_classes
        if store.has_logits:
            found = store.read_rows(int(self.samples.rows[index]), ("logits", "log_partition"))
            one = SparseTargets.from_logits(
                stored.indices[:, view], found["logits"][:, view],
                found["log_partition"][:, view], classes,
                float(store.attrs.get("temperature", 1.0)))
        else:
            one = SparseTargets.from_topk(stored.indices[:, view], stored.probs[:, view],
                                          stored.residual[:, view], classes)
        return SparseTargets(one.indices[0], one.probs[0], one.residual[0], classes)

    def placeholder(self, index: int):
        """What a sample whose image cannot be read stands in with until its batch drops it:
        black pixels, a zero target, its label."""
        size = (3,) + self.size
        target = None
        if self.with_targets:
            k = self.samples.stores[self.samples.store_of[index]].topk
            target = SparseTargets(torch.full((k,), -1, dtype=torch.int64),
                                   torch.zeros(k, dtype=torch.float64),
                                   torch.zeros((), dtype=torch.float64),
                                   self.samples.num_classes)
        return torch.zeros(size, dtype=torch.uint8), target, int(self.samples.labels[index])

    def replay_of(self, index: int) -> ViewReplay | None:
        """The replay of the sample's store when its views carry records (replay crops)."""
        if self.crop != "replay":
            return None
        return self.replays[self.samples.store_of[index]]

    def __getitem__(self, key: tuple[int, int]):
        try:
            epoch, index = key
        except (TypeError, ValueError):
            raise TypeError(f"index with (epoch, index) keys, as ShardedSampler yields them, "
                            f"not {key!r}: the epoch picks each sample's view and crop") from None
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


def collate(samples: Sequence[tuple]) -> tuple[torch.Tensor, Optional[SparseTargets],
                                                 torch.Tensor]:
    """A DataLoader's ``collate_fn`` for :class:`StoreDataset`: a list of (image, target,
    label) → (uint8 images ``(B, 3, S, S)``, ``SparseTargets`` of ``(B, K)`` (None without
    targets), int64 labels ``(B,)``).

    Examples
    --------
    >>> loader = DataLoader(data, batch_size=256, sampler=ShardedSampler(len(data)),
    ...                     collate_fn=collate, num_workers=8)             # doctest: +SKIP
    """
    images, targets, labels = zip(*samples)
    return (torch.stack(images),
            None if targets[0] is None else SparseTargets.stack(targets),
            torch.tensor(labels, dtype=torch.int64))


def preprocessing(data_config: dict[str, Any]) -> dict[str, Any]:
    """A student's preprocessing in the trainer's form (square ``input_size`` as an int) from
    it, or from timm's ``resolve_model_data_config`` (``input_size`` ``(3, H, W)``)."""
    if "input_size" not in data_config:
        raise ValueError("data_config needs input_size (e.g. timm.data."
                         "resolve_model_data_config(model))")
    size = data_config["input_size"]
    if not isinstance(size, (int, np.integer)):
        height, width = (int(v) for v in tuple(size)[-2:])
        if height != width:
            raise ValueError(f"data_config input_size {tuple(size)} is not square")
        size = height
    return {"interpolation": "bilinear", "crop_pct": 0.875, "crop_mode": "center",
            "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
            **data_config, "input_size": int(size)}


def check_replayable(autoaugment: Optional[str], stores) -> None:
    """ValueError (one line) for a store whose augmentation records this run cannot replay:
    settings or an ops table this ssld does not know, or ``--autoaugment``, which would
    change the pixels after the teacher labeled them (crop-only stores keep it)."""
    for store in stores:
        if not store.augment_dims:
            continue
        where = f"label store {store.path}"
        AugmentSpec.from_attrs(store.attrs.get("augment"), where=where)
        resolve_table((store.attrs.get("augment") or {}).get("ops_table"), where)
        if autoaugment:
            raise ValueError(f"--autoaugment {autoaugment}: {where} holds augmented views "
                             "whose records training replays; augmenting them again after the "
                             "teacher labeled them would break that consistency (leave "
                             "--autoaugment out)")


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
