"""``ssld eval`` / ``student_train.evaluate``: accuracy equals a direct forward pass."""
from __future__ import annotations

import json
import re

import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

from cli import main
from student_train import evaluate
from student_train.checkpoint import make_checkpoint as student_checkpoint
from student_train.config import TrainConfig

SIZE = 48


def direct_accuracy(model, image_set, input_size=SIZE):
    """Top-1/top-5 with timm's own eval transform (resize, center crop) and a plain forward."""
    config = resolve_data_config({"input_size": (3, input_size, input_size)}, model=model)
    transform = create_transform(**config)
    model.eval()
    top1 = top5 = 0
    with torch.no_grad():
        for key, label in zip(image_set.keys, image_set.labels):
            with Image.open(image_set.path(key)) as image:
                logits = model(transform(image.convert("RGB"))[None])[0]
            top1 += int(logits.argmax() == label)
            top5 += int(label in logits.topk(min(5, len(logits))).indices)
    return top1 / len(image_set), top5 / len(image_set)


def test_eval_of_a_plain_state_dict_equals_a_direct_forward(image_folder, make_checkpoint,
                                                            capsys):
    path = make_checkpoint(model="test_resnet", num_classes=3, seed=5)
    model = timm.create_model("test_resnet", num_classes=3)
    model.load_state_dict(torch.load(path, weights_only=True))
    top1, top5 = direct_accuracy(model, image_folder)
    assert 0 < top1 < 1  # the test can tell a wrong answer from a right one
    result = evaluate("test_resnet", str(path), str(image_folder.data), input_size=SIZE,
                      batch_size=5, device="cpu", num_workers=0, threads=1)
    assert result.images == len(image_folder)
    assert result.top1 == pytest.approx(top1) and result.top5 == pytest.approx(top5)
    assert result.images_per_s > 0

    code = main(["eval", "--model", "test_resnet", "--checkpoint", str(path), "--data",
                 str(image_folder.data), "--input-size", str(SIZE), "--device", "cpu",
                 "--num-workers", "0", "--threads", "1"])
    out = capsys.readouterr().out
    assert code == 0
    shown = float(re.search(r"top-1 ([\d.]+)%", out).group(1))
    assert shown == pytest.approx(100 * top1, abs=0.005)

    code = main(["eval", "--model", "test_resnet", "--checkpoint", str(path), "--data",
                 str(image_folder.data), "--input-size", str(SIZE), "--device", "cpu",
                 "--num-workers", "0", "--json", "--threads", "1"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["images"] == len(image_folder)
    assert report["top1"] == pytest.approx(top1) and report["top5"] == pytest.approx(top5)


def test_eval_of_a_train_student_checkpoint_uses_its_input_size(image_folder, list_file,
                                                                tmp_path):
    torch.manual_seed(1)
    model = timm.create_model("test_resnet", num_classes=3)
    with torch.no_grad():
        model.fc.weight.mul_(8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = TrainConfig(student="test_resnet", out=str(tmp_path), stores=("x.zarr",))
    state = student_checkpoint(model=model, ema=None, optimizer=optimizer, scaler=None,
                               epoch=1, step=1, cfg=cfg, model_name="test_resnet",
                               num_classes=3, data_config={"input_size": 40}, rng=[],
                               best={}, metrics={})
    torch.save(state, tmp_path / "last.pt")
    top1, top5 = direct_accuracy(model, image_folder, input_size=40)
    result = evaluate("test_resnet", str(tmp_path / "last.pt"), str(image_folder.data),
                      device="cpu", num_workers=0, threads=1)
    assert (result.top1, result.top5) == (pytest.approx(top1), pytest.approx(top5))
    # a list file with one unlabeled line: that image is not counted
    listed = evaluate("test_resnet", str(tmp_path / "last.pt"), str(list_file.data),
                      root=str(list_file.root), device="cpu", num_workers=0, threads=1)
    assert listed.images == len(list_file) - 1


def test_eval_refuses_what_does_not_fit(image_folder, make_checkpoint, tmp_path):
    two = make_checkpoint(model="test_resnet", num_classes=2, seed=1)
    with pytest.raises(ValueError, match="label 2 but the checkpoint has 2 classes"):
        evaluate("test_resnet", str(two), str(image_folder.data), input_size=SIZE,
                 device="cpu", num_workers=0, threads=1)
    with pytest.raises(ValueError, match="is it a checkpoint of this model"):
        evaluate("test_efficientnet", str(two), str(image_folder.data), device="cpu")
    with pytest.raises(FileNotFoundError):
        evaluate("test_resnet", str(tmp_path / "none.pt"), str(image_folder.data))
