"""Replaying stored views: the pixels the teacher labeled, from a store's crop, flip and
augmentation records (partners included). What training calls for every sample of a store
with records, and what a training loop of one's own calls::

    from teacher_infer.imaging.augment import ViewReplay
    replay = ViewReplay(labelstore.open("train.zarr").load())
    pixels = replay(row, view)          # uint8 (3, H, W), as the teacher saw it
    target = store.dense(row, view)     # its stored distribution
    data = replay.read(row)             # the row's image bytes (a file, or its shard's range)

Images are read through ``teacher_infer.ImageSource``: a row (or a mixing partner) of a
store of shard data is read from its tar shard by the offset the store records, checked
(docs/format.md, "Stores of shard data").

The views are rendered as the teacher pass rendered them (``decode.render_view``: view 0
with timm's eval transform when its box is that transform's), then the records are applied
(``render.make_views``), so at the teacher's input size and interpolation a replayed view is
the labeled view, byte for byte (tested). At another input size the crop and the records
(fractions of the view) are replayed at that size.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from ...images import ImageSource
from ..decode import DecodeError, decode_rgb, image_bytes, render_view
from ..views import ViewSpec
from .records import ViewRecords
from .render import PartnerItem, make_views, render_partner
from .source import StoredAugmentation


class ViewReplay:
    """Stored views of one label store (``store``, a ``LabelStore``; ``load()`` it first when
    reading many rows). ``root``: the images' folder or URL, or an ``ImageSource``
    (default: the store's ``dataset.root``); ``input_size`` (square side) and
    ``interpolation`` default to the teacher's preprocessing recorded in the store."""

    def __init__(self, store: Any, *, root: Any = None, input_size: int | None = None,
                 interpolation: str | None = None):
        pre = store.attrs.get("preprocessing") or {}
        root = root or (store.attrs.get("dataset") or {}).get("root")
        if not root:
            raise ValueError(f"label store {store.path} records no dataset root: pass root")
        if input_size is None and not pre.get("input_size"):
            raise ValueError(f"label store {store.path} records no input size: pass "
                             "input_size")
        height, width = ((int(input_size),) * 2 if input_size is not None
                         else (int(v) for v in pre["input_size"][1:]))
        self.store = store
        self.images = root if isinstance(root, ImageSource) else ImageSource(root)
        self.root = self.images.root
        self.spec = ViewSpec(views=store.num_views, input_size=(height, width),
                             crop_pct=float(pre.get("crop_pct", 0.875)),
                             crop_mode=pre.get("crop_mode") or "center")
        self.interpolation = interpolation or pre.get("interpolation") or "bilinear"
        self.augment = StoredAugmentation(store, self.images) if store.augment_dims else None
        store.keys  # read once here: forked DataLoader workers share it

    def path(self, row: int) -> str:
        """Where row ``row``'s image is (a file, or its shard + ``/`` + its sample key)."""
        return self.images.path(self.store.keys[int(row)])

    def read(self, row: int) -> bytes:
        """Row ``row``'s image bytes: its file, or its byte range in its tar shard (the
        store's ``tar`` row; the shard's size and stamp and the member's header checked).
        DecodeError with the reason when they cannot be read."""
        row = int(row)
        return image_bytes(self.images, self.store.keys[row], self.store.read_tar(row)[0])

    def crop(self, row: int, view: int) -> tuple[np.ndarray, bool]:
        """The stored box (uint16, the store's grid) and flip of a view."""
        stored = self.store.read_rows(int(row), ("boxes", "flips"))
        return stored["boxes"][0, view], bool(stored["flips"][0, view])

    def records(self, row: int, view: int) -> ViewRecords | None:
        """The (1,) record of one view (None: a crop-only store)."""
        if self.augment is None:
            return None
        return self.augment.records(int(row)).map(lambda a: a[[view]])

    def __call__(self, row: int, view: int, image: Any = None) -> torch.Tensor:
        """Stored view ``view`` of row ``row`` as the teacher labeled it: uint8 (3, H, W).
        ``image``: the row's decoded RGB image, when the caller has it. Raises DecodeError
        when an image (the row's or a mixing partner's) cannot be used."""
        image = decode_rgb(self.read(row)) if image is None else image
        box, flip = self.crop(row, view)
        pixels = render_view(image, box, flip, view, self.spec, self.interpolation)[None]
        if self.augment is None:
            return pixels[0]
        pixels, _, reason = make_views(pixels, self.records(row, view), self.augment,
                                       self._partner_pixels)
        if reason is not None:
            raise DecodeError(reason)
        return pixels[0]

    def _partner_pixels(self, partner, views: list[int]) -> torch.Tensor:
        return render_partner(partner, views, self.augment, spec=self.spec,
                              interpolation=self.interpolation)

    def partner_items(self, row: int, view: int) -> tuple[ViewRecords | None,
                                                          list[PartnerItem]]:
        """For a ``"bytes"`` decoder, which applies the records on the device: the view's
        (1,) record, its partner view renumbered 0, and its partner as a one-view
        :class:`~.render.PartnerItem` (image bytes and that view's crop and own records).
        Raises DecodeError when the partner's image cannot be read."""
        from .render import read_partners

        records = self.records(row, view)
        if records is None or not records.mixed.any():
            return records, []
        ref, lent = int(records.mix_partners[0]), int(records.mix_views[0])
        partner = self.augment.partner(ref)
        one = dataclasses.replace(partner, boxes=partner.boxes[[lent]],
                                  flips=partner.flips[[lent]],
                                  records=partner.records.map(lambda a: a[[lent]]))
        records = records.map(np.copy)
        records.mix_views[0] = 0
        spec = dataclasses.replace(self.spec, views=1)
        items, records, reason = read_partners(records, _Lent(self.augment, one), spec=spec,
                                               interpolation=self.interpolation)
        if reason is not None:
            raise DecodeError(reason)
        return records, items


class _Lent:
    """A store's augmentation whose one partner lends one view (the view a sample mixes)."""

    replay = True

    def __init__(self, augment: StoredAugmentation, partner):
        self.fill, self.ops, self._partner = augment.fill, augment.ops, partner
        self.images = augment.images

    def partner(self, ref: int):
        return self._partner
