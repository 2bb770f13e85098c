"""``_format.SCHEMA`` is the one store schema: a field added there (and nowhere else) is
created, checked, written, read, selected, merged, combined and exported."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
import zarr

import labelstore
from labelstore import _format as fmt
from labelstore._export import export_hdf5
from test_select import pool_rows

# A field no module names: a per-view quality score, float32, fill -1.
MARGIN = fmt.ArraySpec("margin", ("row", "view"), np.float32, -1.0, read_as=np.float64)


@pytest.fixture
def with_margin(monkeypatch):
    """SCHEMA with one more entry (before ``done``); nothing else is edited."""
    monkeypatch.setattr(fmt, "SCHEMA", fmt.SCHEMA[:-1] + (MARGIN,) + fmt.SCHEMA[-1:])


def write(path, keys, *, seed, root="/data", classes=6, k=2, views=2, margin=True,
          same_crops_as=None):
    data = pool_rows(len(keys), views=views, k=k, classes=classes, seed=seed)
    if same_crops_as is not None:  # an ensemble's members label the same crops
        data.update({name: same_crops_as[name] for name in ("boxes", "flips")})
    data["margin"] = np.random.default_rng(seed + 100).random((len(keys), views))
    extra = {"margin": data["margin"]} if margin else {}
    with labelstore.create(path, keys=keys, num_classes=classes, topk=k, views=views,
                           labels=data["labels"], chunk_rows=16, embedding_dim=8,
                           attrs={"dataset": {"root": root}}) as writer:
        writer.write(0, data["indices"], data["probs"], boxes=data["boxes"],
                     flips=data["flips"], valid=data["valid"], embeddings=data["embeddings"],
                     **extra)
    return str(path), data


def stored_margin(path) -> np.ndarray:
    return np.asarray(zarr.open_group(str(path), mode="r")["margin"][:])


def test_new_field_is_created_written_and_read(tmp_path, with_margin):
    path, data = write(tmp_path / "a.zarr", [f"a/{i}.jpg" for i in range(40)], seed=1)
    array = zarr.open_group(path, mode="r")["margin"]
    assert array.shape == (40, 2) and array.chunks == (16, 2) and array.dtype == np.float32
    assert tuple(array.metadata.dimension_names) == ("row", "view")
    assert "Crc32cCodec" in str(array.metadata.codecs)  # same integrity as every array
    np.testing.assert_array_equal(array[:], data["margin"].astype(np.float32))

    st = labelstore.open(path)
    rows = np.array([39, 3, 17, 3])
    for reader in (st, labelstore.open(path).load()):
        part = reader.read(rows)
        assert part.margin.dtype == np.float64 and part["margin"] is part.margin
        np.testing.assert_array_equal(part.margin, data["margin"].astype(np.float32)[rows])
    assert "margin" in st.load()._ram

    # not given: its fill value; given wrong: refused by name
    with labelstore.create(tmp_path / "b.zarr", keys=["x", "y"], num_classes=3, topk=2) as w:
        with pytest.raises(ValueError, match=r"margin must have shape \(2, 1\)"):
            w.write(0, np.array([[[0, 1]], [[1, 2]]]), np.full((2, 1, 2), 0.25),
                    margin=np.zeros(2))
        w.write(0, np.array([[[0, 1]], [[1, 2]]]), np.full((2, 1, 2), 0.25))
    np.testing.assert_array_equal(stored_margin(tmp_path / "b.zarr"), [[-1.0], [-1.0]])
    # a name the schema does not have is refused
    with pytest.raises(ValueError, match="no array 'margn'"):
        labelstore.open(path, mode="a").write(0, data["indices"][:16], data["probs"][:16],
                                              margn=np.zeros((16, 2)))


def test_store_without_the_new_field_is_reported_damaged(tmp_path, monkeypatch):
    path, _ = write(tmp_path / "old.zarr", ["x", "y"], seed=0, margin=False)
    monkeypatch.setattr(fmt, "SCHEMA", fmt.SCHEMA[:-1] + (MARGIN,) + fmt.SCHEMA[-1:])
    with pytest.raises(labelstore.DamagedStoreError, match="array 'margin' is missing"):
        labelstore.open(path)


def test_new_field_is_carried_by_select_merge_ensemble_and_export(tmp_path, with_margin):
    pool, pool_data = write(tmp_path / "pool.zarr", [f"p/{i}.jpg" for i in range(90)], seed=2)
    train, train_data = write(tmp_path / "train.zarr", [f"t/{i}.jpg" for i in range(30)],
                              seed=3)

    result = labelstore.select_topk(pool, 5, tmp_path / "sel.zarr")
    chosen = np.unique(result.selection.rows)
    np.testing.assert_array_equal(stored_margin(tmp_path / "sel.zarr"),
                                  stored_margin(pool)[chosen])

    labelstore.merge([train, tmp_path / "sel.zarr"], tmp_path / "merged.zarr")
    np.testing.assert_array_equal(stored_margin(tmp_path / "merged.zarr"), np.concatenate(
        [stored_margin(train), stored_margin(pool)[chosen]]))

    twin, twin_data = write(tmp_path / "twin.zarr", [f"p/{i}.jpg" for i in range(90)], seed=4,
                            same_crops_as=pool_data)
    labelstore.ensemble([pool, twin], tmp_path / "ens.zarr")
    valid = pool_data["valid"] & twin_data["valid"]
    expected = np.where(valid[:, None], stored_margin(pool), MARGIN.fill)
    np.testing.assert_array_equal(stored_margin(tmp_path / "ens.zarr"), expected)

    out = tmp_path / "pool.h5"
    export_hdf5(labelstore.open(pool), str(out), slice(10, 70))
    with h5py.File(out, "r") as h5:
        assert h5["margin"].dtype == np.float32
        np.testing.assert_array_equal(h5["margin"][:], stored_margin(pool)[10:70])
