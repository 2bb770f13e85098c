"""What ``ssld train-student`` refuses before the first epoch, and how the CLI reports it."""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import labelstore
import student_train.trainer as train_module
from cli import main
from student_train import TrainConfig, train
from train_data import make_images, make_store

CLASSES = 4
REPO = Path(__file__).resolve().parents[1]


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


def train_one_epoch_of(cfg, monkeypatch):
    """Train ``cfg`` and stop it after its first epoch (as a kill would)."""
    original = train_module.train_one_epoch
    calls = []

    def once(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_one_epoch", once)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(train_module, "train_one_epoch", original)


def test_resume_with_changed_options_is_refused_naming_them(images, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train_one_epoch_of(config(out, [store(images, "ok")]), monkeypatch)
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


def test_resume_refuses_a_store_rewritten_at_the_same_path(images, tmp_path, capsys,
                                                           monkeypatch):
    """The options name stores by path; another teacher's store written at that path would
    be trained on as if it were the same. The checkpoint records each store's label digests
    (inspect --json's label_sha256) and the resume names the store that changed."""
    root, keys, labels = images
    path = str(tmp_path / "teacher.zarr")
    make_store(path, str(root / "images"), keys, labels, classes=CLASSES)
    out = tmp_path / "run"
    train_one_epoch_of(config(out, [path, store(images, "ok")]), monkeypatch)
    recorded = torch.load(out / "last.pt", weights_only=True)["data"]
    assert recorded[0]["label_sha256"] == labelstore.label_sha256(labelstore.open(path))
    shutil.rmtree(path)
    make_store(path, str(root / "images"), keys, labels, classes=CLASSES, seed=1)  # another teacher
    code = cli_train(out, [path, store(images, "ok")], "--resume")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1] == (
        f"ssld: error: --resume: label store {path} (indices, probs differ) since "
        f"{out / 'last.pt'} was written; resume with the data the run started from, or start "
        "a new --out"), err
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1  # nothing trained
    shutil.rmtree(path)
    make_store(path, str(root / "images"), keys, labels, classes=CLASSES)  # the same again
    assert train(config(out, [path, store(images, "ok")], resume=True)).epochs == 2


def test_resume_refuses_a_changed_image_source(images, tmp_path, monkeypatch):
    """The same for --data (and --val): a list file whose labels changed since."""
    root, keys, labels = images
    listing = tmp_path / "train.txt"
    listing.write_text("".join(f"{k} {label}\n" for k, label in zip(keys, labels)))
    out = tmp_path / "run"
    options = dict(data=str(listing), root=str(root / "images"), supervised=True)
    train_one_epoch_of(config(out, [], **options), monkeypatch)
    listing.write_text("".join(f"{k} {(label + 1) % CLASSES}\n" for k, label in zip(keys, labels)))
    with pytest.raises(ValueError, match=f"--resume: --data {listing} \\(labels differ\\)"):
        train(config(out, [], resume=True, **options))


class FullDisk:
    """A file opened for writing on a disk with ``room`` bytes left: the write that would
    pass it fails with ENOSPC, as the kernel's does (a partial write first)."""

    def __init__(self, path, mode, room):
        self.file, self.room = open(path, mode), room

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        if size > self.room:
            self.file.write(bytes(memoryview(data).cast("B")[:self.room]))
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= size
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def test_disk_full_inside_torch_save_is_the_documented_line(images, tmp_path, capsys,
                                                            monkeypatch):
    """torch's zip writer turns the ENOSPC of a write into a bare RuntimeError ('unexpected
    pos ...'); the command still ends with the one documented line naming the checkpoint."""
    import student_train.checkpoint as checkpoint

    out = tmp_path / "run"
    monkeypatch.setattr(checkpoint, "open", lambda path, mode: FullDisk(path, mode, 4096),
                        raising=False)
    code = cli_train(out, [store(images, "ok")], "--epochs", "1")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1] == (
        f"ssld: failed: No space left on device (errno 28): {out / 'last.pt'}; free some space "
        "and run the same command again (infer-teacher resumes the store, train-student "
        "continues with --resume)"), err
    assert not any(p.name.startswith("last.pt") for p in out.iterdir())  # no half file left


def _tmpfs_works(folder) -> bool:
    """A tmpfs mounted in a user and mount namespace of its own (no root on the host)."""
    try:
        return subprocess.run(["unshare", "-r", "-m", "sh", "-c",
                               f"mount -t tmpfs -o size=1m none {folder}"],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.slow
def test_a_real_full_disk_while_saving_is_one_line(images, tmp_path):
    """The same on a real full file system: --out on a 1 MiB tmpfs, where config.json and the
    log fit and the first checkpoint does not."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if not _tmpfs_works(disk):
        pytest.skip("cannot mount a tmpfs in a user namespace here")
    out = disk / "run"
    command = (f"mount -t tmpfs -o size=1m none {disk} && exec {sys.executable} -m cli "
               f"train-student --student test_resnet --store {store(images, 'ok')} --out {out} "
               "--epochs 1 --batch-size 8 --input-size 32 --num-workers 0 --device cpu && "
               f"ls -a {out}")
    done = subprocess.run(["unshare", "-r", "-m", "sh", "-c", command], capture_output=True,
                          text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    err = done.stderr.strip().splitlines()
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert err[-1].startswith(f"ssld: failed: No space left on device (errno 28): "
                              f"{out / 'last.pt'}; free some space"), err


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
    assert err[-1].startswith(f"ssld: error: --init {other} does not fit test_resnet: "
                              "conv1.0.weight has shape")
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


NAMES = [f"c{i}" for i in range(CLASSES)]  # the class folders make_images writes


def test_stores_whose_class_names_differ_are_refused_naming_them(images, tmp_path):
    """merge and ensemble refuse to combine them; so does train-student (a class id would
    mean two classes in one training set)."""
    named = store(images, "named", class_names=NAMES)
    other = store(images, "renamed", class_names=["c0", "c1", "c3", "c2"])
    with pytest.raises(ValueError, match=f"class_names differ: {named} has 'c2' at class 2, "
                                         f"{other} has 'c3'"):
        train(config(tmp_path / "run", [named, other]))
    assert_nothing_trained(tmp_path / "run")
    # a store that records no names is taken as of the same classes (merge's rule)
    train(config(tmp_path / "fine", [named, store(images, "ok")], epochs=1))


def test_the_same_store_twice_is_refused(images, tmp_path):
    """Every row would train twice per epoch; an alias through a symlink is the same store."""
    path = store(images, "ok")
    with pytest.raises(ValueError, match=f"store {path} is given twice"):
        train(config(tmp_path / "run", [path, path]))
    alias = tmp_path / "alias.zarr"
    alias.symlink_to(path)
    with pytest.raises(ValueError, match=f"store {alias} is given twice"):
        train(config(tmp_path / "run", [path, str(alias)]))
    assert_nothing_trained(tmp_path / "run")


def val_folder(images, tmp_path, folders):
    """A --val class folder holding the images of ``folders`` only (a class left out)."""
    root, keys, labels = images
    val = tmp_path / "val"
    for key in keys:
        if key.split("/")[0] in folders:
            (val / key).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(root / "images" / key, val / key)
    return val


def test_val_class_folders_are_matched_to_the_store_class_names(images, tmp_path):
    """A --val folder without class c1: its c2 and c3 images keep classes 2 and 3 (by sorted
    folder index they would be scored as 1 and 2), and the checkpoint records the names."""
    from student_train.data import build_data
    from student_train.distributed import setup
    from student_train.metrics import setup_logger

    root, keys, labels = images
    val = val_folder(images, tmp_path, {"c0", "c2", "c3"})
    cfg = config(tmp_path / "run", [store(images, "named", class_names=NAMES)], val=str(val),
                 epochs=1)
    data = build_data(cfg, setup("cpu"), {"input_size": 32, "interpolation": "bilinear",
                                          "mean": (0.5,) * 3, "std": (0.5,) * 3,
                                          "crop_pct": 0.875},
                      log=setup_logger(None, is_main=True))
    val_samples = data.val.dataset.samples
    expected = {os.path.join(val, key): int(label) for key, label in zip(keys, labels)
                if key.split("/")[0] != "c1"}
    got = {val_samples.path(i): int(val_samples.labels[i]) for i in range(len(val_samples))}
    assert got == expected and 1 not in got.values()
    train(cfg)
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["class_names"] == NAMES


def test_val_folders_that_cannot_be_placed_are_refused(images, tmp_path, capsys):
    val = val_folder(images, tmp_path, {"c0", "c2", "c3"})
    (val / "c2").rename(val / "wolf")
    with pytest.raises(ValueError, match="--val .*: class folder\\(s\\) 'wolf' are not among the "
                                         "4 class names of label store"):
        train(config(tmp_path / "run", [store(images, "named", class_names=NAMES)],
                     val=str(val)))
    # a store without names: three folders cannot be placed among four classes
    code = cli_train(tmp_path / "run", [store(images, "ok")], "--val", str(val))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith(f"ssld: error: --val {val} has 3 class folders but "
                                            "label store"), err
    assert_nothing_trained(tmp_path / "run")


def damaged_copy(images, tmp_path, bad=(3, 17)):
    """A store over a copy of the images whose files ``bad`` were damaged after the teacher
    read them (their rows are valid). Returns (store, damaged paths)."""
    root, keys, labels = images
    shutil.copytree(root / "images", tmp_path / "images")
    path = str(tmp_path / "s.zarr")
    make_store(path, str(tmp_path / "images"), keys, labels, classes=CLASSES)
    damaged = []
    for row in bad:
        target = tmp_path / "images" / keys[row]
        target.write_bytes(b"garbage, not an image" * 10)
        damaged.append(str(target))
    return path, damaged


def read_failed(out):
    return dict(line.split("\t", 1) for line in (out / "failed.txt").read_text().splitlines())


@pytest.mark.parametrize("workers,decoder", [
    (0, "pil"), (2, "pil"), (2, "dali")])
def test_unreadable_images_met_in_training_are_left_out_and_listed(images, tmp_path, capsys,
                                                                   workers, decoder):
    """Like the teacher pass: the run goes on without them, counts them per epoch
    (metrics.csv 'skipped', the log) and lists them in RUN_DIR/failed.txt; in DataLoader
    worker processes too, with either decoder, and for validation images."""
    if decoder == "dali":
        pytest.importorskip("nvidia.dali")
    path, damaged = damaged_copy(images, tmp_path)
    val = tmp_path / "val"
    shutil.copytree(tmp_path / "images", val)  # the same two damaged files among them
    out = tmp_path / "run"
    code = cli_train(out, [path], "--num-workers", str(workers), "--val", str(val),
                     "--decoder", decoder)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "Traceback" not in captured.err
    listed = read_failed(out)
    assert sorted(listed) == sorted(damaged + [str(val / p[len(str(tmp_path / "images")) + 1:])
                                               for p in damaged])
    assert all("PIL cannot identify" in reason for reason in listed.values()), listed
    import csv
    with open(out / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    # per epoch: both training images (5 full batches of 8: every sample is met) and both
    # validation images
    assert [int(row["skipped"]) for row in rows] == [4, 4], rows
    assert f"images that could not be read, left out: 4 (listed in {out / 'failed.txt'})" \
        in captured.out


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_images_stop_ends_the_run_with_one_line(images, tmp_path, capsys, workers):
    path, damaged = damaged_copy(images, tmp_path, bad=(5,))
    out = tmp_path / "run"
    code = cli_train(out, [path], "--num-workers", str(workers), "--bad-images", "stop")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "Traceback" not in "\n".join(err), err
    assert err[-1].startswith(f"ssld: error: cannot decode {damaged[0]}: not an image (PIL "
                              "cannot identify the format) (--bad-images stop;"), err
    assert not (out / "failed.txt").exists() and not (out / "last.pt").exists()


def test_a_step_whose_every_image_was_left_out_is_a_zero_step(images):
    """All rows of a batch unreadable: the step still runs (every DDP rank must take it) with
    a zero loss, not the NaN of a mean over no rows, and leaves the weights finite."""
    import timm

    from student_train.distributed import setup
    from student_train.losses import DistillationLoss

    model = timm.create_model("test_resnet", num_classes=CLASSES)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    empty = (torch.zeros(0, 3, 32, 32), torch.zeros(0, CLASSES), torch.zeros(0, dtype=torch.long))
    full = (torch.rand(4, 3, 32, 32), torch.softmax(torch.rand(4, CLASSES), 1),
            torch.zeros(4, dtype=torch.long))
    stats = train_module.train_one_epoch(model, [empty, full], DistillationLoss("js"), optimizer,
                                         lambda step: 0.1, first_step=0, env=setup("cpu"),
                                         precision="fp32")
    assert stats.images == 4 and torch.isfinite(torch.tensor(stats.loss))
    assert all(torch.isfinite(p).all() for p in model.parameters())
