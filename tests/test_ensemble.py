"""labelstore.ensemble / ``ssld ensemble``: equals a float64 reference built from the members'
dense rows, refuses members that do not label the same crops, resumes, and its output is a
store like any other (verify --structure-only, train-student)."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import zarr

import labelstore
from cli import main
from labelstore import _ensemble
from test_labelstore_paths import refused

CLASSES, VIEWS, ROWS, CHUNK = 20, 2, 37, 8
FP16 = 1e-3   # k fp16 roundings of probabilities summing to <= 1, with room


def make_member(path, *, seed: int, k: int, invalid=(), keys=None, boxes=None, classes=CLASSES):
    """A store of random top-k distributions over the same rows and views."""
    rng = np.random.default_rng(seed)
    keys = keys or [f"img{i:03d}.jpg" for i in range(ROWS)]
    logits = rng.normal(scale=3.0, size=(ROWS, VIEWS, classes))
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    order = np.argsort(-probs, axis=-1)[..., :k]
    top = np.take_along_axis(probs, order, axis=-1)
    if boxes is None:
        box_rng = np.random.default_rng(99)   # the same crops for every member
        y0x0 = box_rng.uniform(0, 0.4, size=(ROWS, VIEWS, 2))
        boxes = np.concatenate([y0x0, box_rng.uniform(0.2, 0.6, size=(ROWS, VIEWS, 2))], -1)
    flips = np.random.default_rng(98).random((ROWS, VIEWS)) < 0.5
    valid = np.ones(ROWS, dtype=bool)
    valid[list(invalid)] = False
    with labelstore.create(str(path), keys=keys, num_classes=classes, topk=k, views=VIEWS,
                           labels=np.arange(ROWS) % classes, chunk_rows=CHUNK,
                           attrs={"dataset": {"root": "/images"},
                                  "teacher": {"model": f"teacher{seed}"}}) as writer:
        writer.write(0, order, top, boxes=boxes, flips=flips, valid=valid)
    return str(path)


@pytest.fixture
def members(tmp_path):
    return [make_member(tmp_path / "a.zarr", seed=1, k=4, invalid=[3]),
            make_member(tmp_path / "b.zarr", seed=2, k=6, invalid=[10, 11]),
            make_member(tmp_path / "c.zarr", seed=3, k=4)]


def reference(paths, weights, rule):
    """(N, V, C) float64: the members' dense rows combined by hand."""
    stores = [labelstore.open(p) for p in paths]
    out = np.zeros((ROWS, VIEWS, CLASSES))
    for view in range(VIEWS):
        dense = [s.dense(slice(None), view=view).astype(np.float64) for s in stores]
        if rule == "mean":
            total = sum(w * d for w, d in zip(weights, dense))
        else:
            total = np.exp(sum(w * np.log(d) for w, d in zip(weights, dense)))
        out[:, view] = total / total.sum(-1, keepdims=True)
    return out


def assert_matches_reference(out, expected, valid):
    got = labelstore.open(out).read(slice(None))
    np.testing.assert_array_equal(got.valid, valid)
    rows = np.flatnonzero(valid)
    k = got.indices.shape[-1]
    # the stored probabilities are the reference's at the stored classes, and its top-k values
    at = np.take_along_axis(expected, got.indices, axis=-1)[rows]
    np.testing.assert_allclose(got.probs[rows], at, atol=FP16)
    top = -np.sort(-expected, axis=-1)[..., :k][rows]
    np.testing.assert_allclose(got.probs[rows], top, atol=FP16)
    np.testing.assert_allclose(got.residual[rows], 1 - top.sum(-1), atol=FP16)


@pytest.mark.parametrize("rule", ["mean", "geomean"])
def test_equals_a_float64_reference(members, tmp_path, rule, monkeypatch):
    monkeypatch.setattr(_ensemble, "BLOCK_ROWS", 5)  # several blocks per chunk
    weights = [0.5, 0.3, 0.2]
    out = str(tmp_path / "e.zarr")
    result = labelstore.ensemble(members, out, weights=[5, 3, 2], rule=rule, topk=5)
    assert result.weights == pytest.approx(weights)
    valid = np.ones(ROWS, dtype=bool)
    valid[[3, 10, 11]] = False          # invalid in any member
    assert_matches_reference(out, reference(members, weights, rule), valid)
    assert result.invalid == 3 and result.rows_computed == ROWS
    store = labelstore.open(out)
    assert store.topk == 5 and store.is_complete
    sources = store.attrs["provenance"][0]["sources"]
    assert [s["path"] for s in sources] == members
    assert store.attrs["teacher"]["model"] == "ensemble(teacher1+teacher2+teacher3)"
    first = labelstore.open(members[0]).read(slice(None))
    got = store.read(slice(None))
    np.testing.assert_array_equal(got.boxes[valid], first.boxes[valid])
    np.testing.assert_array_equal(got.flips[valid], first.flips[valid])
    assert not got.boxes[~valid].any()
    assert labelstore.verify(out).ok


def test_default_k_and_weights(members, tmp_path):
    out = str(tmp_path / "e.zarr")
    labelstore.ensemble(members[:2], out)
    assert labelstore.open(out).topk == 6   # the largest member k
    valid = np.ones(ROWS, dtype=bool)
    valid[[3, 10, 11]] = False
    assert_matches_reference(out, reference(members[:2], [0.5, 0.5], "mean"), valid)


def test_mismatched_members_are_refused_with_one_line(members, tmp_path, capsys):
    out = str(tmp_path / "e.zarr")
    keys = [f"img{i:03d}.jpg" for i in range(ROWS)]
    keys[5] = "other.jpg"
    renamed = make_member(tmp_path / "keys.zarr", seed=4, k=4, keys=keys)
    refused(capsys, ["ensemble", members[0], renamed, "--out", out],
            "row 5 differs", "'img005.jpg'", "'other.jpg'")
    boxes = labelstore.open(members[2]).read(slice(None)).boxes.copy()
    boxes[20, 1, 2] *= 0.5
    moved = make_member(tmp_path / "boxes.zarr", seed=5, k=4, boxes=boxes)
    refused(capsys, ["ensemble", members[2], moved, "--out", out],
            "row 20 (key 'img020.jpg') view 1: box differs")
    classes = make_member(tmp_path / "classes.zarr", seed=6, k=4, classes=CLASSES + 1)
    refused(capsys, ["ensemble", members[0], classes, "--out", out], "num_classes differs")
    refused(capsys, ["ensemble", members[0], members[1], "--out", out, "--weights", "1,2,3"],
            "--weights has 3 values for 2 stores")
    refused(capsys, ["ensemble", members[0], members[1], "--out", members[1]],
            "may not overlap an input")
    assert not os.path.exists(out)


def test_a_box_differing_only_on_an_invalid_row_is_fine(members, tmp_path):
    boxes = labelstore.open(members[0]).read(slice(None)).boxes
    # members[0] row 3 is invalid: its box has no meaning (infer-teacher writes zeros)
    altered = boxes.copy()
    altered[3] = 0.1
    other = make_member(tmp_path / "x.zarr", seed=7, k=4, boxes=altered)
    labelstore.ensemble([members[0], other], str(tmp_path / "e.zarr"))


def test_resume_computes_only_missing_chunks_and_refuses_other_settings(members, tmp_path,
                                                                        capsys):
    out = str(tmp_path / "e.zarr")
    args = ["ensemble", *members, "--out", out, "--weights", "1,1,2", "--rule", "geomean"]
    assert main(args) == 0
    whole = str(tmp_path / "whole.zarr")
    shutil.copytree(out, whole)
    done = zarr.open_group(out, mode="r+")["done"]
    done[1] = False          # as if the run had died before finishing chunk 1
    done[4] = False
    capsys.readouterr()
    assert main(args) == 0
    assert f"{2 * CHUNK - (CHUNK * 5 - ROWS):,} rows computed" in capsys.readouterr().out
    for name in ("indices", "probs", "residual", "boxes", "flips", "valid"):
        np.testing.assert_array_equal(zarr.open_group(out)[name][:],
                                      zarr.open_group(whole)[name][:], err_msg=name)
    refused(capsys, ["ensemble", *members, "--out", out, "--weights", "1,1,2"],
            "other rule", "--overwrite")
    refused(capsys, ["ensemble", *members[:2], "--out", out], "other members (3 stores, now 2)")
    assert main(["ensemble", *members[:2], "--out", out, "--overwrite"]) == 0
    assert labelstore.open(out).topk == 6


def test_a_resume_refused_for_a_rebuilt_member_is_one_short_line(members, tmp_path, capsys):
    """Before: the whole members record of both runs, some 900 characters."""
    rebuilt = [str(tmp_path / f"m{i}.zarr") for i in range(2)]
    for source, target in zip(members, rebuilt):
        shutil.copytree(source, target)
    out = str(tmp_path / "e.zarr")
    assert main(["ensemble", *rebuilt, "--out", out, "--no-progress"]) == 0
    zarr.open_group(rebuilt[1], mode="r+").attrs["created"] = "2031-01-01T00:00:00+00:00"
    err = refused(capsys, ["ensemble", *rebuilt, "--out", out],
                  f"its member 2 {os.path.realpath(rebuilt[1])} was rebuilt since the ensemble "
                  "was started (created ", "-> 2031-01-01T00:00:00+00:00)",
                  "pass --overwrite to compute the ensemble afresh")
    assert len(err) < 400, len(err)


def test_a_held_lock_is_refused(members, tmp_path, capsys):
    out = str(tmp_path / "e.zarr")
    with labelstore.OutputLock(out, command="another run"):
        refused(capsys, ["ensemble", *members, "--out", out], "being written by another")


def test_train_student_runs_on_an_ensemble_store(image_folder, make_checkpoint, tmp_path):
    """Two teachers on the same crops -> ensemble -> a short train-student."""
    from conftest import TINY_INPUT, TINY_MODEL

    common = ["--model", TINY_MODEL, "--input-size", str(TINY_INPUT), "--topk", "5",
              "--views", "2", "--chunk-rows", "4", "--num-workers", "0", "--no-progress",
              "--device", "cpu", "--decoder", "pil", "--threads", "1"]
    a, b, e = (str(tmp_path / f"{name}.zarr") for name in "abe")
    assert main(["infer-teacher", *common, "--checkpoint", str(make_checkpoint(seed=0)),
                 "--data", str(image_folder.data), "--out", a]) == 0
    assert main(["infer-teacher", *common, "--checkpoint", str(make_checkpoint(seed=1)),
                 "--views-from", a, "--out", b]) == 0
    assert main(["ensemble", a, b, "--out", e]) == 0
    run_dir = tmp_path / "run"
    assert main(["train-student", "--student", "test_resnet", "--store", e, "--out",
                 str(run_dir), "--epochs", "1", "--batch-size", "6", "--input-size", "32",
                 "--num-workers", "0", "--device", "cpu", "--threads", "1"]) == 0
    assert (run_dir / "last.pt").exists()


@pytest.mark.parametrize("rule", ["mean", "geomean"])
@pytest.mark.parametrize("k_out", [1, 3, 9, 12])
def test_sparse_combination_equals_the_dense_one(rule, k_out):
    """combine_top_k works on the union of the members' top-k; it must equal the top-k of
    the dense combination, also when k exceeds the union (filler classes), k = C, members
    share classes, a row has no residual, lists a class twice or has no mass at all."""
    rng = np.random.default_rng(k_out)
    n, classes = 50, 12
    tops, dense = [], []
    for k_member in (3, 5, 12):
        logits = rng.normal(scale=2.0, size=(n, classes))
        logits[:, :4] += 3.0      # the members agree on a few classes
        probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        idx = np.argsort(-probs, axis=1)[:, :k_member]
        top = np.take_along_axis(probs, idx, axis=1).astype(np.float16).astype(np.float32)
        residual = np.clip(1 - top.sum(1), 0, 1).astype(np.float32)
        residual[:5] = 0.0        # all the mass in the top-k
        if k_member == 3:         # rows as densify reads them: a class listed twice, and the
            idx[5], top[5], residual[5] = [2, 2, 7], [0.3, 0.2, 0.1], 0.4   # fill of a row
            idx[6], top[6], residual[6] = 0, 0.0, 0.0                       # never written
        tops.append((idx, top, residual))
        dense.append(labelstore.densify(idx, top, residual, classes).astype(np.float64))
    weights = [0.2, 0.5, 0.3]
    expected = labelstore.combine_distributions(dense, weights, rule)
    idx, top, residual = _ensemble.combine_top_k(tops, weights, rule, classes, k_out)
    assert idx.shape == (n, k_out)
    assert (np.sort(idx, 1)[:, 1:] != np.sort(idx, 1)[:, :-1]).all()    # distinct classes
    # densify works in float32: the two agree to its rounding
    np.testing.assert_allclose(top, -np.sort(-expected, 1)[:, :k_out], atol=1e-6)
    np.testing.assert_allclose(top, np.take_along_axis(expected, idx, 1), atol=1e-6)
    np.testing.assert_allclose(residual, 1 - top.sum(1), atol=1e-12)
