"""Where a loader gets the records of a row and the replay data of its mixing partners: drawn
for a first teacher pass, or read from a store (``--views-from``, ``ssld verify``, training).

Both are an :class:`Augmentation`: the fill and ops table the pixels are made with, the
records of row ``i`` of the data being read (:meth:`Augmentation.records`), and for a
``mix_partners`` value what the partner's view is made from (:meth:`Augmentation.partner`:
its key and shard location, crop and own ops and erasing), read from ``images`` (a
``teacher_infer.ImageSource``: partners in shards are read from their shards like rows).
The pixel side (``render.py``) is the same for both.

- :class:`PlannedAugmentation` (``infer-teacher --augment/--erase/--mixup/--cutmix``): the
  records are drawn (``plan_records``), a partner is another row of the data set whose boxes
  are planned from its image like the row's own. A partner that cannot be decoded makes its
  views unmixed: the stored record says so (``replay`` is false).
- :class:`StoredAugmentation`: the records are a store's, a partner is one of its rows or an
  entry of its partner table (docs/format.md) with its stored crop. The records are fixed
  (``replay``): a partner that cannot be decoded makes the row fail, never other pixels.

Nothing here imports torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .policy import AugmentSpec
from .records import ViewRecords, check_records, plan_records
from .table import Op, resolve_table


@dataclass(frozen=True)
class Partner:
    """What one mixing partner's views are made from."""

    ref: int                        # its mix_partners value
    key: str                        # below the data set's root
    tar: np.ndarray | None          # (4,) where it lies in a shard (TAR_FIELDS); None: a file
    boxes: np.ndarray | None        # (V, 4) uint16 stored crops; None: planned from its image
    flips: np.ndarray | None        # (V,) bool
    records: ViewRecords            # (V,) its own ops and erasing (never its own mixing)
    row: int | None = None          # its row in the data being read (planned boxes need it)


class Augmentation:
    """The records of the rows being read and their partners; see the module doc."""

    fill: tuple[int, int, int]
    ops: tuple[Op, ...]
    dims: dict[str, int]
    replay: bool                    # records are stored: a partner failure fails the row
    images: Any                     # teacher_infer.ImageSource: the partners' images

    def records(self, row: int) -> ViewRecords:
        """The (V,) records of row ``row`` of the data being read."""
        raise NotImplementedError

    def partner(self, ref: int) -> Partner:
        """The partner a ``mix_partners`` value names."""
        raise NotImplementedError


class PlannedAugmentation(Augmentation):
    """A first teacher pass: records drawn from (seed, key, view) with ``spec``; partners are
    rows of the same data (``keys`` in ``images``, with their ``tar`` rows when in shards;
    the store's ``chunk_rows``)."""

    replay = False

    def __init__(self, spec: AugmentSpec, *, keys: Sequence[str], images: Any,
                 seed: int, chunk_rows: int, views: int, tar: np.ndarray | None = None):
        self.spec, self.keys, self.images, self.tar = spec, keys, images, tar
        self.seed, self.chunk_rows, self.views = int(seed), int(chunk_rows), int(views)
        self.fill = tuple(int(v) for v in spec.fill)
        self.ops = resolve_table(spec.attrs()["ops_table"])
        self.dims = spec.dims()

    def records(self, row: int) -> ViewRecords:
        return plan_records(self.spec, seed=self.seed, key=self.keys[row], row=row,
                            rows=len(self.keys), chunk_rows=self.chunk_rows, views=self.views)

    def partner(self, ref: int) -> Partner:
        return Partner(ref=ref, key=self.keys[ref],
                       tar=None if self.tar is None else self.tar[ref], boxes=None,
                       flips=None, records=self.records(ref).without_mixing(), row=ref)


class StoredAugmentation(Augmentation):
    """The records of a label store (``store``: a ``LabelStore``, loaded into RAM when many
    rows are read) and its partners, their images in ``images`` (a
    ``teacher_infer.ImageSource``, or the root folder or URL of one). Row ``i`` of the data
    being read is store row ``rows[i]`` (default: the store's rows in order)."""

    replay = True

    def __init__(self, store: Any, images: Any, rows: np.ndarray | None = None):
        from ...images import ImageSource

        where = f"label store {store.path}"
        spec = AugmentSpec.from_attrs(store.attrs.get("augment"), where=where)
        if spec is None or not store.augment_dims:
            raise ValueError(f"{where} has no augmentation records")
        self.store = store
        self.images = images if isinstance(images, ImageSource) else ImageSource(images)
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        self.fill = tuple(int(v) for v in spec.fill)
        self.ops = resolve_table(store.attrs["augment"]["ops_table"], where)
        self.dims = dict(store.augment_dims)
        self.views = store.num_views

    def records(self, row: int) -> ViewRecords:
        stored = int(row if self.rows is None else self.rows[row])
        arrays = self.store.read_rows(stored)
        return ViewRecords.from_store({k: v[0] for k, v in arrays.items()}, self.dims,
                                      (self.views,))

    def partner(self, ref: int) -> Partner:
        found = self.store.partners([ref])
        own = ViewRecords.from_store({name: value[0] for name, value in found.items()},
                                     {**self.dims, "mix": 0}, (self.views,))
        tar = found["tar"][0] if "tar" in found else None
        return Partner(ref=int(ref), key=str(found["keys"][0]), tar=tar,
                       boxes=found["boxes"][0], flips=found["flips"][0].astype(bool),
                       records=own)


def check_store_records(store: Any) -> str | None:
    """Why a store's augmentation records cannot be replayed (one line; None when they can
    or the store has none): settings or an ops table this ssld does not know, or the first
    record :func:`~.records.check_records` refuses (every row is checked, block by block)."""
    if not store.augment_dims:
        return None
    import labelstore

    where = f"label store {store.path}"
    try:
        AugmentSpec.from_attrs(store.attrs.get("augment"), where=where)
        ops = resolve_table((store.attrs.get("augment") or {}).get("ops_table"), where)
    except ValueError as exc:
        return str(exc)
    names = [name for name in store.student_arrays if name not in ("logits", "log_partition")]
    for lo, hi, data in labelstore.read_blocks(store, names):
        records = ViewRecords.from_store(data, store.augment_dims, (hi - lo, store.num_views))
        problem = check_records(records, rows=np.arange(lo, hi), store_rows=len(store), ops=ops,
                                table_size=store.partner_count)
        if problem:
            return f"{where}: {problem}"
    return None
