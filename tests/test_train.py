"""``student_train.train``: distillation, replayed views, resume, modes, optimizer options.

Every run is a tiny timm model (``test_resnet``) at 32 px on generated images, CPU, fp32.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import labelstore
import student_train.trainer as train_module
from student_train import StoreDataset, TrainConfig, train
from student_train.data import build_data
from student_train.distributed import setup
from student_train.models import OnlineTeacher, data_config_for
from student_train.sampling import ShardedSampler, replay_view
from train_data import make_images, make_store

CLASSES, SIZE = 4, 32


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """64 training images in a 3-view store (two rows invalid) and 24 validation images."""
    base = tmp_path_factory.mktemp("train")
    keys, labels = make_images(str(base / "images"), n=64, classes=CLASSES)
    arrays = make_store(str(base / "train.zarr"), str(base / "images"), keys, labels,
                        classes=CLASSES, views=3, invalid=(5, 40), input_size=SIZE)
    make_images(str(base / "val"), n=24, classes=CLASSES, seed=1)
    return {"base": base, "store": str(base / "train.zarr"), "val": str(base / "val"),
            "keys": keys, "labels": labels, "root": str(base / "images"), **arrays}


def config(dataset, out, **options) -> TrainConfig:
    values = dict(student="test_resnet", out=str(out), stores=(dataset["store"],), epochs=2,
                  batch_size=16, lr=0.2, warmup_epochs=0.5, input_size=SIZE, num_workers=0,
                  device="cpu", threads=1)
    values.update(options)
    return TrainConfig(**values)


def read_metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.csv"), newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def distill_run(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "distill"
    result = train(config(dataset, out, epochs=4, val=dataset["val"], ema=0.9))
    return out, result


def test_distillation_lowers_the_loss_and_writes_the_run_directory(distill_run, dataset):
    out, result = distill_run
    assert sorted(os.listdir(out)) == ["best.pt", "config.json", "last.pt", "metrics.csv",
                                       "train.log"]
    rows = read_metrics(out)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    losses = [float(r["train_loss"]) for r in rows]
    assert losses[-1] < 0.7 * losses[0]
    for row in rows:
        assert 0 <= float(row["val_top1"]) <= float(row["val_top5"]) <= 1
        assert 0 <= float(row["agreement"]) <= 1 and float(row["images_per_s"]) > 0
        assert row["ema_top1"] != ""
    resolved = json.load(open(out / "config.json"))
    assert resolved["student"] == "test_resnet" and resolved["resolved"]["crop"] == "replay"
    # 62 valid rows of 64: invalid rows are skipped; lr 0.2 is for 256 images
    assert resolved["resolved"]["num_train"] == 62
    assert resolved["resolved"]["base_lr"] == pytest.approx(0.2 * 16 / 256)
    assert resolved["resolved"]["store_top1"] == 1.0  # the synthetic teacher is always right
    checkpoint = torch.load(out / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == 4 and checkpoint["step"] == 4 * (62 // 16)
    assert checkpoint["state_dict_ema"] is not None
    assert result.best_epoch == checkpoint["best"]["epoch"]
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["metrics"]["val_top1"] == max(float(r["val_top1"]) for r in rows)
    assert "stored labels' top-1" in open(out / "train.log").read()
    assert not [f for f in os.listdir(out) if ".tmp" in f]


def _own_crop(path, box_grid, flip, mean, std) -> torch.Tensor:
    """The test's own replay of a stored view: PIL box resample at 32 px, flip, normalise.

    The box is the store's float32 fraction (what ``read`` returns) in pixel units.
    """
    y0, x0, h, w = labelstore.dequantize_boxes(box_grid).astype(np.float64)
    with Image.open(path) as image:
        image = image.convert("RGB")
        width, height = image.size
        crop = image.resize((SIZE, SIZE), Image.Resampling.BILINEAR,
                            box=(x0 * width, y0 * height, min(x0 + w, 1) * width,
                                 min(y0 + h, 1) * height))
    if flip:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.asarray(crop, dtype=np.float32) / 255).permute(2, 0, 1)
    return (pixels - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def test_val_every_threads_and_an_epoch_bar_in_images_on_a_terminal(dataset, tmp_path,
                                                                     monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    before = torch.get_num_threads()
    wanted = 2 if before == 1 else 1
    try:
        result = train(config(dataset, tmp_path / "r", epochs=3, val=dataset["val"],
                              val_every=2, threads=wanted))
    finally:
        torch.set_num_threads(before)
    rows = read_metrics(tmp_path / "r")
    # validated after epoch 2 and after the last; only those epochs compete for best.pt
    assert [r["val_top1"] != "" for r in rows] == [False, True, True]
    assert result.best_epoch in (2, 3) and result.last["val_top1"] is not None
    assert torch.load(tmp_path / "r" / "best.pt", weights_only=True)["epoch"] in (2, 3)
    resolved = json.load(open(tmp_path / "r" / "config.json"))["resolved"]
    assert resolved["threads"] == wanted
    text = terminal.getvalue()
    # the bar counts images (3 steps of 16 per epoch): elapsed<ETA, images/s
    assert re.search(r"epoch 3/3: .*\d+/48 \[\d\d:\d\d<[?\d:]+, *[?\d.]+img/s\]", text), text
    assert "epoch 3 lr" in text  # the per-epoch log line stays


def test_replayed_views_are_the_stored_crops_with_their_targets(dataset, tmp_path):
    cfg = config(dataset, tmp_path / "r", seed=3)
    data_config = data_config_for("test_resnet", SIZE)
    data = build_data(cfg, setup("cpu"), data_config, log=logging.getLogger("test"))
    valid_rows = np.flatnonzero(dataset["valid"])
    views_seen = set()
    for epoch in (0, 1):
        data.set_epoch(epoch)
        order = data.sampler.indices()
        images, targets, labels = next(iter(data.train))
        targets = targets.dense()  # the batches carry them sparse
        for position in range(len(images)):
            index = int(order[position])
            row = valid_rows[index]  # samples are the valid rows in store order
            view = replay_view(3, epoch, index, 3)
            views_seen.add(view)
            path = os.path.join(dataset["root"], dataset["keys"][row])
            expected = _own_crop(path, dataset["boxes"][row, view], dataset["flips"][row, view],
                                 data_config["mean"], data_config["std"])
            torch.testing.assert_close(images[position], expected, atol=1e-6, rtol=0)
            dense = np.full(CLASSES, 0.0)
            probs = dataset["probs"][row, view].astype(np.float16).astype(np.float64)
            dense[:] = (1 - dataset["probs"][row, view].sum()) / (CLASSES - 3)
            dense[dataset["indices"][row, view]] = probs
            np.testing.assert_allclose(targets[position].numpy(), dense / dense.sum(), atol=1e-3)
            assert labels[position] == dataset["labels"][row]
    assert views_seen == {0, 1, 2}
    assert any(dataset["flips"][valid_rows].ravel())


def test_global_views_target_view_zero_and_eval_crops(dataset, tmp_path):
    cfg = config(dataset, tmp_path / "g", views="global")
    data_config = data_config_for("test_resnet", SIZE)
    data = build_data(cfg, setup("cpu"), data_config, log=logging.getLogger("test"))
    assert data.crop == "random"
    crops: StoreDataset = data.train.dataset
    store = labelstore.open(dataset["store"])
    index = 7
    first, target, _ = crops[(0, index)]
    again, _, _ = crops[(0, index)]
    other, _, _ = crops[(1, index)]
    assert torch.equal(first, again) and not torch.equal(first, other)
    row = int(crops.samples.rows[index])
    np.testing.assert_allclose(target.dense().numpy(), store.dense(row, view=0)[0], atol=1e-6)


def _interrupt_after(monkeypatch, epochs: int):
    calls = {"n": 0}
    original = train_module.train_one_epoch

    def wrapper(*args, **kwargs):
        if calls["n"] == epochs:
            raise KeyboardInterrupt("simulated kill")
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_one_epoch", wrapper)


def test_resume_after_one_epoch_equals_two_straight_epochs(dataset, tmp_path, monkeypatch):
    options = dict(ema=0.8, label_weight=0.5, views="replay")
    train(config(dataset, tmp_path / "straight", **options))
    with monkeypatch.context() as patch:
        _interrupt_after(patch, 1)
        with pytest.raises(KeyboardInterrupt):
            train(config(dataset, tmp_path / "resumed", **options))
    assert torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)["epoch"] == 1
    train(config(dataset, tmp_path / "resumed", resume=True, num_workers=1, **options))
    straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    assert resumed["epoch"] == straight["epoch"] == 2 and resumed["step"] == straight["step"]
    for key in ("state_dict", "state_dict_ema"):
        for name, value in straight[key].items():
            assert torch.equal(value, resumed[key][name]), f"{key}.{name}"
    for a, b in zip(straight["optimizer"]["state"].values(),
                    resumed["optimizer"]["state"].values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert [r["train_loss"] for r in read_metrics(tmp_path / "straight")] == \
        [r["train_loss"] for r in read_metrics(tmp_path / "resumed")]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(dataset, tmp_path, monkeypatch,
                                                           capsys):
    from student_train import TrainingDiverged
    from student_train.losses import DistillationLoss

    original, calls = DistillationLoss.forward, {"n": 0}

    def poisoned(self, logits, teacher_probs, labels=None):
        calls["n"] += 1
        loss = original(self, logits, teacher_probs, labels)
        return loss * float("nan") if calls["n"] > 3 + 1 else loss  # 3 steps per epoch

    monkeypatch.setattr(DistillationLoss, "forward", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(TrainingDiverged, match="last good checkpoint .*last.pt \\(epoch 1\\)"):
        train(config(dataset, out, epochs=3, batch_size=20))
    checkpoint = torch.load(out / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values()
               if v.is_floating_point())
    assert [int(r["epoch"]) for r in read_metrics(out)] == [1]

    from cli import main

    calls["n"] = 0
    code = main(["train-student", "--student", "test_resnet", "--store", dataset["store"],
                 "--out", str(tmp_path / "nan-cli"), "--epochs", "3", "--batch-size", "20",
                 "--input-size", str(SIZE), "--num-workers", "0", "--device", "cpu",
                 "--threads", "1"])
    assert code == 1
    assert "ssld: training stopped: loss became nan" in capsys.readouterr().err


def test_supervised_baseline_uses_labels_only(dataset, tmp_path):
    out = tmp_path / "sup"
    result = train(config(dataset, out, supervised=True, epochs=1))
    row = read_metrics(out)[0]
    assert row["agreement"] == "" and float(row["train_loss"]) > 0
    resolved = json.load(open(out / "config.json"))["resolved"]
    assert resolved["crop"] == "random" and resolved["num_train"] == 62
    assert result.epochs == 1


def test_supervised_from_a_data_source(dataset, tmp_path):
    out = tmp_path / "sup-data"
    train(config(dataset, out, stores=(), data=dataset["val"], supervised=True, epochs=1,
                 batch_size=8))
    assert json.load(open(out / "config.json"))["resolved"]["num_train"] == 24


def test_online_teacher_distils_from_a_forward_on_the_same_batch(dataset, tmp_path,
                                                                  make_checkpoint):
    teacher_file = make_checkpoint(model="test_efficientnet", num_classes=CLASSES, seed=2)
    out = tmp_path / "online"
    train(config(dataset, out, teacher="test_efficientnet",
                 teacher_checkpoint=str(teacher_file), epochs=1))
    row = read_metrics(out)[0]
    assert 0 <= float(row["agreement"]) <= 1
    assert json.load(open(out / "config.json"))["resolved"]["crop"] == "random"


def test_online_teacher_sets_the_class_count(dataset, tmp_path, make_checkpoint,
                                             unlabeled_folder):
    six = make_checkpoint(model="test_efficientnet", num_classes=6, seed=2)
    out = tmp_path / "unlabeled"
    train(config(dataset, out, stores=(), data=str(unlabeled_folder.data), batch_size=4,
                 teacher="test_efficientnet", teacher_checkpoint=str(six), epochs=1))
    assert json.load(open(out / "config.json"))["resolved"]["num_classes"] == 6
    with pytest.raises(ValueError, match="has 4 classes but the teacher has 6"):
        train(config(dataset, tmp_path / "x", teacher="test_efficientnet",
                     teacher_checkpoint=str(six)))


def test_online_teacher_renormalises_to_its_own_statistics():
    seen = {}

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen["x"] = x
            return x.mean(dim=(2, 3))

    teacher = OnlineTeacher(Probe(), ((0.5,) * 3, (0.5,) * 3), ((0.4, 0.5, 0.6), (0.2, 0.3, 0.4)))
    pixels = torch.rand(2, 3, 4, 4)
    teacher.train()
    assert not teacher.model.training
    teacher((pixels - 0.5) / 0.5)
    expected = (pixels - torch.tensor([0.4, 0.5, 0.6])[:, None, None]) / \
        torch.tensor([0.2, 0.3, 0.4])[:, None, None]
    torch.testing.assert_close(seen["x"], expected)


def test_lr_mult_and_freeze_backbone_reach_the_optimizer(dataset, tmp_path, distill_run):
    mult = (0.1, 0.2, 0.3, 0.4, 0.5)
    out = tmp_path / "mult"
    train(config(dataset, out, lr_mult=mult, epochs=1, warmup_epochs=0, nesterov=True))
    groups = torch.load(out / "last.pt", weights_only=True)["optimizer"]["param_groups"]
    assert {g["lr_mult"] for g in groups} == {*mult, 1.0}
    assert all(g["nesterov"] and g["momentum"] == 0.9 for g in groups)
    head = [g for g in groups if g["lr_mult"] == 1.0]
    for g in groups:  # every group follows the schedule times its multiplier
        assert g["lr"] == pytest.approx(head[0]["lr"] * g["lr_mult"])
    assert {g["weight_decay"] for g in groups} == {0.0, 1e-5}  # none on norm/bias

    init = distill_run[0] / "last.pt"
    out = tmp_path / "fixres"
    train(config(dataset, out, init=str(init), freeze_backbone=True, epochs=1, input_size=40))
    after = torch.load(out / "last.pt", weights_only=True)
    # the init run kept an EMA: checkpoints are read preferring EMA weights (timm's rule)
    before = torch.load(init, weights_only=True)["state_dict_ema"]
    groups = after["optimizer"]["param_groups"]
    assert sum(len(g["params"]) for g in groups) == 2  # fc.weight and fc.bias
    for name, value in after["state_dict"].items():
        if name.startswith("fc."):
            assert not torch.equal(value, before[name])
        elif "running" not in name and "num_batches" not in name:
            assert torch.equal(value, before[name]), name  # frozen backbone weights
    resolved = json.load(open(out / "config.json"))["resolved"]
    assert resolved["crop"] == "center" and resolved["data_config"]["input_size"] == 40


def test_sampler_is_disjoint_deterministic_and_changes_per_epoch():
    parts = [ShardedSampler(103, rank=r, world_size=3, seed=1) for r in range(3)]
    for s in parts:
        s.set_epoch(4)
    seen = np.concatenate([s.indices() for s in parts])
    assert len(seen) == len(set(seen)) == 3 * (103 // 3)
    assert all(len(s) == 34 for s in parts)
    again = ShardedSampler(103, rank=1, world_size=3, seed=1)
    again.set_epoch(4)
    assert np.array_equal(again.indices(), parts[1].indices())
    again.set_epoch(5)
    assert not np.array_equal(again.indices(), parts[1].indices())
    evaluation = [ShardedSampler(10, rank=r, world_size=3, shuffle=False).indices()
                  for r in range(3)]
    assert sorted(np.concatenate(evaluation)) == list(range(10))


def test_autoaugment_is_applied_after_the_crop_and_is_deterministic(dataset, tmp_path):
    cfg = config(dataset, tmp_path / "aa", views="global", autoaugment="rand-m9-n3-mstd0.5")
    data_config = data_config_for("test_resnet", SIZE)
    plain = build_data(config(dataset, tmp_path / "p", views="global"), setup("cpu"),
                       data_config, log=logging.getLogger("test")).train.dataset
    augmented = build_data(cfg, setup("cpu"), data_config,
                           log=logging.getLogger("test")).train.dataset
    a, _, _ = augmented[(0, 3)]
    assert torch.equal(a, augmented[(0, 3)][0])
    assert a.shape == plain[(0, 3)][0].shape and not torch.equal(a, plain[(0, 3)][0])
    with pytest.raises(ValueError, match="not a timm policy"):
        build_data(config(dataset, tmp_path / "x", autoaugment="bogus-policy"), setup("cpu"),
                   data_config, log=logging.getLogger("test"))


@pytest.mark.slow
def test_dali_decoder_replays_the_same_crops_as_pil(dataset, tmp_path):
    pytest.importorskip("nvidia.dali")
    data_config = data_config_for("test_resnet", SIZE)
    batches = {}
    for decoder in ("pil", "dali"):
        data = build_data(config(dataset, tmp_path / decoder, decoder=decoder, num_workers=1),
                          setup("cpu"), data_config, log=logging.getLogger("test"))
        data.set_epoch(1)
        batches[decoder] = next(iter(data.train))
    (pil, pil_targets, pil_labels), (dali, dali_targets, dali_labels) = batches["pil"], \
        batches["dali"]
    assert torch.equal(pil_targets.dense(), dali_targets.dense())
    assert torch.equal(pil_labels, dali_labels)
    grey = (pil - dali).abs() * 0.5 * 255  # back to 8-bit grey levels (std 0.5)
    assert grey.max() <= 3.01 and grey.mean() < 0.5
