"""Replayed augmentation (issue 25): RandAugment, random erasing and MixUp/CutMix drawn per
view from (seed, key, view), stored as explicit records, and applied to uint8 pixels by one
implementation on any device.

- :mod:`.policy`: the settings (``AugmentSpec``; timm's RandAugment grammar in
  ``parse_policy``), their checks and the store's ``augment`` attribute;
- :mod:`.table`: the versioned ops table (op id → name, kernel, level → argument);
- :mod:`.records`: ``ViewRecords``, the draws (``plan_records``) and ``check_records``;
- :mod:`.kernels`: the pixel ops (PIL's arithmetic, per image, any device);
- :mod:`.apply`: ``augment_views``, ``mix_views``, ``partner_views``;
- :mod:`.source`: where a loader gets a row's records and its partners (drawn for a first
  teacher pass, ``PlannedAugmentation``, or a store's, ``StoredAugmentation``);
- :mod:`.render`: a row's views made from them, in a worker or on the device after a
  ``"bytes"`` decoder;
- :mod:`.replay`: ``ViewReplay``, a stored view as the teacher labeled it (training's call,
  and a training loop's own).

>>> from teacher_infer.imaging.augment import AugmentSpec, plan_records
>>> spec = AugmentSpec(augment="rand-m9-n2-mstd0.5", erase=0.25)
>>> plan_records(spec, seed=0, key="a.jpg", row=0, rows=10, chunk_rows=4, views=3).ops.shape
(3, 2)

Names are imported on first use: the torch-free modules (policy, table, records) do not
import torch.
"""
from __future__ import annotations

import importlib

_WHERE = {
    "AugmentSpec": "policy", "RandAugmentPolicy": "policy", "fill_from_mean": "policy",
    "parse_policy": "policy",
    "OPS_V1": "table", "TABLE_VERSION": "table", "TABLES": "table", "Op": "table",
    "resolve_table": "table", "table_attrs": "table",
    "GRID": "records", "STORE_ARRAYS": "records", "ViewRecords": "records",
    "check_records": "records",
    "partner_window": "records", "plan_records": "records",
    "pixel_rect": "kernels",
    "augment_views": "apply", "mix_views": "apply", "partner_views": "apply",
    "Augmentation": "source", "PlannedAugmentation": "source", "StoredAugmentation": "source",
    "check_store_records": "source",
    "ViewReplay": "replay",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
