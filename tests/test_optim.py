"""Parameter groups, LR multipliers, the warmup-cosine schedule and backbone freezing."""

import pytest
import timm
import torch
from torch import nn

from student_train.optim import (
    build_optimizer,
    lr_at,
    make_ema,
    param_groups,
    scale_lr,
    set_lr,
)

# distinct values so that every stage is identifiable by its multiplier
LR_MULT = [0.1, 0.2, 0.3, 0.4, 0.5]


@pytest.fixture(scope="module", params=["resnet10t", "mobilenetv3_large_100", "test_vit"])
def any_model(request):
    return timm.create_model(request.param, pretrained=False, num_classes=7)


@pytest.fixture(scope="module")
def resnet():
    return timm.create_model("resnet10t", pretrained=False, num_classes=7)


@pytest.fixture(scope="module")
def mobilenet():
    return timm.create_model("mobilenetv3_large_100", pretrained=False, num_classes=7)


def _mult_by_name(groups):
    return {name: g["lr_mult"] for g in groups for name in g["param_names"]}


def test_every_trainable_parameter_in_exactly_one_group(any_model):
    groups = param_groups(any_model, weight_decay=1e-4)
    grouped = [id(p) for g in groups for p in g["params"]]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(p) for p in any_model.parameters() if p.requires_grad}
    for g in groups:
        assert len(g["params"]) == len(g["param_names"]) > 0


def test_no_decay_on_norm_bias_and_model_exclusions(any_model):
    excluded = set(getattr(any_model, "no_weight_decay", lambda: set())())
    groups = param_groups(any_model, weight_decay=1e-4)
    for g in groups:
        for name, param in zip(g["param_names"], g["params"]):
            expect_decay = param.ndim > 1 and name not in excluded
            assert g["weight_decay"] == (1e-4 if expect_decay else 0.0), name
    decayed = [n for g in groups if g["weight_decay"] > 0 for n in g["param_names"]]
    assert decayed, "conv/linear weights must keep weight decay"


def test_vit_no_weight_decay_names_excluded():
    vit = timm.create_model("test_vit", pretrained=False, num_classes=7)
    groups = param_groups(vit, weight_decay=0.05)
    no_decay = {n for g in groups if g["weight_decay"] == 0 for n in g["param_names"]}
    assert {"pos_embed", "cls_token"} <= no_decay


def test_resnet_stage_multipliers(resnet):
    mult = _mult_by_name(param_groups(resnet, weight_decay=1e-4, lr_mult=LR_MULT))
    assert mult.keys() == {n for n, _ in resnet.named_parameters()}
    for name, value in mult.items():
        if name.startswith(("conv1.", "bn1.")):
            assert value == LR_MULT[0], name
        elif name.startswith("layer"):
            assert value == LR_MULT[int(name[len("layer")])], name
        else:
            assert name.startswith("fc."), name
            assert value == 1.0


def test_mobilenetv3_blocks_grouped_three_by_three(mobilenet):
    # 15 units in forward order (blocks.0.0 .. blocks.5.2), three per multiplier;
    # blocks.6.0 (1x1 conv to 960, PaddleClas's conv_last) joins the last group
    per_stage = [1, 2, 3, 4, 2, 3]
    units = [f"blocks.{stage}.{i}." for stage, count in enumerate(per_stage) for i in range(count)]
    assert len(units) == 15
    mult = _mult_by_name(param_groups(mobilenet, weight_decay=1e-5, lr_mult=LR_MULT))
    for name, value in mult.items():
        if name.startswith(("conv_stem.", "bn1.")):
            expected = LR_MULT[0]
        elif name.startswith("blocks.6."):
            expected = LR_MULT[4]
        elif name.startswith("blocks."):
            unit = next(i for i, prefix in enumerate(units) if name.startswith(prefix))
            expected = LR_MULT[unit // 3]
        else:
            assert name.startswith(("conv_head.", "classifier.")), name
            expected = 1.0
        assert value == expected, name


@pytest.mark.parametrize(
    "model",
    [
        lambda: timm.create_model("test_vit", pretrained=False),
        lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 2)),
    ],
    ids=["VisionTransformer", "Sequential"],
)
def test_unsplittable_model_raises_naming_its_class(model):
    model = model()
    with pytest.raises(ValueError, match=type(model).__name__):
        param_groups(model, weight_decay=1e-4, lr_mult=LR_MULT)
    param_groups(model, weight_decay=1e-4)  # without lr_mult any model works


@pytest.mark.parametrize("bad", [[1.0] * 4, [1.0, 1.0, -0.5, 1.0, 1.0]])
def test_bad_lr_mult_rejected(resnet, bad):
    with pytest.raises(ValueError, match="lr_mult"):
        param_groups(resnet, weight_decay=1e-4, lr_mult=bad)


def test_build_optimizer_applies_multipliers(resnet):
    optimizer = build_optimizer(resnet, lr=0.4, weight_decay=1e-4, lr_mult=LR_MULT)
    assert isinstance(optimizer, torch.optim.SGD)
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(0.4 * group["lr_mult"])
        assert group["momentum"] == 0.9
    set_lr(optimizer, 0.01)
    assert sorted({round(g["lr"], 12) for g in optimizer.param_groups}) == pytest.approx(
        [0.001, 0.002, 0.003, 0.004, 0.005, 0.01]
    )


def test_freeze_backbone_trains_only_classifier():
    model = timm.create_model("mobilenetv3_large_100", pretrained=False, num_classes=7)
    optimizer = build_optimizer(model, lr=0.1, weight_decay=1e-5, freeze_backbone=True)
    classifier = {id(p) for p in model.get_classifier().parameters()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == classifier
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == classifier


def test_freeze_backbone_with_lr_mult_keeps_head_at_one():
    model = timm.create_model("resnet10t", pretrained=False, num_classes=7)
    optimizer = build_optimizer(
        model, lr=0.1, weight_decay=1e-5, lr_mult=LR_MULT, freeze_backbone=True
    )
    assert {g["lr_mult"] for g in optimizer.param_groups} == {1.0}


def test_nesterov_without_momentum_rejected(resnet):
    with pytest.raises(ValueError, match="momentum"):
        build_optimizer(resnet, lr=0.1, weight_decay=0.0, momentum=0.0, nesterov=True)


TOTAL, WARMUP, BASE = 100, 10, 0.8


def _schedule():
    return [
        lr_at(step, total_steps=TOTAL, warmup_steps=WARMUP, base_lr=BASE)
        for step in range(TOTAL + 1)
    ]


def test_warmup_is_linear_from_near_zero_to_peak():
    lrs = _schedule()
    steps = [lrs[s + 1] - lrs[s] for s in range(WARMUP - 1)]
    assert steps == pytest.approx([BASE / WARMUP] * (WARMUP - 1))
    assert 0 < lrs[0] <= BASE / WARMUP
    assert lrs[WARMUP - 1] == pytest.approx(BASE)


def test_peak_is_base_lr_and_end_is_zero():
    lrs = _schedule()
    assert max(lrs) == pytest.approx(BASE)
    assert lrs[WARMUP] == pytest.approx(BASE)
    assert lrs[TOTAL] == 0.0
    assert lr_at(TOTAL + 5, total_steps=TOTAL, warmup_steps=WARMUP, base_lr=BASE) == 0.0
    midpoint = WARMUP + (TOTAL - WARMUP) // 2
    assert lrs[midpoint] == pytest.approx(BASE / 2)  # cosine is at half height halfway


def test_monotone_decreasing_after_warmup():
    lrs = _schedule()[WARMUP:]
    assert all(later < earlier for earlier, later in zip(lrs, lrs[1:]))


def test_no_warmup_starts_at_base_lr():
    assert lr_at(0, total_steps=10, warmup_steps=0, base_lr=0.1) == pytest.approx(0.1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"step": 0, "total_steps": 0, "warmup_steps": 0}, "total_steps"),
        ({"step": 0, "total_steps": 10, "warmup_steps": 11}, "warmup_steps"),
        ({"step": -1, "total_steps": 10, "warmup_steps": 1}, "step"),
    ],
)
def test_schedule_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lr_at(base_lr=0.1, **kwargs)


def test_scale_lr_linear_rule():
    assert scale_lr(0.1, 256) == pytest.approx(0.1)
    assert scale_lr(0.1, 2048) == pytest.approx(0.8)
    assert scale_lr(1.3, 2048, reference_batch=2048) == pytest.approx(1.3)
    with pytest.raises(ValueError, match="global_batch"):
        scale_lr(0.1, 0)


def test_make_ema_tracks_weights():
    model = nn.Linear(3, 2)
    ema = make_ema(model, decay=0.5)
    with torch.no_grad():
        model.weight.add_(1.0)
    before = ema.module.weight.detach().clone()
    ema.update(model)
    assert torch.allclose(ema.module.weight, before + 0.5)
    with pytest.raises(ValueError, match="decay"):
        make_ema(model, decay=1.5)
