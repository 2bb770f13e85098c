"""`ssld inspect`, `ssld export` and the CLI's error contract."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

import labelstore
from cli import main
from test_labelstore import make_store


@pytest.fixture
def store(tmp_path):
    path = str(tmp_path / "labels.zarr")
    data = make_store(path, n=300, views=2, k=4, classes=20, chunk_rows=64, invalid=(3, 200))
    return path, data


def run_cli(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_json_matches_independent_statistics(store, capsys):
    path, data = store
    code, out, err = run_cli(capsys, "inspect", path, "--json")
    assert code == 0, err
    report = json.loads(out)
    valid = data["valid"]
    top1 = data["indices"][:, 0, 0]
    assert report["rows"] == 300 and report["views"] == 2 and report["topk"] == 4
    assert report["classes"] == 20 and report["teacher"] == "resnet10t"
    assert report["complete"] is True and report["missing"] == []
    assert report["invalid_rows"] == 2
    assert report["mean_top1_prob"] == pytest.approx(data["probs"][valid, 0, 0].mean(), rel=1e-3)
    assert report["mean_residual"] == pytest.approx(data["residual"][valid, 0].mean(), rel=1e-5)
    assert report["labeled_rows"] == 298
    assert report["top1_agreement"] == pytest.approx(
        (top1[valid] == data["labels"][valid]).mean())
    counts = np.bincount(top1[valid], minlength=20)
    assert report["top1_counts"] == {"min": counts.min(), "max": counts.max(),
                                     "median": np.sort(counts)[9],  # the lower median
                                     "empty": (counts == 0).sum()}
    assert all(type(v) is int for v in report["top1_counts"].values())  # counts, not floats
    assert report["view"] == 0
    assert report["bytes_on_disk"] > 0
    assert report["bytes_per_row_view"] == pytest.approx(report["bytes_on_disk"] / 600)


def test_inspect_fingerprints_the_stored_label_arrays(store, tmp_path, capsys):
    """label_sha256 hashes each array's stored bytes: independent of the chunk size, equal to
    a hash of the arrays read whole, and changed by one altered probability."""
    import hashlib

    path, data = store
    code, out, err = run_cli(capsys, "inspect", path, "--json")
    assert code == 0, err
    digests = json.loads(out)["label_sha256"]
    st = labelstore.open(path)
    group = __import__("zarr").open_group(path, mode="r")
    for name in ("labels", "indices", "probs", "residual", "boxes", "flips", "valid"):
        whole = np.ascontiguousarray(group[name][:])
        assert digests[name] == hashlib.sha256(whole.tobytes()).hexdigest(), name
    assert digests["keys"] == st.attrs["dataset"]["fingerprint"]
    other = str(tmp_path / "rechunked.zarr")
    make_store(other, n=300, views=2, k=4, classes=20, chunk_rows=128, invalid=(3, 200))
    code, out, _ = run_cli(capsys, "inspect", other, "--json")
    assert json.loads(out)["label_sha256"] == digests
    changed = str(tmp_path / "changed.zarr")
    data = make_store(changed, n=300, views=2, k=4, classes=20, chunk_rows=64, invalid=(3, 200))
    group = __import__("zarr").open_group(changed, mode="r+")
    probs = group["probs"][:]
    probs[150, 1, 2] += np.float16(0.01)
    group["probs"][:] = probs
    code, out, _ = run_cli(capsys, "inspect", changed, "--json")
    changed_digests = json.loads(out)["label_sha256"]
    assert changed_digests["probs"] != digests["probs"]
    assert {k: v for k, v in changed_digests.items() if k != "probs"} == \
        {k: v for k, v in digests.items() if k != "probs"}


def test_inspect_says_which_view_it_reports(store, capsys):
    path, data = store
    code, out, err = run_cli(capsys, "inspect", path, "--view", "1")
    assert code == 0, err
    assert "Statistics of view : 1 (a random crop view of views 0-1)" in out
    valid = data["valid"]
    assert f"{data['probs'][valid, 1, 0].mean():.4f}" in out  # view 1's figures, not view 0's
    code, out, _ = run_cli(capsys, "inspect", path, "--json", "--view", "1")
    assert json.loads(out)["view"] == 1
    code, out, _ = run_cli(capsys, "inspect", path)
    assert "Statistics of view : 0 (the evaluation view of views 0-1)" in out


def test_inspect_text_and_incomplete_store(tmp_path, capsys):
    w = labelstore.create(str(tmp_path / "p2.zarr"), keys=[f"k{i}" for i in range(200)],
                          num_classes=10, topk=2, chunk_rows=64)
    w.write(0, np.tile([[[1, 2]]], (64, 1, 1)), np.full((64, 1, 2), 0.25))
    w.close()
    code, out, err = run_cli(capsys, "inspect", str(tmp_path / "p2.zarr"))
    assert code == 0, err
    assert "Complete           : False" in out and "64:200" in out
    assert "Top-1 per class    : min 0 / median 0 / max 64" in out
    code, out, err = run_cli(capsys, "inspect", str(tmp_path / "p2.zarr"), "--json")
    assert code == 0, err
    assert json.loads(out)["label_sha256"] is None  # an unfinished store has no fingerprint


def test_export_hdf5_round_trip(store, tmp_path, capsys):
    path, data = store
    out_file = str(tmp_path / "labels.h5")
    code, out, err = run_cli(capsys, "export", path, "--out", out_file, "--rows", "10:250")
    assert code == 0, err
    assert "exported 240 rows" in out
    size = os.path.getsize(out_file)
    assert f"({size / 1024:.1f} KiB)" in out  # a small file is not "(0.0 MiB)"
    st = labelstore.open(path)
    part = st.read(slice(10, 250))
    with h5py.File(out_file, "r") as h5:
        np.testing.assert_array_equal(h5["indices"][:], part.indices)
        np.testing.assert_array_equal(h5["probs"][:].astype(np.float32), part.probs)
        np.testing.assert_array_equal(h5["residual"][:], part.residual)
        np.testing.assert_array_equal(h5["boxes"][:], part.boxes)
        np.testing.assert_array_equal(h5["flips"][:], part.flips)
        np.testing.assert_array_equal(h5["valid"][:], part.valid)
        np.testing.assert_array_equal(h5["labels"][:], data["labels"][10:250])
        # UTF-8 strings; h5py 3 reads string data as bytes unless asked for str (.asstr())
        assert h5py.check_string_dtype(h5["keys"].dtype).encoding == "utf-8"
        assert list(h5["keys"].asstr()[:3]) == list(data["keys"][10:13])
        assert h5.attrs["format"] == "ssld.labelstore" and h5.attrs["topk"] == 4
        assert json.loads(h5.attrs["teacher"]) == {"model": "resnet10t"}
    # exporting again without --overwrite is refused, and nothing is lost
    code, _, err = run_cli(capsys, "export", path, "--out", out_file)
    assert code == 2 and "already exists" in err


def test_export_out_directory_is_refused_even_with_overwrite(store, tmp_path, capsys):
    path, _ = store
    folder = tmp_path / "exports"
    folder.mkdir()
    (folder / "keep.h5").write_text("mine")
    code, _, err = run_cli(capsys, "export", path, "--out", str(folder), "--overwrite")
    assert code == 2 and err == f"ssld: error: --out {folder} is a directory; give a file name\n"
    assert (folder / "keep.h5").read_text() == "mine" and os.listdir(folder) == ["keep.h5"]


def test_export_of_an_incomplete_store_is_refused_unless_allowed(tmp_path, capsys):
    path = str(tmp_path / "part.zarr")
    w = labelstore.create(path, keys=[f"k{i}" for i in range(200)], num_classes=10, topk=2,
                          chunk_rows=64)
    w.write(0, np.tile([[[1, 2]]], (64, 1, 1)), np.full((64, 1, 2), 0.25))
    w.close()
    out_file = tmp_path / "part.h5"
    code, out, err = run_cli(capsys, "export", path, "--out", str(out_file))
    assert code == 2 and err.count("\n") == 1 and not out_file.exists()
    assert f"label store {path} is incomplete: 136 of the 200 rows" in err
    assert "--allow-incomplete" in err
    code, out, err = run_cli(capsys, "export", path, "--out", str(out_file), "--rows", "0:64")
    assert code == 0 and err == "", err  # the written rows alone: nothing to warn about
    code, out, err = run_cli(capsys, "export", path, "--out", str(out_file), "--overwrite",
                             "--allow-incomplete")
    assert code == 0 and "exported 200 rows" in out
    assert err == f"warning: {path} is incomplete: 136 exported rows are not written yet " \
                  "(valid=False)\n"
    with h5py.File(out_file, "r") as h5:
        assert h5["valid"][:64].all() and not h5["valid"][64:].any()


@pytest.mark.parametrize("args, message", [
    (["inspect", "/nonexistent/x.zarr"], "no label store at /nonexistent/x.zarr"),
    (["export", "{store}", "--out", "{tmp}/x.h5", "--rows", "5"], "--rows must look like A:B"),
    (["export", "{store}", "--out", "{tmp}/x.h5", "--rows", "400:500"], "non-empty range"),
    (["inspect", "{store}", "--view", "5"], "store has 2 view(s)"),
    (["inspect", "{tmp}"], "not an ssld label store"),
])
def test_cli_errors_are_one_line_with_status_2(store, tmp_path, capsys, args, message):
    path, _ = store
    args = [a.format(store=path, tmp=tmp_path) for a in args]
    code, _, err = run_cli(capsys, *args)
    assert code == 2
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_console_script_exit_status_and_no_torch_on_help(tmp_path):
    proc = subprocess.run([sys.executable, "-c", "import cli, sys; sys.exit(cli.main())",
                           "inspect", str(tmp_path / "missing.zarr")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"ssld: error: no label store at {tmp_path / 'missing.zarr'}"
    check = ("import sys, cli\n"
             "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
             "print('torch' in sys.modules, 'timm' in sys.modules, 'nvidia.dali' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "False False False"
