"""labelstore.verify (structure), teacher_infer.verify (teacher) and ``ssld verify``: passes
on fresh stores (plain and ensemble), fails on altered probabilities, on a chunk marked done
over zeros, with another checkpoint, and on a damaged chunk; --structure-only needs no teacher."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import zarr

import labelstore
import teacher_infer
from cli import main
from conftest import TINY_INPUT, TINY_MODEL

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CHUNK = 4


COMMON = ["--model", TINY_MODEL, "--input-size", str(TINY_INPUT), "--topk", "5",
          "--views", "2", "--chunk-rows", str(CHUNK), "--num-workers", "0",
          "--no-progress", "--device", "cpu", "--decoder", "pil", "--threads", "1"]


@pytest.fixture(scope="module")
def stores(image_folder, make_checkpoint, tmp_path_factory):
    """A teacher store, a second teacher on its crops, and their ensemble (12 rows, 2 views)."""
    folder = tmp_path_factory.mktemp("verify")
    common = COMMON
    a, b, e = (str(folder / f"{name}.zarr") for name in "abe")
    assert main(["infer-teacher", *common, "--checkpoint", str(make_checkpoint(seed=0)),
                 "--data", str(image_folder.data), "--out", a]) == 0
    assert main(["infer-teacher", *common, "--checkpoint", str(make_checkpoint(seed=1)),
                 "--views-from", a, "--out", b]) == 0
    assert main(["ensemble", a, b, "--out", e, "--weights", "0.7,0.3", "--rule", "geomean"]) == 0
    return {"a": a, "b": b, "e": e}


def copy(store: str, tmp_path) -> str:
    target = str(tmp_path / "copy.zarr")
    shutil.copytree(store, target)
    return target


def arrays(path: str):
    """The store's arrays for direct rewrites: every chunk written, so checksums stay valid."""
    group = zarr.open_group(path, mode="r+")
    return lambda name: group[name].with_config({"write_empty_chunks": True})


def test_fresh_stores_pass(stores):
    for name in ("a", "b"):
        result = teacher_infer.verify(stores[name], sample=100, threads=1)
        assert result.ok, result
        assert result.teacher.rows == 12 and result.teacher.row_views == 24
        assert result.teacher.top1_equal == 1.0
        assert result.teacher.max_abs_diff < 1e-3       # fp16 storage alone


def test_an_ensemble_store_is_recomputed_from_its_members(stores, capsys):
    assert main(["verify", stores["e"], "--sample", "5", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "verify" in out and "OK" in out and "5 rows (10 row-views)" in out


def test_altered_probabilities_fail_but_keep_a_valid_structure(stores, tmp_path, capsys):
    path = copy(stores["a"], tmp_path)
    get = arrays(path)
    lo, hi = CHUNK, 2 * CHUNK
    probs = get("probs")[lo:hi].astype(np.float32) * 0.5
    get("probs")[lo:hi] = probs.astype(np.float16)
    get("residual")[lo:hi] = 1 - probs.astype(np.float16).astype(np.float32).sum(-1)
    assert labelstore.verify(path).ok   # plausible rows, valid checksums
    assert main(["verify", path, "--sample", "100", "--threads", "1"]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "worst rows:" in out
    assert any(f"row {row} " in out for row in range(lo, hi))


def test_a_done_flag_over_zeros_fails(stores, tmp_path, capsys):
    path = copy(stores["a"], tmp_path)
    get = arrays(path)
    lo, hi = 2 * CHUNK, 3 * CHUNK
    for name in ("indices", "probs", "residual", "boxes", "flips", "valid"):
        array = get(name)
        array[lo:hi] = np.zeros((hi - lo,) + array.shape[1:], dtype=array.dtype)
    get("done")[2] = True
    assert main(["verify", path, "--structure-only"]) == 1
    out = capsys.readouterr().out
    assert "residual != 1 - sum(probs)" in out and f"first row {lo} view 0" in out
    assert "4 invalid rows, but the run recorded 0 failures" in out
    result = teacher_infer.verify(path, sample=100, threads=1)
    assert not result.ok


def test_the_teacher_check_sees_rows_marked_invalid_that_decode(stores, tmp_path):
    path = copy(stores["a"], tmp_path)
    get = arrays(path)
    valid = get("valid")[:]
    valid[1] = False
    get("valid")[:] = valid
    result = teacher_infer.verify(path, sample=100, threads=1)
    assert not result.ok and result.teacher.validity_mismatches == 1
    assert any("invalid in the store, but decodes now" in line for line in result.teacher.worst)


def test_another_checkpoint_fails(stores, make_checkpoint, capsys):
    other = str(make_checkpoint(seed=1))
    assert main(["verify", stores["a"], "--checkpoint", other, "--threads", "1"]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "sha256 differs" in out
    assert main(["verify", stores["e"], "--checkpoint", other]) == 2     # needs one per teacher
    assert "has 2 teacher(s); got 1 --checkpoint" in capsys.readouterr().err


def test_a_damaged_chunk_is_a_failed_verification(stores, tmp_path, capsys):
    path = copy(stores["a"], tmp_path)
    chunk = next((tmp_path / "copy.zarr" / "probs" / "c").rglob("*"))
    while chunk.is_dir():
        chunk = next(chunk.iterdir())
    chunk.write_bytes(chunk.read_bytes()[:-3] + b"xyz")
    assert main(["verify", path, "--structure-only"]) == 1
    assert "damaged" in capsys.readouterr().out


def test_a_merge_of_two_teachers_is_verified_row_range_by_row_range(
        stores, unlabeled_folder, make_checkpoint, tmp_path, capsys):
    """Before: the merge recorded the first store's teacher only, so verify recomputed the
    second store's rows with the wrong teacher and failed a sound store."""
    other = str(tmp_path / "u.zarr")
    assert main(["infer-teacher", *COMMON, "--checkpoint", str(make_checkpoint(seed=1)),
                 "--data", str(unlabeled_folder.data), "--out", other]) == 0
    merged = str(tmp_path / "m.zarr")
    assert main(["merge", stores["a"], other, "--out", merged, "--no-progress"]) == 0
    assert "records each range's teacher" in capsys.readouterr().out
    store = labelstore.open(merged)
    ranges = store.row_teachers()
    first, second = (labelstore.open(p) for p in (stores["a"], other))
    assert [(lo, hi) for lo, hi, _ in ranges] == [(0, len(first)), (len(first), len(store))]
    assert [t["teacher"] for *_, t in ranges] == [first.attrs["teacher"], second.attrs["teacher"]]
    # inspect and info name both teachers with their row ranges, not the first for all rows
    shown = [{"rows": [lo, hi], "model": t["teacher"]["model"],
              "checkpoint": t["teacher"]["checkpoint"]} for lo, hi, t in ranges]
    report = labelstore.inspect_store(store)
    assert report.teachers == shown and store.info.teachers == shown
    assert main(["inspect", merged, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["teachers"] == shown
    assert main(["inspect", merged]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("Teachers"))
    for lo, hi, t in ranges:
        assert f"{os.path.basename(t['teacher']['checkpoint'])} (rows {lo:,}:{hi:,})" in line
    assert labelstore.inspect_store(first).teachers is None and first.info.teachers is None
    assert main(["verify", merged, "--sample", "100", "--threads", "1"]) == 0, \
        capsys.readouterr().out

    # a selection from that pool keeps each row's own teacher, and so does a merge of merges
    selected = str(tmp_path / "s.zarr")
    assert main(["select-topk", "--store", merged, "--k", "3", "--out", selected,
                 "--no-progress"]) == 0
    assert len(labelstore.open(selected).row_teachers()) == 2
    assert main(["verify", selected, "--sample", "100", "--threads", "1"]) == 0, \
        capsys.readouterr().out
    again = str(tmp_path / "again.zarr")
    assert main(["merge", other, merged, "--out", again, "--no-progress"]) == 0
    assert [t["teacher"] for *_, t in labelstore.open(again).row_teachers()] == \
        [second.attrs["teacher"], first.attrs["teacher"]]   # the repeated keys were dropped

    # one --checkpoint per teacher, in the order of the row ranges
    assert main(["verify", merged, "--checkpoint", str(make_checkpoint(seed=0))]) == 2
    assert "has 2 teacher(s); got 1 --checkpoint" in capsys.readouterr().err
    # an ensemble member records one teacher: a store of several is refused
    with pytest.raises(ValueError, match="its rows come from several teachers"):
        labelstore.ensemble([merged, selected], str(tmp_path / "e.zarr"))


def test_a_wrong_root_is_one_line_naming_the_option(stores, tmp_path, capsys):
    """Before: --root given but not the store's folder: every row "cannot be decoded now"."""
    wrong = tmp_path / "elsewhere"
    wrong.mkdir()
    (wrong / "photo.png").write_bytes(b"")
    assert main(["verify", stores["a"], "--root", str(wrong), "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"--root {wrong} does not hold the images of the store {stores['a']}" in err
    assert main(["verify", stores["a"], "--root", str(tmp_path / "nope")]) == 2
    assert f"--root {tmp_path / 'nope'} is not a folder here" in capsys.readouterr().err
