"""``infer-teacher --views-from STORE``: label exactly the crops of an existing store.

The reference store gives the rows (keys, in its order), the dataset root, the number of
views and every view's box and flip; the new teacher crops those boxes (fractions of the
image, so its own input size may differ) and never draws views itself. What would make
the crops differ is refused before anything is written, naming the difference: another
key list, an incomplete reference (its missing chunks have no boxes), boxes in another
convention or grid. Rows invalid in the reference have no boxes; they are invalid here too.
Nothing here imports torch.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from labelstore import BOX_SCALE

from .data import Samples, find_samples
from .images import root_problem

from .imaging.views import PlannedViews

INVALID_REASON = "invalid in the --views-from store (no box to crop)"


@dataclass(frozen=True)
class Reference:
    """What a run with ``--views-from`` takes from the reference store."""

    samples: Samples
    planned: PlannedViews
    views: int
    chunk_rows: int                 # the default of the new store: chunks aligned with these
    preprocessing: dict[str, Any]   # the reference's view-sampler settings, recorded again
    record: dict[str, Any]          # the store's ``views_from`` attribute
    store: Any = None               # the reference store (loaded when it has records)
    augment: dict[str, Any] | None = None     # its ``augment`` attribute (records: replayed)

    @property
    def augmented(self) -> bool:
        return self.augment is not None


def stored_views(store) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(boxes (N, V, 4) uint16 as stored, flips (N, V) bool, valid (N,) bool) of ``store``:
    the stored grid values, not the float fractions ``read`` returns (replay is exact)."""
    return (np.asarray(store._get("boxes", slice(None)), dtype=np.uint16),
            np.asarray(store._get("flips", slice(None)), dtype=bool),
            np.asarray(store._get("valid", slice(None)), dtype=bool))


def views_fingerprint(key_fingerprint: str, boxes: np.ndarray, flips: np.ndarray,
                      valid: np.ndarray, records: dict[str, np.ndarray] | None = None) -> str:
    """sha256 of the keys' fingerprint, boxes, flips and valid flags (invalid rows are not
    cropped) and, for a store with augmentation, its record arrays and partner table
    (``records``, by name): equal iff a run makes the same views."""
    digest = hashlib.sha256(str(key_fingerprint).encode("utf-8"))
    digest.update(np.ascontiguousarray(boxes, dtype="<u2").tobytes())
    digest.update(np.ascontiguousarray(flips, dtype=np.uint8).tobytes())
    digest.update(np.ascontiguousarray(valid, dtype=np.uint8).tobytes())
    for name in sorted(records or {}):
        value = records[name]
        digest.update(name.encode("utf-8"))
        digest.update("\n".join(map(str, value)).encode("utf-8") if value.dtype == object
                      else np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


def _first_key_difference(store_keys: list[str], data_keys: list[str]) -> str:
    for row, (a, b) in enumerate(zip(store_keys, data_keys)):
        if a != b:
            return f"row {row} is {a!r} in the store but {b!r} in --data"
    if len(store_keys) != len(data_keys):
        return f"the store has {len(store_keys)} rows, --data has {len(data_keys)}"
    return ""


def load_reference(path: str, *, data: str | None, root: str | None, source: str,
                   views: int, box_convention: str) -> Reference:
    """Open and check the reference store; ValueError naming what cannot give the same crops.

    ``data`` (optional) must list exactly the store's keys in its order; without it the
    images are read from the store's ``dataset.root``. ``views`` is the run's ``--views``:
    1 (the default) or the store's count.
    """
    import labelstore

    store = labelstore.open(path)
    where = f"--views-from {path}"
    missing = store.missing()
    if missing:
        raise ValueError(f"{where} is incomplete ({sum(b - a for a, b in missing)} rows "
                         f"missing, first {missing[0][0]}:{missing[0][1]}): its missing chunks "
                         "have no boxes; finish it first")
    attrs = store.attrs
    if int(attrs.get("box_scale", BOX_SCALE)) != BOX_SCALE:
        raise ValueError(f"{where} stores boxes on a grid of {attrs.get('box_scale')}, this ssld "
                         f"crops on {BOX_SCALE}")
    recorded = (attrs.get("preprocessing") or {}).get("box_convention")
    if recorded is None:
        raise ValueError(f"{where} records no preprocessing.box_convention: cannot tell what "
                         "its boxes mean")
    if recorded != box_convention:
        raise ValueError(f"{where} boxes follow another convention ({recorded!r}); this ssld "
                         f"crops {box_convention!r}")
    if views not in (1, store.num_views):
        raise ValueError(f"--views {views} differs from the {store.num_views} views of {where} "
                         "(leave --views out: the views come from the store)")

    dataset = attrs.get("dataset") or {}
    keys = store.keys.tolist()
    if data is not None:
        samples = find_samples(data, root=root, source=source)
        difference = _first_key_difference(keys, samples.keys)
        if difference:
            raise ValueError(f"--data {data} does not list the rows of {where}: {difference}")
    else:
        if root is not None:
            raise ValueError("--root is for list files given with --data")
        image_root = dataset.get("root")
        if root_problem(image_root):  # a URL is read when its images are
            raise FileNotFoundError(f"dataset root {image_root!r} of {where} is not a folder "
                                    "here; pass --data (with the same keys) to read the images "
                                    "elsewhere")
        names = store.class_names
        kind = dataset.get("source") or "list"
        # a store of shard data reads its rows from the shard locations it records
        tar = store.read_tar(slice(None)) if store.tar_fields else None
        samples = Samples(str(image_root), kind if names or kind != "folder" else "list", keys,
                          store.labels.astype(np.int64), list(names) if names else None, tar)

    boxes, flips, valid = stored_views(store)
    planned = PlannedViews(boxes=boxes, flips=flips, usable=valid, reason=INVALID_REASON)
    records = None
    if store.augment_dims:  # the same augmented views: its records, replayed
        store.load()  # every worker reads records and partners from RAM
        records = store.read_rows(slice(None))
        table = store.partner_table() or {}
        records.update({f"partners/{name}": value for name, value in table.items()})
    before = attrs.get("preprocessing") or {}
    preprocessing = {name: before[name] for name in ("crop_scale", "crop_ratio", "flip_prob",
                                                     "seed") if name in before}
    record = {"path": os.path.abspath(path) if "://" not in str(path) else str(path),
              "fingerprint": views_fingerprint(labelstore.fingerprint(keys), boxes, flips,
                                                 valid, records), "rows": len(store),
              "views": store.num_views, "invalid_rows": int((~valid).sum()),
              "teacher": store.teacher_name}
    return Reference(samples=samples, planned=planned, views=store.num_views,
                     chunk_rows=store.chunk_rows,
                     preprocessing=preprocessing, record=record, store=store,
                     augment=attrs.get("augment") if records is not None else None)
