"""train-student --store-root: a store whose images moved trains from their new folder.

The reference is the same run on the images where the store recorded them: with the same seed
the run from the moved copy must produce the same weights, bit for bit. Without the option the
moved store is refused in one line that names it; a wrong or mismatched root is refused too.
"""
from __future__ import annotations

import csv
import shutil

import pytest
import torch

from cli import main as cli_main
from conftest import TINY_INPUT, TINY_MODEL, make_image


def _run(capsys, argv):
    code = cli_main([str(a) for a in argv])
    return code, capsys.readouterr().err.strip()


@pytest.fixture
def store(tmp_path, capsys):
    images = tmp_path / "images"
    for i in range(8):
        make_image(images / f"c{i % 2}" / f"{i}.png", size=(40, 36), seed=40 + i)
    path = tmp_path / "labels.zarr"
    code, err = _run(capsys, ["infer-teacher", "--model", TINY_MODEL, "--random-weights",
                              "--data", images, "--out", path, "--input-size", TINY_INPUT,
                              "--topk", 2, "--views", 2, "--num-workers", 0, "--no-progress",
                              "--decoder", "pil", "--device", "cpu", "--threads", 1])
    assert code == 0, err
    return path, images


def _train(store, out, *extra):
    return ["train-student", "--student", TINY_MODEL, "--store", store, "--out", out,
            "--epochs", 1, "--batch-size", 4, "--input-size", TINY_INPUT, "--num-workers", 0,
            "--decoder", "pil", "--device", "cpu", "--threads", 1, "--no-progress", "--seed", 3,
            *extra]


def _weights(run):
    return torch.load(run / "last.pt", map_location="cpu", weights_only=False)["state_dict"]


def test_a_store_whose_images_moved_trains_from_store_root(store, tmp_path, capsys):
    path, images = store
    code, err = _run(capsys, _train(path, tmp_path / "here"))
    assert code == 0, err
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(images, moved)
    shutil.rmtree(images)

    code, err = _run(capsys, _train(path, tmp_path / "lost"))
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "--store-root" in err and str(images) in err
    assert not (tmp_path / "lost").exists()

    code, err = _run(capsys, _train(path, tmp_path / "moved", "--store-root", moved))
    assert code == 0, err
    reference, got = _weights(tmp_path / "here"), _weights(tmp_path / "moved")
    assert reference.keys() == got.keys()
    for name in reference:
        assert torch.equal(reference[name], got[name]), name
    rows = [list(csv.DictReader(open(run / "metrics.csv"))) for run in
            (tmp_path / "here", tmp_path / "moved")]
    assert rows[0][0]["train_loss"] == rows[1][0]["train_loss"]


def test_a_wrong_store_root_is_refused(store, tmp_path, capsys):
    path, images = store
    empty = tmp_path / "empty"
    empty.mkdir()
    for extra, fragment in ((["--store-root", empty], "images are missing"),
                            (["--store-root", tmp_path / "nowhere"], "given for label store"),
                            (["--store-root", images, "--store-root", images],
                             "2 --store-root for 1 --store")):
        code, err = _run(capsys, _train(path, tmp_path / "run", *extra))
        assert code == 2 and len(err.splitlines()) == 1, err
        assert fragment in err, err
        assert not (tmp_path / "run").exists()
    supervised = ["train-student", "--student", TINY_MODEL, "--supervised", "--data", images,
                  "--store-root", images, "--out", tmp_path / "run", "--device", "cpu",
                  "--threads", 1]
    code, err = _run(capsys, supervised)   # --data images are not a store's: refused, not ignored
    assert code == 2 and len(err.splitlines()) == 1 and "--store-root" in err, err
    assert not (tmp_path / "run").exists()


def test_a_killed_run_resumes_with_the_images_moved(store, tmp_path, capsys, monkeypatch):
    """Killed after epoch 1, the images moved, resumed with --store-root: the same weights as
    two epochs straight from where the store recorded its images."""
    path, images = store
    code, err = _run(capsys, _train(path, tmp_path / "straight", "--epochs", 2))
    assert code == 0, err
    import student_train.trainer as trainer

    original, calls = trainer.train_one_epoch, []

    def killed_in_epoch_two(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt("simulated kill")
        calls.append(1)
        return original(*args, **kwargs)

    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(trainer, "train_one_epoch", killed_in_epoch_two)
        code, err = _run(capsys, _train(path, run, "--epochs", 2))
    assert code != 0 and calls, err
    assert torch.load(run / "last.pt", map_location="cpu", weights_only=False)["epoch"] == 1
    moved = tmp_path / "moved"
    shutil.move(str(images), str(moved))
    code, err = _run(capsys, _train(path, run, "--epochs", 2, "--store-root", moved, "--resume"))
    assert code == 0, err
    reference, got = _weights(tmp_path / "straight"), _weights(run)
    for name in reference:
        assert torch.equal(reference[name], got[name]), name
