"""``merge``: bit-exact concatenation, repeated keys dropped, clear compatibility errors."""
from __future__ import annotations

import numpy as np
import pytest
import zarr

import labelstore
from cli import main
from test_select import pool_rows, read_raw, write_pool


def make(tmp_path, name, keys, *, classes=6, k=2, views=2, seed=0, root=None, embeddings=True,
         teacher="resnet10t", chunk_rows=16):
    data = pool_rows(len(keys), views=views, k=k, classes=classes, seed=seed)
    return write_pool(tmp_path / name, keys, data, classes=classes, chunk_rows=chunk_rows,
                      root=root, embeddings=embeddings, teacher=teacher)


def test_merge_concatenates_bit_exactly_and_drops_repeated_keys(tmp_path):
    train = make(tmp_path, "train.zarr", [f"t/{i}.jpg" for i in range(70)], seed=1, root="/d")
    pool = make(tmp_path, "pool.zarr", [f"p/{i}.jpg" for i in range(40)] +
                [f"t/{i}.jpg" for i in range(0, 30, 3)], seed=2, root="/d")
    out = tmp_path / "merged.zarr"
    result = labelstore.merge([train, pool], out, chunk_rows=32)
    assert result.duplicates_dropped == 10 and result.rows_written == 110
    assert result.rows_kept == [70, 40] and "10 dropped: key already present" in str(result)
    a, b, merged = read_raw(train), read_raw(pool), read_raw(out)
    for name in ("indices", "probs", "residual", "boxes", "flips", "valid", "labels",
                 "embeddings", "keys"):
        expected = np.concatenate([a[name], b[name][:40]])
        np.testing.assert_array_equal(merged[name], expected, err_msg=name)
        assert merged[name].dtype == a[name].dtype
    st = labelstore.open(out)
    assert st.is_complete and st.chunk_rows == 32 and st.attrs["dataset"]["root"] == "/d"
    entry = st.attrs["provenance"][-1]
    assert entry["command"] == "merge" and entry["duplicates_dropped"] == 10
    assert [s["path"] for s in entry["sources"]] == [train, pool]
    assert [s["rows_kept"] for s in entry["sources"]] == [70, 40]
    assert entry["sources"][0]["fingerprint"] == labelstore.fingerprint(a["keys"].tolist())


def test_merge_of_a_selected_store_keeps_its_provenance_chain(tmp_path):
    train = make(tmp_path, "train.zarr", [f"t/{i}.jpg" for i in range(50)], root="/data/train")
    pool = make(tmp_path, "pool.zarr", [f"p/{i}.jpg" for i in range(90)], seed=4,
                root="/data/pool")
    labelstore.select_topk(pool, 4, tmp_path / "sel.zarr")
    labelstore.merge([train, tmp_path / "sel.zarr"], tmp_path / "m.zarr")
    st = labelstore.open(tmp_path / "m.zarr")
    assert st.attrs["dataset"]["root"] == "/data"
    keys = st.keys.tolist()
    assert keys[:50] == [f"train/t/{i}.jpg" for i in range(50)]
    assert all(k.startswith("pool/p/") for k in keys[50:])
    selected_source = st.attrs["provenance"][-1]["sources"][1]
    assert selected_source["provenance"][-1]["command"] == "select-topk"


def test_merge_without_common_embeddings_copies_labels_only(tmp_path):
    a = make(tmp_path, "a.zarr", ["x", "y"], embeddings=False)
    b = make(tmp_path, "b.zarr", ["z"], teacher="other")
    result = labelstore.merge([a, b], tmp_path / "m.zarr")
    st = labelstore.open(tmp_path / "m.zarr")
    assert not st.has_embeddings and len(st) == 3
    assert "embeddings not copied" in str(result) and "different teachers" in str(result)


@pytest.mark.parametrize("kwargs,message", [
    (dict(classes=7), r"num_classes differs: .*a.zarr has 6, .*b.zarr has 7"),
    (dict(k=3), r"topk differs: .*a.zarr has 2, .*b.zarr has 3"),
    (dict(views=1), r"views differs: .*a.zarr has 2, .*b.zarr has 1"),
])
def test_merge_names_the_difference(tmp_path, kwargs, message):
    a = make(tmp_path, "a.zarr", ["x", "y"])
    b = make(tmp_path, "b.zarr", ["z"], **kwargs)
    with pytest.raises(ValueError, match=message):
        labelstore.merge([a, b], tmp_path / "m.zarr")


def test_merge_rejects_bad_input(tmp_path):
    a = make(tmp_path, "a.zarr", ["x", "y"])
    b = make(tmp_path, "b.zarr", ["z"])
    names = ["c0", "dog"] + [f"c{i}" for i in range(2, 6)]
    zarr.open_group(b, mode="r+").attrs["class_names"] = names
    with pytest.raises(ValueError, match="class_names differ: .* 'c1' at class 1"):
        labelstore.merge([a, b], tmp_path / "m.zarr")
    with pytest.raises(ValueError, match="at least two stores"):
        labelstore.merge([a], tmp_path / "m.zarr")
    with pytest.raises(ValueError, match="given twice"):
        labelstore.merge([a, a], tmp_path / "m.zarr")
    c = make(tmp_path, "c.zarr", ["z"], root="/r1")
    with pytest.raises(ValueError, match="no dataset.root"):
        labelstore.merge([a, c], tmp_path / "m.zarr")


def test_cli_merge(tmp_path, capsys):
    a = make(tmp_path, "a.zarr", ["x", "y"])
    b = make(tmp_path, "b.zarr", ["y", "z"], seed=3)
    out = str(tmp_path / "m.zarr")
    assert main(["merge", a, b, "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "3 rows" in printed and "duplicate keys dropped: 1" in printed
    assert labelstore.open(out).keys.tolist() == ["x", "y", "z"]
    assert main(["merge", a, b, "--out", out]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["merge", a, b, "--out", out, "--overwrite"]) == 0
    c = make(tmp_path, "c.zarr", ["q"], k=3)
    assert main(["merge", a, c, "--out", str(tmp_path / "n.zarr")]) == 2
    assert "topk differs" in capsys.readouterr().err
