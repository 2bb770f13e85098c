"""What ``ssld train-student`` refuses before the first epoch, and how the CLI reports it."""
from __future__ import annotations

import os
import shutil

import pytest
import torch

import student_train.trainer as train_module
from cli import main
from student_train import TrainConfig, train
from train_data import make_images, make_store

CLASSES = 4


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("refuse")
    keys, labels = make_images(str(root / "images"), n=40, classes=CLASSES)
    return root, keys, labels


def store(images, name, **options):
    root, keys, labels = images
    path = str(root / f"{name}.zarr")
    if not os.path.exists(path):
        make_store(path, str(root / "images"), keys, labels,
                   classes=options.pop("classes", CLASSES), **options)
    return path


def config(out, stores, **options):
    values = dict(student="test_resnet", out=str(out), stores=tuple(stores), epochs=2,
                  batch_size=8, input_size=32, num_workers=0, device="cpu", threads=1)
    return TrainConfig(**{**values, **options})


def assert_nothing_trained(out):
    assert not os.path.exists(os.path.join(out, "last.pt"))
    assert not os.path.exists(os.path.join(out, "metrics.csv"))


def test_incomplete_store_is_refused_naming_it(images, tmp_path):
    partial = store(images, "partial", complete=False, chunk_rows=16)
    with pytest.raises(ValueError, match=f"label store {partial} is incomplete"):
        train(config(tmp_path / "run", [store(images, "ok"), partial]))
    assert_nothing_trained(tmp_path / "run")


def test_class_count_mismatch_is_refused_naming_the_store(images, tmp_path):
    other = store(images, "five", classes=5)
    with pytest.raises(ValueError, match=f"label store {other} has 5 classes but the student "
                                         "has 4"):
        train(config(tmp_path / "run", [store(images, "ok"), other]))
    assert_nothing_trained(tmp_path / "run")


def test_missing_images_are_refused_naming_the_store(images, tmp_path):
    root, keys, labels = images
    moved = tmp_path / "copy"
    shutil.copytree(root / "images", moved)
    path = str(tmp_path / "moved.zarr")
    make_store(path, str(moved), keys, labels, classes=CLASSES, invalid=(1,))
    os.remove(moved / keys[1])  # an invalid row: its image is never read
    train(config(tmp_path / "fine", [path], epochs=1))
    os.remove(moved / keys[2])
    with pytest.raises(FileNotFoundError, match=f"label store {path} .*1 of 39 images are "
                                                f"missing .*{keys[2]}"):
        train(config(tmp_path / "run", [path]))
    assert_nothing_trained(tmp_path / "run")
    shutil.rmtree(moved)
    with pytest.raises(FileNotFoundError, match="image root .* does not exist"):
        train(config(tmp_path / "run2", [path]))


def test_resume_with_changed_options_is_refused_naming_them(images, tmp_path, monkeypatch):
    out = tmp_path / "run"
    original = train_module.train_one_epoch
    calls = []

    def once(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_one_epoch", once)
    with pytest.raises(KeyboardInterrupt):
        train(config(out, [store(images, "ok")]))
    monkeypatch.setattr(train_module, "train_one_epoch", original)
    with pytest.raises(ValueError, match="options differ .*lr: 0.4 -> 0.3; .*seed: 0 -> 1"):
        train(config(out, [store(images, "ok")], resume=True, lr=0.3, seed=1))
    with pytest.raises(FileExistsError, match="pass --resume"):
        train(config(out, [store(images, "ok")]))
    # a checkpoint written by two processes cannot continue in one
    saved = torch.load(out / "last.pt", weights_only=True)
    torch.save({**saved, "rng": saved["rng"] * 2}, out / "last.pt")
    with pytest.raises(ValueError, match="trained by 2 process\\(es\\), this run has 1"):
        train(config(out, [store(images, "ok")], resume=True))
    torch.save(saved, out / "last.pt")
    # more workers do not change the result, so they may change
    result = train(config(out, [store(images, "ok")], resume=True, num_workers=1))
    assert result.epochs == 2 and result.last["epoch"] == 2
    with pytest.raises(ValueError, match="already finished"):
        train(config(out, [store(images, "ok")], resume=True))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(config(tmp_path / "never", [store(images, "ok")], resume=True))


@pytest.mark.parametrize("options, message", [
    (dict(supervised=True, teacher="resnet18", teacher_checkpoint="x.pt"), "two different"),
    (dict(teacher="resnet18"), "needs both"),
    (dict(views="sideways"), "views must be one of"),
    (dict(stores=()), "no training data"),
    (dict(stores=(), data="images"), "no teacher labels"),
    (dict(data="images"), "either as --store or as --data"),
    (dict(batch_size=0), "--batch-size must be >= 1"),
    (dict(temperature=2.0), "only applies to --loss kl"),
    (dict(lr=float("inf")), "--lr must be finite, got inf"),
    (dict(label_weight=float("nan")), "--label-weight must be finite"),
    (dict(lr_mult=(1, 1, float("nan"), 1, 1)), "--lr-mult must be finite"),
])
def test_bad_option_combinations(options, message, tmp_path):
    values = dict(student="test_resnet", out=str(tmp_path), stores=("a.zarr",))
    values.update(options)
    with pytest.raises(ValueError, match=message):
        TrainConfig(**values)


def test_cli_reports_refusals_in_one_line(images, tmp_path, capsys):
    partial = store(images, "partial", complete=False, chunk_rows=16)
    code = main(["train-student", "--student", "test_resnet", "--store", partial, "--out",
                 str(tmp_path / "run"), "--input-size", "32", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"ssld: error: label store {partial} is incomplete")
    code = main(["train-student", "--student", "test_resnet", "--store", partial, "--out",
                 str(tmp_path / "run"), "--lr-mult", "1,2"])
    assert code == 2 and "expected 5 numbers" in capsys.readouterr().err


def test_cli_trains_and_prints_a_summary(images, tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["train-student", "--student", "test_resnet", "--store", store(images, "ok"),
                 "--out", str(out), "--epochs", "1", "--batch-size", "8", "--input-size", "32",
                 "--num-workers", "0", "--device", "cpu", "--loss", "skl", "--threads", "1"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"run {out}: 1 epoch(s)" in captured.out
    assert os.path.exists(out / "last.pt")


def test_the_default_lr_follows_the_loss(images, tmp_path):
    """Without --lr: 0.1 for 256 images with hard labels and the KL-like losses, 0.4 with JS
    (its gradient near agreement is a quarter of KL's: tests/test_losses.py); an explicit
    lr is kept, and the resolved value is what the run records."""
    import json

    ok = store(images, "ok")
    assert config(tmp_path / "a", [ok]).lr == pytest.approx(0.4)
    for loss in ("skl", "kl", "soft-ce"):
        assert config(tmp_path / "a", [ok], loss=loss).lr == pytest.approx(0.1)
    assert config(tmp_path / "a", [], supervised=True, data="x").lr == pytest.approx(0.1)
    assert config(tmp_path / "a", [ok], lr=0.05).lr == pytest.approx(0.05)
    out = tmp_path / "run"
    train(config(out, [ok], epochs=1))
    assert json.loads((out / "config.json").read_text())["lr"] == pytest.approx(0.4)


def test_cli_crop_scale_reaches_the_config(monkeypatch, tmp_path):
    """--crop-scale MIN MAX is passed to TrainConfig (it sets the random-crop area range)."""
    import student_train.trainer as trainer
    from cli import main

    seen = {}

    def fake_train(cfg):
        seen["cfg"] = cfg
        raise ValueError("stop here")

    monkeypatch.setattr(trainer, "train", fake_train)
    code = main(["train-student", "--student", "resnet10t", "--data", str(tmp_path),
                 "--supervised", "--out", str(tmp_path / "run"), "--crop-scale", "0.35", "1.0"])
    assert code == 2 and seen["cfg"].crop_scale == (0.35, 1.0)


def cli_train(out, stores, *extra):
    return main(["train-student", "--student", "test_resnet", *[a for s in stores
                                                                for a in ("--store", s)],
                 "--out", str(out), "--epochs", "2", "--batch-size", "8", "--input-size", "32",
                 "--num-workers", "0", "--device", "cpu", "--threads", "1", *extra])


def test_disk_full_before_best_pt_is_one_line_and_resume_rewrites_best(images, tmp_path, capsys,
                                                                       monkeypatch):
    """A full disk after last.pt and before best.pt: one line, exit 1; --resume rewrites
    best.pt (last.pt is the best epoch) instead of trusting the record."""
    out = tmp_path / "run"
    save = torch.save

    def full_for_best(obj, f, *args, **kwargs):
        if "best.pt" in str(getattr(f, "name", f)):
            raise OSError(28, "No space left on device")
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_for_best)
    code = cli_train(out, [store(images, "ok")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("ssld: failed: No space left on device (errno 28): "
                                            f"{out / 'best.pt'}"), err
    assert "Traceback" not in "\n".join(err)
    assert not (out / "best.pt").exists() and not any(p.name.startswith("best.pt.tmp")
                                                       for p in out.iterdir())
    last = torch.load(out / "last.pt", weights_only=True)
    assert last["epoch"] == 1 and last["best"]["epoch"] == 1
    monkeypatch.setattr(torch, "save", save)
    assert cli_train(out, [store(images, "ok")], "--resume") == 0, capsys.readouterr().err
    assert "did not hold the best epoch 1 (an interrupted save): rewritten from last.pt" in \
        (out / "train.log").read_text()
    final = torch.load(out / "last.pt", weights_only=True)
    assert torch.load(out / "best.pt", weights_only=True)["epoch"] == final["best"]["epoch"]


def test_resume_of_a_finished_run_rewrites_a_missing_best_pt(images, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_train(out, [store(images, "ok")], "--epochs", "1") == 0
    last = torch.load(out / "last.pt", weights_only=True)
    os.remove(out / "best.pt")
    capsys.readouterr()
    assert cli_train(out, [store(images, "ok")], "--epochs", "1", "--resume") == 2
    assert "already finished all 1 epochs" in capsys.readouterr().err
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["epoch"] == 1
    assert all(torch.equal(best["state_dict"][k], v) for k, v in last["state_dict"].items())


def test_a_lost_best_pt_that_cannot_be_rebuilt_is_reported_and_re_established(tmp_path):
    from student_train.checkpoint import restore_best

    torch.save({"epoch": 1}, tmp_path / "best.pt")  # best.pt of another epoch than recorded
    checkpoint = {"epoch": 3, "best": {"top1": 0.5, "epoch": 2, "score": 0.5}}
    note = restore_best(str(tmp_path), checkpoint, write=True)
    assert "best epoch 2) is missing or damaged and cannot be rebuilt" in note
    assert checkpoint["best"]["epoch"] is None and checkpoint["best"]["score"] == -float("inf")
    checkpoint = {"epoch": 3, "best": {"top1": 0.5, "epoch": 1, "score": 0.5}}
    assert restore_best(str(tmp_path), checkpoint, write=True) is None  # best.pt is epoch 1


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_resume_from_a_damaged_last_pt_is_one_line_naming_it(images, tmp_path, capsys, damage):
    out = tmp_path / "run"
    out.mkdir()
    if damage == "garbage":
        (out / "last.pt").write_bytes(b"\x00not a checkpoint\n" * 10)
    else:
        torch.save({"format": "ssld.train-student", "weights": torch.zeros(10000)},
                   out / "last.pt")
        data = (out / "last.pt").read_bytes()
        (out / "last.pt").write_bytes(data[:len(data) // 2])
    code = cli_train(out, [store(images, "ok")], "--resume")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"ssld: error: --resume: {out / 'last.pt'} cannot be read (truncated or "
                          "not a torch checkpoint")


def test_init_from_another_architecture_is_one_line_naming_the_parameter(images, tmp_path,
                                                                         capsys):
    import timm

    other = tmp_path / "resnet10t.pth"
    torch.save(timm.create_model("resnet10t", num_classes=CLASSES).state_dict(), other)
    code = cli_train(tmp_path / "run", [store(images, "ok")], "--init", str(other))
    err = capsys.readouterr().err.strip().splitlines()  # after the data log lines: one line
    assert code == 2 and not any("Traceback" in line for line in err), err
    assert err[-1].startswith(f"ssld: error: --init {other} does not fit test_resnet: conv1.0.weight "
                          "has shape")
    assert_nothing_trained(str(tmp_path / "run"))


def test_missing_val_is_reported_as_val(images, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"--val {tmp_path / 'nope'} does not exist"):
        train(config(tmp_path / "run", [store(images, "ok")], val=str(tmp_path / "nope")))
    (tmp_path / "val.txt").write_text("a.png 0\n")
    with pytest.raises(FileNotFoundError, match="--val-root .* is not a folder"):
        train(config(tmp_path / "run", [store(images, "ok")], val=str(tmp_path / "val.txt"),
                     val_root=str(tmp_path / "none")))


@pytest.mark.parametrize("key", ["../outside/x.png", "c0/../../outside/x.png", "/outside/x.png"])
def test_store_keys_outside_the_dataset_root_are_refused(images, tmp_path, capsys, key):
    root, keys, labels = images
    data = tmp_path / "data"
    shutil.copytree(root / "images", data / "images")
    outside = data / "outside"  # the file ../outside/x.png names: it exists, and is not ours
    outside.mkdir()
    shutil.copy(root / "images" / keys[0], outside / "x.png")
    path = str(tmp_path / "escape.zarr")
    make_store(path, str(data / "images"), keys, labels, classes=CLASSES)
    import zarr
    zarr.open_array(f"{path}/keys", mode="r+")[3] = key  # what a hand-made store might hold
    code = main(["train-student", "--student", "test_resnet", "--store", path, "--out",
                 str(tmp_path / "run"), "--input-size", "32", "--device", "cpu",
                 "--num-workers", "0", "--batch-size", "8", "--epochs", "1", "--threads", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"ssld: error: label store {path}: key {key!r} points outside its "
                          "dataset root")
    assert_nothing_trained(str(tmp_path / "run"))
