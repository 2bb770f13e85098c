"""teacher_infer.model: name mapping, checkpoint forms, pretrained weights without a network."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY_MODEL
from teacher_infer import InferConfig
from teacher_infer.model import load_teacher, pretrained_source, resolve_model_name
from teacher_infer.runtime import read_state_dict

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("name,expected", [
    ("resnext101_32x16d_wsl", "resnext101_32x16d.fb_wsl_ig1b_ft_in1k"),
    ("ResNeXt101_32x16d_wsl", "resnext101_32x16d.fb_wsl_ig1b_ft_in1k"),
    ("ResNet50_vd", "resnet50d"),
    ("MobileNetV3_large_x1_0", "mobilenetv3_large_100"),
    ("MobileNetV3_small_x1_0", "mobilenetv3_small_100"),
    ("EfficientNetB0", "efficientnet_b0"),
    # timm's own alias would load 32x8d weights
    ("ig_resnext101_32x16d", "resnext101_32x16d.fb_wsl_ig1b_ft_in1k"),
    ("resnet50", "resnet50"),
    ("resnet50.a1_in1k", "resnet50.a1_in1k"),
    ("resnet50.tv_in1k", "resnet50.tv_in1k"),
])
def test_model_names(name, expected):
    assert resolve_model_name(name) == expected


def test_mapped_names_are_real_timm_models():
    import timm

    from teacher_infer.model import PADDLE_NAMES

    for target in set(PADDLE_NAMES.values()):
        arch, _, tag = target.partition(".")
        assert timm.is_model(arch), target
        if tag:
            assert target in timm.list_pretrained(f"{arch}.*"), target


def test_unknown_names_list_close_matches():
    with pytest.raises(ValueError, match=r"unknown model 'resnet50_vdd'.*resnet50_vd"):
        resolve_model_name("resnet50_vdd")
    with pytest.raises(ValueError, match="close matches: .*resnext101_32x16d"):
        resolve_model_name("resnext101_32x16")
    with pytest.raises(ValueError, match="no pretrained tag 'nope'"):
        resolve_model_name("resnet50.nope")
    with pytest.raises(ValueError, match="32x8d"):
        resolve_model_name("ig_resnext101_32x48d")


def _config(tmp_path, **kwargs):
    return InferConfig(model=TINY_MODEL, data=str(tmp_path), out=str(tmp_path / "s.zarr"),
                       input_size=32, **kwargs)


@pytest.mark.parametrize("form", ["pth", "safetensors", "train", "ddp"])
def test_checkpoint_forms_load_the_same_weights(make_checkpoint, tmp_path, form):
    reference = torch.load(make_checkpoint(form="pth"), weights_only=True)
    teacher = load_teacher(_config(tmp_path, checkpoint=str(make_checkpoint(form=form))),
                           torch.device("cpu"))
    for key, value in teacher.model.state_dict().items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=0)
    assert teacher.record["weights"] == "checkpoint"
    assert len(teacher.record["checkpoint_sha256"]) == 64
    assert teacher.record["checkpoint_key"] == {"train": "model_ema"}.get(form)
    assert teacher.data_config["input_size"] == (3, 32, 32)
    assert not teacher.model.training


def test_checkpoint_class_count_is_taken_from_the_checkpoint(make_checkpoint, tmp_path):
    path = make_checkpoint(num_classes=10)
    reference = torch.load(path, weights_only=True)
    for num_classes in (None, 10):  # read from the classifier, or given explicitly
        teacher = load_teacher(_config(tmp_path, checkpoint=str(path), num_classes=num_classes),
                               torch.device("cpu"))
        assert teacher.num_classes == 10
        for key, value in teacher.model.state_dict().items():
            torch.testing.assert_close(value, reference[key], rtol=0, atol=0)
    # an explicit count that contradicts the checkpoint is refused, naming the right one
    with pytest.raises(ValueError, match="pass --num-classes 10"):
        load_teacher(_config(tmp_path, checkpoint=str(path), num_classes=7), torch.device("cpu"))


def test_unreadable_checkpoints(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        read_state_dict(str(tmp_path / "junk.pth"))
    torch.save({"epoch": 1, "lr": 0.1}, tmp_path / "nostate.pth")
    with pytest.raises(ValueError, match="no state dict"):
        read_state_dict(str(tmp_path / "nostate.pth"))
    with pytest.raises(FileNotFoundError):
        read_state_dict(str(tmp_path / "absent.pth"))


def test_random_weights_are_seeded(tmp_path):
    first = load_teacher(_config(tmp_path, random_weights=True, seed=5), torch.device("cpu"))
    second = load_teacher(_config(tmp_path, random_weights=True, seed=5), torch.device("cpu"))
    for (key, a), b in zip(first.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), key
    assert first.record["weights"] == "random(seed=5)"


def test_preprocessing_overrides(tmp_path):
    teacher = load_teacher(_config(tmp_path, random_weights=True, interpolation="bicubic",
                                   mean=(0.1, 0.2, 0.3), std=(1, 2, 3), crop_pct=0.8),
                           torch.device("cpu"))
    config = teacher.data_config
    assert config["interpolation"] == "bicubic" and config["crop_pct"] == 0.8
    assert tuple(config["mean"]) == (0.1, 0.2, 0.3) and tuple(config["std"]) == (1, 2, 3)


def test_pretrained_fails_fast_when_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(ValueError, match="not in the local cache and the network is unreachable"):
        pretrained_source("resnet50d")
    assert time.perf_counter() - started < 2


def test_pretrained_from_the_hub_cache(make_checkpoint, tmp_path, monkeypatch):
    """Weights placed in the HF cache layout are loaded with no network access at all."""
    hub = tmp_path / "hub"
    import timm

    hf_hub_id = timm.models.get_pretrained_cfg(TINY_MODEL).hf_hub_id
    repo = hub / f"models--{hf_hub_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    os.symlink(make_checkpoint(form="safetensors"), snapshot / "model.safetensors")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    teacher = load_teacher(_config(tmp_path, pretrained=True), torch.device("cpu"))
    assert teacher.record["weights"] == "pretrained"
    assert Path(teacher.record["pretrained_from"]).name == "model.safetensors"
    reference = torch.load(make_checkpoint(form="pth"), weights_only=True)
    for key, value in teacher.model.state_dict().items():
        assert torch.equal(value, reference[key]), key


def test_pretrained_gives_up_on_an_unreachable_hub(tmp_path, monkeypatch):
    """No HF_HUB_OFFLINE: the hub is probed for a few seconds at most, then a clear error."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://10.255.255.1:81")  # unroutable: connect hangs
    started = time.perf_counter()
    with pytest.raises(ValueError, match="network is unreachable"):
        pretrained_source("resnet50d")
    assert time.perf_counter() - started < 6
