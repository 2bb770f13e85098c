"""Applying records to pixels: the one implementation for the teacher pass and training, in
CPU workers (the views of one row) and on the device after DALI decodes (whole batches).

Where it runs in the render pipeline (the order timm's training transform has, with
erasing on uint8 and mixing before normalisation)::

    crop + resize + flip (decode.render_views / DALI)   uint8 (..., 3, H, W)
    -> augment_views(pixels, records, fill)             RandAugment ops, then erasing
    -> mix_views(pixels, partner_pixels, records)       MixUp / CutMix
    -> decode.pixels_to_input(pixels, mean, std)        float32, normalised

``partner_pixels`` are the partner views as the partner's own records make them: the
partner row's stored crop and flip of view ``mix_views``, then ``augment_views`` with that
view's record (its ops and erasing, never its own mixing). Every step is per view and
exact (:mod:`.kernels`), so one view rendered in a worker and the same view inside a GPU
batch are the same bytes.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from . import kernels
from .records import ViewRecords
from .table import OPS_V1, Op


def _flat(pixels: torch.Tensor, records: ViewRecords) -> tuple[torch.Tensor, ViewRecords]:
    if tuple(pixels.shape[:-3]) != records.shape or pixels.dtype != torch.uint8:
        raise ValueError(f"pixels must be uint8 of shape {records.shape} + (3, H, W) to match "
                         f"the records, got {pixels.dtype} {tuple(pixels.shape)}")
    return pixels.reshape((-1,) + tuple(pixels.shape[-3:])), records.flatten()


def augment_views(pixels: torch.Tensor, records: ViewRecords, fill: Sequence[int],
                  ops: Sequence[Op] = OPS_V1) -> torch.Tensor:
    """RandAugment ops in record order, then erasing, on uint8 views (any device).

    Parameters
    ----------
    pixels : torch.Tensor
        uint8 (..., 3, H, W), the rendered crops; the leading shape is ``records.shape``.
    records : ViewRecords
        One record per view.
    fill : sequence of 3 ints
        Colour of the area geometric ops uncover and of erased boxes (the store's
        ``augment.fill``).
    ops : sequence of Op
        The store's ops table by id (``table.resolve_table``); default this ssld's.

    Returns
    -------
    torch.Tensor
        A new tensor; ``pixels`` is unchanged.
    """
    flat, flat_records = _flat(pixels, records)
    out = flat.clone()
    for slot in range(flat_records.ops.shape[-1]):
        ids = flat_records.ops[:, slot]
        for op_id in np.unique(ids):
            op = ops[int(op_id)]
            if op.kernel == "identity":
                continue
            rows = np.flatnonzero(ids == op_id)
            args = [op.argument(level) for level in flat_records.levels[rows, slot]]
            index = torch.as_tensor(rows).to(out.device)
            out[index] = kernels.run_kernel(op.kernel, out[index], args, fill)
    boxes = flat_records.erase_boxes
    erased = np.flatnonzero(((boxes[..., 2] > 0) & (boxes[..., 3] > 0)).any(-1))
    if len(erased):
        index = torch.as_tensor(erased).to(out.device)
        out[index] = kernels.erase(out[index], boxes[erased], fill)
    return out.view(pixels.shape)


def mix_views(pixels: torch.Tensor, partner_pixels: torch.Tensor,
              records: ViewRecords) -> torch.Tensor:
    """MixUp or CutMix of the mixed views (``records.mixed``) with their partners' pixels
    (same shape as ``pixels``; entries of views that do not mix are not read). A view with
    a CutMix box takes the partner's pixels inside it; any other mixed view is blended
    with weight ``mix_lambdas / 255`` on its own pixels."""
    flat, flat_records = _flat(pixels, records)
    if partner_pixels.shape != pixels.shape or partner_pixels.dtype != torch.uint8:
        raise ValueError(f"partner_pixels must be uint8 of shape {tuple(pixels.shape)}, got "
                         f"{partner_pixels.dtype} {tuple(partner_pixels.shape)}")
    partners = partner_pixels.reshape(flat.shape).to(flat.device)
    out = flat.clone()
    cut = (flat_records.mix_boxes[:, 2] > 0) & (flat_records.mix_boxes[:, 3] > 0)
    for rows, mix in ((np.flatnonzero(flat_records.mixed & ~cut), "mixup"),
                      (np.flatnonzero(flat_records.mixed & cut), "cutmix")):
        if not len(rows):
            continue
        index = torch.as_tensor(rows).to(out.device)
        if mix == "mixup":
            out[index] = kernels.mixup(out[index], partners[index], flat_records.mix_lambdas[rows])
        else:
            out[index] = kernels.cutmix(out[index], partners[index], flat_records.mix_boxes[rows])
    return out.view(pixels.shape)


def partner_views(records: ViewRecords) -> dict[int, list[int]]:
    """Partner row → the views of it that the mixed views need (sorted): what a loader
    renders (crop, flip, ``augment_views``) before :func:`mix_views`."""
    needed: dict[int, set[int]] = {}
    flat = records.flatten()
    for partner, view in zip(flat.mix_partners[flat.mixed], flat.mix_views[flat.mixed]):
        needed.setdefault(int(partner), set()).add(int(view))
    return {partner: sorted(views) for partner, views in sorted(needed.items())}
