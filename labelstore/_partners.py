"""The partner table: replay data of mixing partners that are not rows of the store.

A mixed view names its partner in ``mix_partners`` (docs/format.md, "Augmentation
records"): a row of this store (``>= 0``), or, in a store derived by ``select-topk`` or
``merge`` whose partner row was not kept, entry ``-2 - ref`` of this table; ``-1`` is "not
mixed". An entry holds what replaying the partner's view needs and nothing a student
trains on: its key (below the store's ``dataset.root``), its crop boxes and flips and its
own ops and erasing (:data:`_format.PARTNER_ARRAYS`, in the row arrays' dtypes), so a
derived store neither drops mixed views nor trains on rows that were not selected.

The table is the subgroup ``partners`` (arrays with ``partner`` for ``row``), written
whole by ``create`` and recorded as the group attribute ``partners`` (its length P).
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import zarr

from . import _format as fmt
from . import _keys

NOT_MIXED = -1


def table_ref(index: np.ndarray) -> np.ndarray:
    """The ``mix_partners`` value of table entry ``index``."""
    return -2 - np.asarray(index, dtype=np.int64)


def table_index(refs: np.ndarray) -> np.ndarray:
    """The table entry of ``mix_partners`` values ``<= -2``."""
    return -2 - np.asarray(refs, dtype=np.int64)


def table_specs(lengths: dict[str, int]) -> list[fmt.ArraySpec]:
    """The row arrays whose values a table of a store with these sizes holds."""
    return [spec for spec in map(fmt.array_spec, fmt.PARTNER_ARRAYS) if spec.present(lengths)]


def _shape(spec: fmt.ArraySpec, lengths: dict[str, int], count: int) -> tuple[int, ...]:
    return (count,) + spec.shape(lengths)[1:]


def check_values(table: Mapping[str, Any], lengths: dict[str, int]) -> dict[str, Any]:
    """The table's arrays in their stored dtypes; ValueError naming a missing or misshapen
    one (keys as a list of str)."""
    wanted = table_specs(lengths)
    names = {spec.name for spec in wanted}
    if set(table) != names:
        raise ValueError(f"partners: expected the arrays {sorted(names)}, got {sorted(table)}")
    keys = [str(key) for key in table["keys"]]
    count = len(keys)
    out: dict[str, Any] = {"keys": keys}
    bad = fmt.first_bad_key(keys)
    if bad is not None:
        raise ValueError(f"partners: key {keys[bad[0]]!r} {bad[1]}; {fmt.KEY_RULE}")
    for spec in wanted:
        if spec.name == "keys":
            continue
        value = np.asarray(table[spec.name])
        shape = _shape(spec, lengths, count)
        dtype = fmt.stored_dtype(spec, 0)
        if value.shape != shape or value.dtype != dtype:
            raise ValueError(f"partners: {spec.name} must be {dtype} of shape {shape}, got "
                             f"{value.dtype} {value.shape}")
        out[spec.name] = value
    return out


def write_table(group: zarr.Group, table: Mapping[str, Any], lengths: dict[str, int],
                chunk_rows: int, config: dict) -> int:
    """Write the checked ``table`` as the ``partners`` subgroup; returns its length."""
    values = check_values(table, lengths)
    count = len(values["keys"])
    if not count:
        return 0
    sub = group.create_group(fmt.PARTNER_GROUP)
    for spec in table_specs(lengths):
        shape = _shape(spec, lengths, count)
        array = sub.create_array(
            spec.name, shape=shape, chunks=(min(chunk_rows, count),) + shape[1:],
            dtype=fmt.stored_dtype(spec, 0), fill_value=spec.fill,
            compressors=fmt.compressors(spec.compress),
            dimension_names=("partner",) + spec.dims[1:], config=config)
        if spec.name == "keys":
            _keys.write(array, _keys.JoinedKeys.of(values["keys"]))
        else:
            array[:] = values[spec.name]
    return count


def structure_problem(group: zarr.Group, attrs: Mapping[str, Any],
                      lengths: dict[str, int], stored: set[str] | None) -> str | None:
    """What is wrong with the table the attributes promise (None: nothing); ``stored`` (the
    keys below the group, when the store promises every chunk) also checks its chunks."""
    count = int(attrs.get("partners") or 0)
    if not count:
        return None
    for spec in table_specs(lengths):
        try:
            array = group[f"{fmt.PARTNER_GROUP}/{spec.name}"]
        except KeyError:
            return f"array '{fmt.PARTNER_GROUP}/{spec.name}' is missing"
        shape = _shape(spec, lengths, count)
        if tuple(array.shape) != shape:
            return (f"array '{fmt.PARTNER_GROUP}/{spec.name}' has shape {tuple(array.shape)}, "
                    f"its attributes say {shape}")
        if stored is not None:
            from ._chunks import chunk_key

            rows = int(array.chunks[0])
            for chunk in range((count + rows - 1) // rows):
                key = chunk_key(array, (chunk,) + (0,) * (array.ndim - 1))
                if f"{fmt.PARTNER_GROUP}/{spec.name}/{key}" not in stored:
                    return (f"chunk {chunk} of array '{fmt.PARTNER_GROUP}/{spec.name}' is "
                            "missing")
    return None


def read_table(group: zarr.Group, lengths: dict[str, int], count: int) -> dict[str, np.ndarray]:
    """The whole table, stored dtypes (keys as an object array of str)."""
    out = {}
    for spec in table_specs(lengths):
        array = group[f"{fmt.PARTNER_GROUP}/{spec.name}"]
        if spec.name == "keys":
            out["keys"] = _keys.read(array, 0, count) if count else np.empty(0, dtype=object)
        else:
            out[spec.name] = np.asarray(array[:])
    return out
