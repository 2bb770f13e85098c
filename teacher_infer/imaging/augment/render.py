"""A row's augmented views made from its records and its partners' pixels: in a DataLoader
worker (PIL decoding: the whole view), or split between the worker, which reads the files and
plans the crops, and the device, which applies the records after decoding (a ``"bytes"``
decoder: DALI). Both call the same ops (:mod:`.apply`), so the pixels are the same bytes.

The order is that of docs/format.md, "Rendering a view": the stored crop and flip, the ops of
the record in order, erasing, then mixing with the partner's view — the partner row's crop
and flip of view ``mix_views`` with its own ops and erasing (never its own mixing).

A partner that cannot be read or decoded: with drawn records (a first teacher pass,
``Augmentation.replay`` false) the views that needed it are stored unmixed, which the
records then say; with stored records (``--views-from``, ``ssld verify``, training) the row
fails with a reason naming the partner, never showing other pixels.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import numpy as np
import torch

from ..decode import (DALI_FORMATS, DecodeError, decode_rgb, header_size, image_bytes,
                      render_view)
from ..views import ViewSpec
from .apply import augment_views, mix_views, partner_views
from .records import ViewRecords
from .source import Augmentation, Partner

# (row, height, width) -> (boxes (V, 4) uint16, flips (V,)): how a loader plans a row's crops
Plan = Callable[[int, int, int], tuple[np.ndarray, np.ndarray]]


def _crops(partner: Partner, height: int, width: int, plan: Plan | None,
           views: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The partner's stored crops, or its planned ones; DecodeError when a view it lends has
    no crop (an empty stored box)."""
    if partner.boxes is None:
        boxes, flips = plan(partner.row, height, width)
    else:
        boxes, flips = partner.boxes, partner.flips
    empty = [v for v in views if not (boxes[v, 2] and boxes[v, 3])]
    if empty:
        raise DecodeError(f"view {empty[0]} has no crop in the store")
    return np.asarray(boxes, dtype=np.uint16), np.asarray(flips, dtype=bool)


def render_partner(partner: Partner, views: list[int], augmentation: Augmentation, *,
                   spec: ViewSpec, interpolation: str, plan: Plan | None = None) -> torch.Tensor:
    """The partner's ``views`` as its records make them, uint8 (len(views), 3, H, W), with
    PIL (raises DecodeError when its image cannot be read or used)."""
    image = decode_rgb(image_bytes(augmentation.images, partner.key, partner.tar))
    boxes, flips = _crops(partner, image.height, image.width, plan, views)
    pixels = torch.stack([render_view(image, boxes[v], bool(flips[v]), v, spec, interpolation)
                          for v in views])
    own = partner.records.map(lambda a: a[views])
    return augment_views(pixels, own, augmentation.fill, augmentation.ops)


def _failed(augmentation: Augmentation, records: ViewRecords, partner: Partner,
            reason: str) -> tuple[ViewRecords, str | None]:
    """Records without the partner's mixing (drawn records), or the row's failure."""
    if augmentation.replay:
        return records, f"mixing partner {partner.key}: {reason}"
    return records.unmixed(records.mix_partners == partner.ref), None


def make_views(pixels: torch.Tensor, records: ViewRecords, augmentation: Augmentation,
               partner_pixels: Callable[[Partner, list[int]], torch.Tensor]
               ) -> tuple[torch.Tensor, ViewRecords, str | None]:
    """A row's views (uint8 (V', 3, H, W), its crops) with its records (V',) applied:
    ``(pixels, records, reason)``; ``partner_pixels(partner, views)`` renders a partner's
    views (:func:`render_partner`). ``records`` come back unmixed where a drawn partner
    failed; ``reason`` is set when a stored one did (the pixels are then meaningless)."""
    out = augment_views(pixels, records, augmentation.fill, augmentation.ops)
    needed = partner_views(records)
    if not needed:
        return out, records, None
    lent = torch.zeros_like(out)
    for ref, views in needed.items():
        partner = augmentation.partner(ref)
        try:
            rendered = partner_pixels(partner, views)
        except (DecodeError, OSError) as exc:
            records, reason = _failed(augmentation, records, partner, str(exc))
            if reason is not None:
                return out, records, reason
            continue
        for slot, view in enumerate(views):
            lent[torch.as_tensor((records.mix_partners == ref) & (records.mix_views == view))] \
                = rendered[slot]
    return mix_views(out, lent, records), records, None


# -- split between the worker and the device ("bytes" decoders) -------------------------------

@dataclass
class PartnerItem:
    """A partner as a worker hands it to a ``"bytes"`` decoder: image bytes and crops, or
    (formats the decoder cannot read) PIL-rendered plain crops of the views needed."""

    ref: int                           # the row's mix_partners value
    key: str
    views: list[int]                   # its views the row mixes with (indices of ``boxes``)
    boxes: np.ndarray                  # (Vp, 4) uint16
    flips: np.ndarray                  # (Vp,) bool
    records: ViewRecords               # (Vp,) its own ops and erasing
    encoded: np.ndarray | None = None  # image bytes
    height: int = 0                    # decoded height (after EXIF orientation)
    pixels: torch.Tensor | None = None  # (Vp, 3, H, W) uint8 plain crops (zero where unused)


def read_partners(records: ViewRecords, augmentation: Augmentation, *, spec: ViewSpec,
                  interpolation: str, plan: Plan | None = None
                  ) -> tuple[list[PartnerItem], ViewRecords, str | None]:
    """In a ``"bytes"`` worker: the row's partners as :class:`PartnerItem` s, with their
    crops planned from the image header; ``(items, records, reason)`` as :func:`make_views`
    for a partner that cannot be read."""
    items = []
    for ref, views in partner_views(records).items():
        partner = augmentation.partner(ref)
        try:
            data = image_bytes(augmentation.images, partner.key, partner.tar)
            height, width, fmt = header_size(data)
            boxes, flips = _crops(partner, height, width, plan, views)
            item = PartnerItem(ref=ref, key=partner.key, views=views, boxes=boxes, flips=flips,
                               records=partner.records)
            if fmt in DALI_FORMATS:
                item.encoded, item.height = np.frombuffer(data, dtype=np.uint8), height
            else:
                image = decode_rgb(data)
                pixels = torch.zeros((len(boxes), 3) + tuple(spec.input_size), dtype=torch.uint8)
                for view in views:
                    pixels[view] = render_view(image, boxes[view], bool(flips[view]), view, spec,
                                               interpolation)
                item.pixels = pixels
        except (DecodeError, OSError) as exc:
            records, reason = _failed(augmentation, records, partner, str(exc))
            if reason is not None:
                return items, records, reason
            continue
        items.append(item)
    return items, records, None


def finish_on_device(pixels: torch.Tensor, records: ViewRecords, partners: list,
                     augmentation: Augmentation,
                     decode: Callable[[list[PartnerItem]], tuple[torch.Tensor, dict[int, str]]],
                     ) -> tuple[torch.Tensor, ViewRecords, dict[int, str]]:
    """After a ``"bytes"`` decoder decoded a batch's crops: uint8 ``pixels`` (V, n, 3, H, W)
    on the device, the rows' ``records`` (n, V) and ``partners`` (per row, a list of
    :class:`PartnerItem`; None or empty for rows that do not mix or failed) → the views with
    the records applied. ``decode(items)`` gives the items' plain crops (Vp, m, 3, H, W) on
    the device and, by item index, the reason of those it could not decode.

    Returns ``(pixels, records, failed)``: records unmixed where a drawn partner failed;
    ``failed`` maps a row to its reason where a stored partner failed."""
    views, n = pixels.shape[:2]
    by_view = records.map(lambda a: a.swapaxes(0, 1))
    out = augment_views(pixels, by_view, augmentation.fill, augmentation.ops)
    jobs = [(row, item) for row, items in enumerate(partners) for item in (items or [])]
    failed: dict[int, str] = {}
    if not jobs:
        return out, records, failed
    decoded, errors = decode([item for _, item in jobs])
    for index, reason in errors.items():
        row, item = jobs[index]
        partner = Partner(ref=item.ref, key=item.key, tar=None, boxes=None, flips=None,
                          records=item.records)
        fixed, why = _failed(augmentation, records.map(lambda a: a[row]), partner, reason)
        if why is not None:
            failed[row] = why
        else:
            _set_row(records, row, fixed)
    # the views lent: (view of the row, row, view of the partner, job) for every mixed view
    slots = [(view, row, int(records.mix_views[row, view]), job)
             for job, (row, item) in enumerate(jobs) if row not in failed and job not in errors
             for view in range(views) if records.mix_partners[row, view] == item.ref]
    if slots:
        view_index, row_index, lent_view, job_index = (torch.as_tensor(c) for c in zip(*slots))
        lent_records = ViewRecords.stack([jobs[j][1].records.map(lambda a, v=v: a[v])
                                          for _, _, v, j in slots])
        lent = augment_views(decoded[lent_view.to(decoded.device), job_index.to(decoded.device)],
                             lent_records, augmentation.fill, augmentation.ops)
        partner_pixels = torch.zeros_like(out)
        partner_pixels[view_index.to(out.device), row_index.to(out.device)] = lent.to(out.device)
        out = mix_views(out, partner_pixels, records.map(lambda a: a.swapaxes(0, 1)))
    return out, records, failed


def _set_row(records: ViewRecords, row: int, value: ViewRecords) -> None:
    for field in fields(ViewRecords):
        getattr(records, field.name)[row] = getattr(value, field.name)
