"""``ssld eval`` / ``student_train.evaluate``: accuracy equals a direct forward pass."""
from __future__ import annotations

import dataclasses
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
    with pytest.raises(ValueError, match="has 3 class folders but --checkpoint .* has 2 classes "
                                         "and records no class names"):
        evaluate("test_resnet", str(two), str(image_folder.data), input_size=SIZE,
                 device="cpu", num_workers=0, threads=1)
    with pytest.raises(ValueError, match="is it a checkpoint of this model"):
        evaluate("test_efficientnet", str(two), str(image_folder.data), device="cpu")
    with pytest.raises(FileNotFoundError):
        evaluate("test_resnet", str(tmp_path / "none.pt"), str(image_folder.data))


def named_checkpoint(path, class_names, always=None, seed=1):
    """A train-student checkpoint of a test_resnet that records ``class_names`` (as
    train-student does for the data it trained on); with ``always`` its classifier answers
    that class for every image (a model whose right answers are easy to count)."""
    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", num_classes=len(class_names))
    with torch.no_grad():
        model.fc.weight.mul_(8)
        if always is not None:
            model.fc.weight.zero_()
            model.fc.bias.copy_(torch.nn.functional.one_hot(torch.tensor(always),
                                                            len(class_names)) * 10.0)
    cfg = TrainConfig(student="test_resnet", out=str(path.parent), stores=("x.zarr",))
    state = student_checkpoint(model=model, ema=None, optimizer=torch.optim.SGD(
        model.parameters(), lr=0.1), scaler=None, epoch=1, step=1, cfg=cfg,
        model_name="test_resnet", num_classes=len(class_names),
        data_config={"input_size": SIZE}, rng=[], best={}, metrics={},
        class_names=list(class_names))
    torch.save(state, path)
    return model


def cats_and_foxes(image_set, tmp_path):
    """A validation folder without the n02_dog class: 4 cats, 2 foxes (unequal, so that
    scores under two labelings differ), as an ImageSet with the labels of the full set."""
    import shutil
    from dataclasses import replace

    root = tmp_path / "subset"
    keep = [(key, label) for key, label in zip(image_set.keys, image_set.labels)
            if label == 0] + [(key, label) for key, label in zip(image_set.keys,
                                                                image_set.labels) if label == 2][:2]
    for key, _ in keep:
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(image_set.path(key), root / key)
    return replace(image_set, data=root, root=root, keys=[k for k, _ in keep],
                   labels=[label for _, label in keep], class_names=["n01_cat", "n03_fox"])


def test_eval_matches_class_folders_to_the_checkpoint_class_names(image_folder, tmp_path):
    """A validation folder that lacks a class, or whose class order is not the folders'
    sorted order, is scored against each image's own class, found by name. By sorted folder
    index a model that always answers 'n03_fox' would score 0 here instead of 2/6, and one
    whose class 0 is 'n03_fox' 4/6 instead of 2/6."""
    subset = cats_and_foxes(image_folder, tmp_path)
    for names, fox in ((["n01_cat", "n02_dog", "n03_fox"], 2),
                       (["n03_fox", "n02_dog", "n01_cat"], 0)):
        model = named_checkpoint(tmp_path / "last.pt", names, always=fox)
        own = [names.index(subset.class_names[0 if label == 0 else 1])
               for label in subset.labels]  # each image's class id, by name
        top1, top5 = direct_accuracy(model, dataclasses.replace(subset, labels=own))
        assert top1 == pytest.approx(2 / 6)
        result = evaluate("test_resnet", str(tmp_path / "last.pt"), str(subset.data),
                          device="cpu", num_workers=0)
        assert (result.top1, result.top5) == (pytest.approx(top1), pytest.approx(top5))


def test_eval_refuses_folders_the_classes_cannot_place(image_folder, make_checkpoint, tmp_path,
                                                      capsys):
    named_checkpoint(tmp_path / "last.pt", ["n01_cat", "n02_dog", "wolf"])
    with pytest.raises(ValueError, match="class folder\\(s\\) 'n03_fox' are not among the 3 "
                                         "class names of --checkpoint"):
        evaluate("test_resnet", str(tmp_path / "last.pt"), str(image_folder.data),
                 device="cpu", num_workers=0)
    # no names recorded: two folders of a three-class model cannot be placed
    three = make_checkpoint(model="test_resnet", num_classes=3, seed=1)
    subset = cats_and_foxes(image_folder, tmp_path)
    code = main(["eval", "--model", "test_resnet", "--checkpoint", str(three), "--data",
                 str(subset.data), "--input-size", str(SIZE), "--device", "cpu",
                 "--num-workers", "0"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "has 2 class folders but --checkpoint" in err and "records no class names" in err


def test_an_unreadable_image_is_one_line_naming_it(image_folder, make_checkpoint, tmp_path,
                                                   capsys):
    """eval scores every image or none: a damaged one ends it with one line naming the
    file, from DataLoader worker processes too (not a worker's traceback)."""
    import shutil

    shutil.copytree(image_folder.data, tmp_path / "val")
    damaged = tmp_path / "val" / image_folder.keys[5]
    damaged.write_bytes(b"not an image" * 20)
    code = main(["eval", "--model", "test_resnet", "--checkpoint",
                 str(make_checkpoint(model="test_resnet", num_classes=3, seed=5)), "--data",
                 str(tmp_path / "val"), "--input-size", str(SIZE), "--device", "cpu",
                 "--num-workers", "2"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err == f"ssld: error: cannot decode {damaged}: not an image (PIL cannot identify " \
                  "the format)\n"
