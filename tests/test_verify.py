"""labelstore.verify (structure), teacher_infer.verify (teacher) and ``ssld verify``: passes
on fresh stores (plain and ensemble), fails on altered probabilities, on a chunk marked done
over zeros, with another checkpoint, and on a damaged chunk; --structure-only needs no teacher."""
from __future__ import annotations

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


@pytest.fixture(scope="module")
def stores(image_folder, make_checkpoint, tmp_path_factory):
    """A teacher store, a second teacher on its crops, and their ensemble (12 rows, 2 views)."""
    folder = tmp_path_factory.mktemp("verify")
    common = ["--model", TINY_MODEL, "--input-size", str(TINY_INPUT), "--topk", "5",
              "--views", "2", "--chunk-rows", str(CHUNK), "--num-workers", "0",
              "--no-progress", "--device", "cpu", "--decoder", "pil", "--threads", "1"]
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
