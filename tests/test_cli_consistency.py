"""What every command does alike (issue 23, "consistency users notice"): ``--no-progress``
wherever there is a bar, and no carriage-return bar in a log file; ``--threads`` and
``--num-workers`` on every computing command; errors that name flags, never internal
fields; options checked before data are read or models built; the same exit status for a
read-only output in every command; a refused ``train-student`` writes nothing; a file given
where a folder or list is meant is one line naming it."""
from __future__ import annotations

import errno
import io
import os
import re

import click
import numpy as np
import pytest

import labelstore
from cli import main, ssld
from conftest import TINY_INPUT, TINY_MODEL, make_image
from test_labelstore import make_store
from test_labelstore_paths import refused

BARS = ("infer-teacher", "select-topk", "merge", "ensemble", "dedup", "train-student", "eval",
        "quickstart", "prepare digits", "prepare fashion-mnist")
COMPUTING = ("infer-teacher", "verify", "dedup", "train-student", "eval", "quickstart")


def command(path: str) -> click.Command:
    found = ssld
    for name in path.split():
        found = found.commands[name]
    return found


def flags(path: str) -> set[str]:
    return {opt for param in command(path).params for opt in param.opts}


@pytest.mark.parametrize("path", BARS)
def test_every_command_with_a_bar_has_no_progress(path):
    assert "--no-progress" in flags(path)


@pytest.mark.parametrize("path", COMPUTING)
def test_every_computing_command_has_threads_and_num_workers(path):
    assert {"--threads", "--num-workers"} <= flags(path)


@pytest.fixture
def pool(tmp_path):
    path = tmp_path / "p.zarr"
    make_store(str(path), n=40, views=1, k=3, classes=5, chunk_rows=16)
    return path


class Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_bars_are_drawn_on_a_terminal_only_and_never_with_no_progress(pool, tmp_path, capsys,
                                                                     monkeypatch):
    """A log file (stderr not a terminal) never gets tqdm's carriage-return redraws."""
    argv = ["select-topk", "--store", str(pool), "--k", "2", "--overwrite"]
    assert main(argv + ["--out", str(tmp_path / "a.zarr")]) == 0
    assert capsys.readouterr().err == ""                 # pytest's stderr is no terminal
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert main(argv + ["--out", str(tmp_path / "b.zarr")]) == 0
    assert "select-topk" in terminal.getvalue() and "\r" in terminal.getvalue()
    terminal.seek(0)
    terminal.truncate()
    assert main(argv + ["--out", str(tmp_path / "c.zarr"), "--no-progress"]) == 0
    assert terminal.getvalue() == ""


def test_infer_teacher_writes_no_bar_into_a_log(tmp_path, capsys):
    """Before: its tqdm bar was drawn whatever stderr was."""
    for i in range(4):
        make_image(tmp_path / "images" / f"{i}.png", size=(32, 40), seed=i)
    assert main(["infer-teacher", "--model", TINY_MODEL, "--random-weights", "--data",
                 str(tmp_path / "images"), "--out", str(tmp_path / "t.zarr"), "--input-size",
                 str(TINY_INPUT), "--num-workers", "0", "--threads", "1"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "img/s]" not in err, err


# -- errors name flags ------------------------------------------------------------------------
@pytest.mark.parametrize("argv,flag,field", [
    (["verify", "{pool}", "--sample", "0"], "--sample", None),
    (["verify", "{pool}", "--structure-only", "--atol", "3"], "--atol", None),
    (["verify", "{pool}", "--structure-only", "--min-agreement", "2"], "--min-agreement",
     "min_agreement"),
    (["select-topk", "--store", "{pool}", "--out", "{out}", "--k", "0"], "--k", None),
    (["select-topk", "--store", "{pool}", "--out", "{out}", "--k", "1", "--min-prob", "2"],
     "--min-prob", "min_prob"),
    (["select-topk", "--store", "{pool}", "--out", "{out}", "--k", "1", "--view", "3"],
     "--view", None),
    (["dedup", "--query", "{pool}", "--pool", "{pool}", "--top-m", "0"], "--top-m", "top_m"),
    (["dedup", "--query", "{pool}", "--pool", "{pool}", "--min-inliers", "0"], "--min-inliers",
     "min_inliers"),
    (["dedup", "--query", "{pool}", "--pool", "{pool}", "--num-workers", "0"], "--num-workers",
     "workers"),
    (["dedup", "--query", "{pool}", "--pool", "{pool}", "--threshold", "3"], "--threshold", None),
    (["dedup", "--query", "{pool}", "--pool", "{pool}", "--report-threshold", "0.1"],
     "--report-threshold", "report_thresholds"),
    (["infer-teacher", "--model", TINY_MODEL, "--random-weights", "--data", "{tmp}", "--out",
      "{out}", "--chunk-rows", "0"], "--chunk-rows", "chunk_rows"),
    (["infer-teacher", "--model", TINY_MODEL, "--random-weights", "--data", "{tmp}", "--out",
      "{out}", "--crop-scale", "0.5", "0.2"], "--crop-scale", "crop_scale"),
    (["infer-teacher", "--model", TINY_MODEL, "--random-weights", "--data", "{tmp}", "--out",
      "{out}", "--batch-size", "0"], "--batch-size", "batch_size"),
    (["train-student", "--student", "test_resnet", "--store", "{pool}", "--out", "{out}",
      "--batch-size", "0"], "--batch-size", "batch_size"),
    (["train-student", "--student", "test_resnet", "--store", "{pool}", "--out", "{out}",
      "--input-size", "4"], "--input-size", "input_size"),
    (["train-student", "--student", "test_resnet", "--store", "{pool}", "--out", "{out}",
      "--crop-scale", "0.9", "0.1"], "--crop-scale", "crop_scale"),
    (["eval", "--model", "test_resnet", "--checkpoint", "x.pt", "--data", "{tmp}",
      "--batch-size", "0"], "--batch-size", "batch_size"),
])
def test_errors_name_the_flag_not_the_field(pool, tmp_path, capsys, argv, flag, field):
    values = {"pool": str(pool), "out": str(tmp_path / "out"), "tmp": str(tmp_path)}
    err = refused(capsys, [a.format(**values) for a in argv], f"ssld: error: {flag} ")
    assert field is None or not re.search(rf"(?<![-\w]){field}\b", err), err
    assert not (tmp_path / "out").exists()


# -- options before data ---------------------------------------------------------------------
def test_verify_checks_its_options_before_reading_the_store(pool, tmp_path, capsys,
                                                            monkeypatch):
    from labelstore import _verify

    monkeypatch.setattr(_verify, "check_rows",
                        lambda *a, **k: pytest.fail("read the store before the options"))
    labelstore_root = tmp_path / "nowhere"
    refused(capsys, ["verify", str(pool), "--root", str(labelstore_root)], "--root",
            "is not a folder here")
    refused(capsys, ["verify", str(pool), "--checkpoint", "a.pt", "--checkpoint", "b.pt"],
            "has 1 teacher(s); got 2 --checkpoint")


# -- one exit status per kind of failure -----------------------------------------------------
@pytest.mark.parametrize("error", [
    OSError(errno.EROFS, "Read-only file system", "out.zarr/zarr.json"),
    PermissionError(errno.EACCES, "Permission denied", "out.zarr/zarr.json"),
])
def test_an_output_that_cannot_be_written_is_status_2_in_every_command(pool, tmp_path, capsys,
                                                                       monkeypatch, error):
    """Before: a read-only folder was status 2, a read-only file system status 1."""
    from labelstore import _writer

    make_store(str(tmp_path / "other.zarr"), n=8, views=1, k=3, classes=5, chunk_rows=16,
               seed=3)
    with labelstore.create(str(tmp_path / "e.zarr"), keys=["a", "b"], num_classes=2, topk=1,
                           embedding_dim=2) as writer:
        writer.write(0, np.zeros((2, 1, 1), int), np.full((2, 1, 1), 0.5), embeddings=np.eye(2))

    def refuse(*args, **kwargs):
        raise error

    monkeypatch.setattr(_writer, "_create_arrays", refuse)
    monkeypatch.setattr("teacher_infer.dedup.run._write_outputs", refuse)
    monkeypatch.setattr("labelstore._export._write_datasets", refuse)
    for argv in (["select-topk", "--store", pool, "--k", 2, "--out", tmp_path / "s.zarr"],
                 ["merge", pool, tmp_path / "other.zarr", "--out", tmp_path / "m.zarr"],
                 ["dedup", "--query", tmp_path / "e.zarr", "--pool", tmp_path / "e.zarr",
                  "--verify", "none", "--out", tmp_path / "d.tsv", "--threads", 1],
                 ["export", pool, "--out", tmp_path / "x.h5"]):
        refused(capsys, argv, f"ssld: error: {error.strerror} (errno {error.errno}): "
                              "out.zarr/zarr.json")


# -- a refused train-student writes nothing --------------------------------------------------
def test_a_refused_train_student_leaves_no_folder_behind(pool, tmp_path, capsys):
    """Before: the run folder (and its train.log) stayed after any refusal of the data (here:
    a store that records no image root)."""
    out = tmp_path / "runs" / "student"
    refused(capsys, ["train-student", "--student", "test_resnet", "--store", pool, "--out", out,
                     "--epochs", 1, "--batch-size", 4,
                     "--input-size", 32, "--num-workers", 0, "--device", "cpu", "--threads", 1],
            "records no dataset root")
    assert not (tmp_path / "runs").exists()
    (tmp_path / "runs").mkdir()               # a folder that was there stays
    refused(capsys, ["train-student", "--student", "test_resnet", "--store", pool, "--out",
                     tmp_path / "runs", "--epochs", 1,
                     "--input-size", 32, "--device", "cpu", "--threads", 1],
            "records no dataset root")
    assert (tmp_path / "runs").is_dir()


# -- a file where a folder or a list is meant -------------------------------------------------
def test_an_image_given_as_data_is_one_line_naming_it(tmp_path, capsys):
    """Before: the image's bytes were read as a list of paths."""
    image = tmp_path / "some.jpg"
    make_image(image, size=(32, 32), seed=0)
    for argv in (["infer-teacher", "--model", TINY_MODEL, "--random-weights", "--data", image,
                  "--out", tmp_path / "t.zarr"],
                 ["train-student", "--student", "test_resnet", "--data", image, "--supervised",
                  "--out", tmp_path / "run", "--device", "cpu", "--threads", 1]):
        refused(capsys, argv, f"--data {image} is an image, not a list file",
                "pass the folder of the images")
    assert not os.path.exists(tmp_path / "t.zarr") and not os.path.exists(tmp_path / "run")
