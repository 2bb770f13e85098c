"""The label store: round trips, chunk ownership, resume, reads, dense, bad input."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import zarr

import labelstore
from labelstore import _format as fmt


def random_labels(n: int, views: int, k: int, classes: int, seed: int = 0):
    """Teacher-like rows: top-k of a random softmax, best first, plus random boxes/flips."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=3.0, size=(n, views, classes))
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    order = np.argsort(-probs, axis=-1, kind="stable")[..., :k]
    top = np.take_along_axis(probs, order, -1)
    h = rng.uniform(0.2, 1.0, size=(n, views))
    w = rng.uniform(0.2, 1.0, size=(n, views))
    boxes = np.stack([rng.uniform(0, 1 - h), rng.uniform(0, 1 - w), h, w], -1)
    flips = rng.random((n, views)) < 0.5
    return dict(indices=order, probs=top, residual=1 - top.sum(-1), boxes=boxes, flips=flips,
                dense=probs)


def make_store(path, n=300, views=2, k=4, classes=20, chunk_rows=64, seed=0, labels=True,
               invalid=(), **create_kw):
    data = random_labels(n, views, k, classes, seed)
    keys = [f"class_{i % 7}/img_{i:05d}.jpg" for i in range(n)]
    label_array = (np.arange(n) % classes) if labels else None
    valid = np.ones(n, dtype=bool)
    valid[list(invalid)] = False
    with labelstore.create(path, keys=keys, num_classes=classes, topk=k, views=views,
                           labels=label_array, chunk_rows=chunk_rows,
                           attrs={"teacher": {"model": "resnet10t"}}, **create_kw) as writer:
        writer.write(0, data["indices"], data["probs"], residual=data["residual"],
                     boxes=data["boxes"], flips=data["flips"], valid=valid)
    data.update(keys=np.array(keys, dtype=object), labels=label_array, valid=valid)
    return data


@pytest.fixture
def store_path(tmp_path):
    return str(tmp_path / "labels.zarr")


# -- round trip and format ------------------------------------------------------

def test_round_trip_matches_input(store_path):
    data = make_store(store_path)
    st = labelstore.open(store_path)
    assert len(st) == 300 and st.num_views == 2 and st.topk == 4 and st.num_classes == 20
    assert st.is_complete and st.attrs["complete"] is True
    part = st.read(slice(None))
    assert part.indices.dtype == np.int64 and part.indices.shape == (300, 2, 4)
    assert part.probs.dtype == np.float32 and part.boxes.dtype == np.float32
    np.testing.assert_array_equal(part.indices, data["indices"])
    np.testing.assert_allclose(part.probs, data["probs"], rtol=1e-3, atol=1e-4)  # fp16
    np.testing.assert_allclose(part.residual, data["residual"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(part.boxes, data["boxes"], atol=1 / fmt.BOX_SCALE)
    np.testing.assert_array_equal(part.flips, data["flips"])
    np.testing.assert_array_equal(st.keys, data["keys"])
    np.testing.assert_array_equal(st.labels, data["labels"])


def test_store_layout_follows_format_v1(store_path):
    data = random_labels(130, 1, 3, 10)
    w = labelstore.create(store_path, keys=[f"k{i}" for i in range(130)], num_classes=10, topk=3,
                          chunk_rows=64, embedding_dim=8,
                          attrs={"dataset": {"root": "/data", "source": "folder"}})
    w.write(0, data["indices"], data["probs"], embeddings=np.ones((130, 8), np.float32))
    w.close()
    group = zarr.open_group(store_path, mode="r")
    expected = {"keys": (130,), "labels": (130,), "indices": (130, 1, 3), "probs": (130, 1, 3),
                "residual": (130, 1), "boxes": (130, 1, 4), "flips": (130, 1), "valid": (130,),
                "done": (3,), "embeddings": (130, 8)}
    for name, shape in expected.items():
        assert group[name].shape == shape, name
    assert group["indices"].dtype == np.uint16 and group["probs"].dtype == np.float16
    assert group["residual"].dtype == np.float32 and group["embeddings"].dtype == np.float16
    assert group["indices"].chunks == (64, 1, 3) and group["done"].chunks == (1,)
    attrs = dict(group.attrs)
    assert attrs["format"] == "ssld.labelstore" and attrs["format_version"] == 1
    for key in ("num_classes", "topk", "views", "temperature", "chunk_rows", "created",
                "software", "complete", "dataset"):
        assert key in attrs, key
    assert attrs["dataset"]["root"] == "/data" and attrs["dataset"]["num_samples"] == 130
    assert attrs["dataset"]["fingerprint"] == labelstore.fingerprint(f"k{i}" for i in range(130))
    json.dumps(attrs)  # every attribute is JSON


def test_indices_widen_to_int32_beyond_uint16(store_path):
    w = labelstore.create(store_path, keys=["a"], num_classes=70000, topk=2)
    w.write(0, np.array([[[69999, 3]]]), np.array([[[0.5, 0.25]]]))
    w.close()
    assert zarr.open_group(store_path, mode="r")["indices"].dtype == np.int32
    assert labelstore.open(store_path).read(0).indices.tolist() == [[[69999, 3]]]


# -- reads ----------------------------------------------------------------------

@pytest.mark.parametrize("loaded", [False, True])
def test_read_random_unsorted_repeated_rows_in_order(store_path, loaded):
    data = make_store(store_path)
    st = labelstore.open(store_path)
    if loaded:
        assert st.load() is st and st.is_loaded
    rows = np.array([299, 5, 5, 130, 0, 64, 63, 299, -1])
    part = st.read(rows)
    wanted = rows % 300
    np.testing.assert_array_equal(part.rows, wanted)
    np.testing.assert_array_equal(part.indices, data["indices"][wanted])
    np.testing.assert_array_equal(part.flips, data["flips"][wanted])
    np.testing.assert_allclose(part.residual, data["residual"][wanted], rtol=1e-6)
    assert st.read(7).indices.shape == (1, 2, 4)
    np.testing.assert_array_equal(st.read(slice(10, 200, 7)).indices,
                                  data["indices"][10:200:7])
    assert len(st.read(np.array([], dtype=np.int64))) == 0


def test_dense_matches_float64_reconstruction(store_path):
    data = make_store(store_path)
    st = labelstore.open(store_path)
    rows = np.array([3, 77, 200])
    for view in (0, 1):
        dense = st.dense(rows, view=view)
        assert dense.shape == (3, 20) and dense.dtype == np.float32
        np.testing.assert_allclose(dense.sum(1), 1.0, atol=1e-6)
        # hand computation in float64 from the fp16-rounded stored values
        part = st.read(rows)
        for i in range(3):
            ref = np.full(20, float(part.residual[i, view]) / (20 - 4))
            ref[part.indices[i, view]] = part.probs[i, view].astype(np.float64)
            ref /= ref.sum()
            np.testing.assert_allclose(dense[i], ref, rtol=1e-5, atol=1e-7)
        # the top-k classes keep their ranking and are close to the teacher's own values
        np.testing.assert_allclose(np.take_along_axis(dense, data["indices"][rows, view], 1),
                                   data["probs"][rows, view], rtol=2e-3, atol=1e-4)


def test_dense_when_topk_covers_all_classes(store_path):
    w = labelstore.create(store_path, keys=["a", "b"], num_classes=3, topk=3)
    w.write(0, np.array([[[2, 0, 1]], [[0, 1, 2]]]),
            np.array([[[0.5, 0.3, 0.2]], [[0.0, 0.0, 0.0]]]), valid=np.array([True, False]))
    w.close()
    dense = labelstore.open(store_path).dense([0, 1])
    np.testing.assert_allclose(dense[0], [0.3, 0.2, 0.5], rtol=1e-3)
    np.testing.assert_allclose(dense[1], [1 / 3] * 3)  # an empty invalid row: uniform, not NaN


def test_valid_flags_and_embeddings(store_path):
    make_store(store_path, invalid=(4, 150))
    st = labelstore.open(store_path)
    assert np.flatnonzero(~st.read(slice(None)).valid).tolist() == [4, 150]
    assert np.flatnonzero(~st.valid).tolist() == [4, 150]          # without reading the labels
    assert np.flatnonzero(~st.in_memory().valid).tolist() == [4, 150]
    assert not st.has_embeddings
    with pytest.raises(ValueError, match="no embeddings"):
        st.read_embeddings([0])


def test_repr_info_and_dataframe(store_path):
    make_store(store_path, n=100)
    st = labelstore.open(store_path)
    line = repr(st)
    assert "\n" not in line and "N=100" in line and "resnet10t" in line and "complete" in line
    table = repr(st.info)
    assert "Rows" in table and "100" in table and "<table>" in st.info._repr_html_()
    pd = pytest.importorskip("pandas")
    frame = st.to_dataframe(view=1)
    assert isinstance(frame, pd.DataFrame) and len(frame) == 100
    part = st.read(slice(None))
    np.testing.assert_array_equal(frame["top1"].to_numpy(), part.indices[:, 1, 0])
    assert list(frame.columns[:2]) == ["key", "label"]


def test_read_from_fsspec_url(store_path):
    data = make_store("file://" + store_path, n=100)  # file:// URLs create stores too
    st = labelstore.open("file://" + store_path)
    np.testing.assert_array_equal(st.read([9, 1]).indices, data["indices"][[9, 1]])
    assert st.is_complete


def test_read_from_fsspec_memory_filesystem():
    fsspec = pytest.importorskip("fsspec")
    n = 50
    data = random_labels(n, 1, 3, 10)
    url = "memory://ssld-test/labels.zarr"
    with labelstore.create(url, keys=[f"k{i}" for i in range(n)], num_classes=10, topk=3,
                           chunk_rows=16) as w:
        w.write(0, data["indices"], data["probs"])
    st = labelstore.open(url)
    assert st.is_complete and len(st) == n
    np.testing.assert_array_equal(st.read([3, 40]).indices, data["indices"][[3, 40]])
    fsspec.filesystem("memory").rm("/ssld-test", recursive=True)


# -- chunk ownership, resume, completion ------------------------------------------

def test_partial_chunks_stay_missing_until_filled(store_path):
    data = random_labels(200, 1, 3, 10)
    w = labelstore.create(store_path, keys=[f"k{i}" for i in range(200)], num_classes=10,
                          topk=3, chunk_rows=64)
    assert w.missing() == [(0, 200)]
    w.write(0, data["indices"][:100], data["probs"][:100])  # chunk 0 whole, chunk 1 partly
    assert w.missing() == [(64, 200)]
    w.write(128, data["indices"][128:], data["probs"][128:])  # chunks 2, 3 (last is short)
    assert w.missing() == [(64, 128)]
    with pytest.warns(UserWarning, match="36 buffered rows"):
        w.close()
    st = labelstore.open(store_path)
    assert not st.is_complete and st.attrs["complete"] is False
    with pytest.raises(ValueError, match="incomplete: 64 of 200 rows missing"):
        st.require_complete()
    # resume with mode="a": write the rest, the store becomes complete and equals the input
    w = labelstore.open(store_path, mode="a")
    assert isinstance(w, labelstore.LabelStoreWriter) and w.missing() == [(64, 128)]
    w.write(64, data["indices"][64:128], data["probs"][64:128])
    w.close()
    st = labelstore.open(store_path)
    assert st.is_complete and st.attrs["complete"] is True
    np.testing.assert_array_equal(st.read(slice(None)).indices, data["indices"])


def test_done_is_set_only_after_the_chunk_data(store_path):
    data = random_labels(128, 1, 3, 10)
    w = labelstore.create(store_path, keys=[f"k{i}" for i in range(128)], num_classes=10,
                          topk=3, chunk_rows=64)
    writes = []

    class Recording:
        def __init__(self, name, array):
            self.name, self.array = name, array

        def __setitem__(self, where, value):
            writes.append(self.name)
            self.array[where] = value

        def __getitem__(self, where):
            return self.array[where]

    w._arrays = {name: Recording(name, array) for name, array in w._arrays.items()}
    w.write(0, data["indices"][:64], data["probs"][:64])
    assert writes[-1] == "done" and "done" not in writes[:-1]
    assert set(writes[:-1]) == {"indices", "probs", "residual", "boxes", "flips", "valid"}
    assert zarr.open_group(store_path, mode="r")["done"][:].tolist() == [True, False]


def test_exception_in_context_does_not_mark_complete(store_path):
    data = random_labels(10, 1, 2, 5)
    with pytest.raises(RuntimeError):
        with labelstore.create(store_path, keys=[f"k{i}" for i in range(10)], num_classes=5,
                               topk=2) as w:
            w.write(0, data["indices"][:5], data["probs"][:5])
            raise RuntimeError("teacher crashed")
    assert not labelstore.open(store_path).is_complete


WORKER = textwrap.dedent("""
    import sys, numpy as np, labelstore
    path, rank, world = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    data = np.load(sys.argv[4])
    w = labelstore.open(path, mode="a")
    for chunk in range(rank, w.num_chunks, world):   # each process owns whole chunks
        lo, hi = w.chunk_range(chunk)
        for a in range(lo, hi, 10):                   # small batches, like an inference loop
            b = min(a + 10, hi)
            w.write(a, data["indices"][a:b], data["probs"][a:b], boxes=data["boxes"][a:b],
                    flips=data["flips"][a:b])
    w.close()
""")


def test_two_processes_writing_disjoint_chunks(tmp_path, store_path):
    n, views = 1000, 2
    data = random_labels(n, views, 5, 30, seed=3)
    np.savez(tmp_path / "data.npz", **{k: data[k] for k in ("indices", "probs", "boxes", "flips")})
    labelstore.create(store_path, keys=[f"img{i}" for i in range(n)], num_classes=30, topk=5,
                      views=views, chunk_rows=64).close()
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, store_path, str(rank), "2",
                               str(tmp_path / "data.npz")]) for rank in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    st = labelstore.open(store_path)
    assert st.is_complete and st.attrs["complete"] is True
    part = st.read(slice(None))
    np.testing.assert_array_equal(part.indices, data["indices"])
    np.testing.assert_allclose(part.probs, data["probs"], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(part.boxes, data["boxes"], atol=1 / fmt.BOX_SCALE)
    np.testing.assert_array_equal(part.flips, data["flips"])


def test_box_quantisation_is_idempotent():
    rng = np.random.default_rng(0)
    boxes = rng.random((100, 4))
    once = labelstore.dequantize_boxes(labelstore.quantize_boxes(boxes))
    np.testing.assert_array_equal(labelstore.quantize_boxes(once), labelstore.quantize_boxes(boxes))
    np.testing.assert_allclose(once, boxes, atol=0.5 / fmt.BOX_SCALE + 1e-7)


# -- bad input --------------------------------------------------------------------

def test_open_rejects_missing_path_and_non_store(tmp_path):
    with pytest.raises(FileNotFoundError, match="no label store"):
        labelstore.open(tmp_path / "absent.zarr")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "x.txt").write_text("hello")
    with pytest.raises(ValueError, match="not an ssld label store"):
        labelstore.open(tmp_path / "plain")
    zarr.open_group(tmp_path / "other.zarr", mode="w").attrs.update({"format": "something"})
    with pytest.raises(ValueError, match="format attribute is 'something'"):
        labelstore.open(tmp_path / "other.zarr")
    with pytest.raises(ValueError, match="mode must be"):
        labelstore.open(tmp_path / "other.zarr", mode="w")


def test_open_rejects_other_format_version(store_path):
    make_store(store_path, n=10)
    zarr.open_group(store_path, mode="r+").attrs.update({"format_version": 2})
    with pytest.raises(ValueError, match="format version 2"):
        labelstore.open(store_path)
    with pytest.raises(ValueError, match="format version 2"):
        labelstore.open(store_path, mode="a")


@pytest.mark.parametrize("kwargs, message", [
    (dict(keys=["a", "b", "a"]), "duplicate key 'a' at rows 0 and 2"),
    (dict(keys=[]), "non-empty"),
    (dict(topk=11), "topk must be in"),
    (dict(topk=0), "topk must be in"),
    (dict(num_classes=0), "num_classes must be >= 1"),
    (dict(views=0), "views must be >= 1"),
    (dict(chunk_rows=0), "chunk_rows must be >= 1"),
    (dict(labels=[0, 1, 10]), "label 10 at row 2"),
    (dict(labels=[0, -2, 1]), "label -2 at row 1"),
    (dict(labels=[0.5, 1, 1]), "must be integers"),
    (dict(labels=[0, 1]), r"shape \(3,\)"),
    # keys travel one per line through failed.txt, --list-out and --exclude files
    (dict(keys=["a", "b\nc", "d"]), r"key 'b\\nc' at row 1 contains a newline; keys go one"),
    (dict(keys=["a", "b", "c\td"]), r"key 'c\\td' at row 2 contains a tab"),
    (dict(keys=["a\r", "b", "c"]), "at row 0 contains a carriage return"),
    (dict(keys=["a", " b", "c"]), "at row 1 starts or ends with whitespace"),
    (dict(keys=["a", "b", "c "]), "at row 2 starts or ends with whitespace"),
    (dict(keys=["a", "b\u2028", "c"]), "at row 1 contains a line separator"),
    (dict(keys=["a", "b", "\udcff.jpg"]), "at row 2 is not valid UTF-8"),
])
def test_create_rejects_bad_arguments(store_path, kwargs, message):
    args = dict(keys=["a", "b", "c"], num_classes=10, topk=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        labelstore.create(store_path, **args)


def test_create_refuses_to_overwrite_unless_asked(store_path):
    make_store(store_path, n=10)
    with pytest.raises(FileExistsError, match="already exists"):
        labelstore.create(store_path, keys=["a"], num_classes=3, topk=1)
    labelstore.create(store_path, keys=["a"], num_classes=3, topk=1, overwrite=True).close()
    assert len(labelstore.open(store_path)) == 1


def _writer(path, n=20, views=1, k=3, classes=10):
    return labelstore.create(path, keys=[f"k{i}" for i in range(n)], num_classes=classes,
                             topk=k, views=views, chunk_rows=8)


GOOD_INDICES = np.tile(np.array([[[0, 1, 2]]]), (4, 1, 1))
GOOD_PROBS = np.tile(np.array([[[0.5, 0.2, 0.1]]]), (4, 1, 1))


@pytest.mark.parametrize("change, message", [
    (dict(indices=GOOD_INDICES[:, :, :2]), r"indices must have shape \(4, 1, 3\)"),
    (dict(indices=GOOD_INDICES[0]), r"indices must have shape \(n, 1, 3\)"),
    (dict(probs=GOOD_PROBS[:3]), r"probs must have shape \(4, 1, 3\)"),
    (dict(indices=GOOD_INDICES.astype(float)), "indices must be integer"),
    (dict(probs=GOOD_PROBS.astype(int)), "probs must be floating"),
    (dict(indices=GOOD_INDICES + 8), r"class id 10 at row 0 view 0 is outside \[0, 10\)"),
    (dict(indices=GOOD_INDICES - 1), r"class id -1 at row 0 view 0 is outside"),
    (dict(indices=np.tile(np.array([[[4, 4, 2]]]), (4, 1, 1))), "repeats a class id"),
    (dict(probs=np.where(np.arange(4)[:, None, None] == 2, np.nan, GOOD_PROBS)),
     r"NaN or inf \(row 2\)"),
    (dict(probs=GOOD_PROBS * np.array([1, 1, -1])), "probs must be >= 0"),
    (dict(probs=GOOD_PROBS * 2), "sum to 1.600000 > 1"),
    (dict(residual=np.full((4, 1), 2.0)), "residual must be finite and within"),
    (dict(residual=np.ones((4, 2))), r"residual must have shape \(4, 1\)"),
    (dict(boxes=np.full((4, 1, 4), 0.7)), "boxes must be"),
    (dict(flips=np.zeros((4, 1), dtype=int)), "flips must be boolean"),
    (dict(valid=np.ones(3, dtype=bool)), r"valid must have shape \(4,\)"),
    (dict(start=18), r"rows \[18, 22\) are out of range for a store of 20 rows"),
    (dict(start=-1), r"rows \[-1, 3\) are out of range"),
    (dict(start=1.5), "start must be an integer"),
    (dict(embeddings=np.zeros((4, 8))), "created without embeddings"),
])
def test_write_rejects_bad_rows(store_path, change, message):
    args = dict(start=0, indices=GOOD_INDICES, probs=GOOD_PROBS)
    args.update(change)
    w = _writer(store_path)
    with pytest.raises(ValueError, match=message):
        w.write(args.pop("start"), args.pop("indices"), args.pop("probs"), **args)
    assert w.missing() == [(0, 20)]  # nothing was written


def test_fp16_rounding_within_tolerance_is_accepted(store_path):
    w = _writer(store_path, n=1, k=2, classes=3)
    w.write(0, np.array([[[0, 1]]]), np.array([[[0.7005, 0.3]]]))  # sum 1.0005 ≤ 1 + 1e-3
    w.close()
    assert labelstore.open(store_path).read(0).residual[0, 0] == 0.0


@pytest.mark.parametrize("rows", [20, -21, [0, 25], np.array([[1, 2]]), np.array([0.5]), True,
                                  np.ones(5, dtype=bool)])
def test_read_rejects_rows_out_of_range_or_malformed(store_path, rows):
    w = _writer(store_path)
    w.write(0, np.tile(GOOD_INDICES[:1], (20, 1, 1)), np.tile(GOOD_PROBS[:1], (20, 1, 1)))
    w.close()
    st = labelstore.open(store_path)
    with pytest.raises(ValueError, match="out of range|must be|row mask"):
        st.read(rows)
    with pytest.raises(ValueError, match="view 3 is out of range"):
        st.dense([0], view=3)


def test_writer_rejects_writes_after_close(store_path):
    w = _writer(store_path)
    w.close()
    with pytest.raises(ValueError, match="closed"):
        w.write(0, GOOD_INDICES, GOOD_PROBS)


def test_xarray_opens_a_store_as_a_labelled_dataset(store_path):
    xr = pytest.importorskip("xarray")
    data = make_store(store_path, n=70, views=2, k=4, classes=20, chunk_rows=32,
                      embedding_dim=None)
    for ds in (xr.open_zarr(store_path, consolidated=False),
               labelstore.open(store_path).to_xarray()):
        assert ds.sizes == {"row": 70, "view": 2, "rank": 4, "box": 4, "chunk": 3}
        assert ds["probs"].dims == ("row", "view", "rank")
        assert ds["boxes"].dims == ("row", "view", "box") and ds["done"].dims == ("chunk",)
        assert ds.attrs["format"] == "ssld.labelstore" and ds.attrs["topk"] == 4
        np.testing.assert_array_equal(ds["indices"].values, data["indices"])
        np.testing.assert_array_equal(ds["probs"].values, data["probs"].astype(np.float16))
        assert ds["keys"].values.tolist() == data["keys"].tolist()
        top1 = ds["probs"].isel(view=0, rank=0).to_pandas()   # a pandas view, labelled by row
        assert len(top1) == 70
