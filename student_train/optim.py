"""Optimizer pieces for the student trainer: parameter groups, SGD, the LR schedule, EMA.

Pure functions: nothing here runs a training step. The training loop calls
:func:`build_optimizer` once, then ``set_lr(optimizer, lr_at(step, ...))`` before every step.

The per-stage learning-rate multipliers (``lr_mult``) are PaddleClas's ``lr_mult_list``: five
values for (stem, stage 1..4), used when an SSLD-distilled backbone is fine-tuned so that its
refined early features are not destroyed (the SSLD paper's advice to lower the learning rate of
the middle layers when fine-tuning; docs/commands.md, "ssld train-student and ssld eval":
``--lr-mult``).
"""

from __future__ import annotations

import fnmatch
import math
import re
from typing import Any, Optional, Sequence

import torch
from torch import nn

__all__ = [
    "param_groups",
    "lr_at",
    "scale_lr",
    "set_lr",
    "build_optimizer",
    "make_ema",
]

_NUM_LR_GROUPS = 5  # stem + 4 stages, the length of PaddleClas's lr_mult_list


def _classifier_params(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of timm's ``model.get_classifier()`` (a module, or a tuple of them)."""
    if not hasattr(model, "get_classifier"):
        raise ValueError(
            f"{type(model).__name__} has no get_classifier(); cannot tell its classifier apart"
        )
    heads = model.get_classifier()
    heads = heads if isinstance(heads, (tuple, list)) else (heads,)
    params = [p for head in heads for p in head.parameters()]
    if not params:
        raise ValueError(
            f"{type(model).__name__}'s classifier has no parameters (num_classes=0?)"
        )
    return params


def _compile_matcher(matcher: dict) -> tuple[re.Pattern, list[re.Pattern]]:
    """The stem regex and all regexes of a timm ``group_matcher()`` dict.

    timm matches with ``re.match`` and the first entry wins; the stem entry comes first, and a
    name that matches no entry is "head" (timm gives it ordinal +inf).
    """
    stem = re.compile(matcher["stem"])
    patterns = []
    for spec in matcher.values():
        if spec is None:
            continue
        if isinstance(spec, (tuple, list)):
            patterns += [re.compile(sub[0]) for sub in spec]
        else:
            patterns.append(re.compile(spec))
    return stem, patterns


def _block_units(model: nn.Module, *, coarse: bool) -> list[list[str]]:
    """Backbone parameter names after the stem, in forward order, one list per timm group.

    ``coarse=True`` gives timm's stages (ResNet: layer1..4), ``coarse=False`` its blocks
    (MobileNetV3: blocks.0.0, blocks.1.0, ...). Stem and head names are left out.
    """
    from timm.models import group_parameters

    matcher = model.group_matcher(coarse=coarse)
    stem, patterns = _compile_matcher(matcher)
    units = group_parameters(model, matcher)  # {consecutive id: names}, sorted by timm ordinal
    blocks = []
    for _, names in sorted(units.items()):
        body = [n for n in names if not stem.match(n) and any(p.match(n) for p in patterns)]
        if body:
            blocks.append(body)
    return blocks


def _stage_index(model: nn.Module) -> dict[str, int]:
    """Map each backbone parameter name to its lr_mult index 0..4 (head names are absent).

    Two cases, both read from timm's ``group_matcher()``; anything else raises ValueError.

    - **Stem + 4 stages** (ResNet family: coarse groups stem, layer1..layer4): the stem gets
      index 0 and stage k gets index k (PaddleClas ResNet_vd: "the three conv2d before the
      residual blocks share one multiple, the four residual stages have their own").
    - **A sequence of n ≥ 5 blocks** (MobileNetV3 and other ``blocks.i.j`` nets): block i gets
      index ``min(i // (n // 5), 4)`` and the stem index 0 -- PaddleClas MobileNetV3's rule
      ``lr_idx = min(curr_stage // lr_interval, 4)`` with ``lr_interval = 15 // 5 = 3``.
      timm ``mobilenetv3_large_100`` has n = 16 blocks in order: blocks.0.0 (the depthwise-
      separable first unit), blocks.1.0-1, blocks.2.0-2, blocks.3.0-3, blocks.4.0-1,
      blocks.5.0-2 (PaddleClas's 15 residual units) then blocks.6.0, the 1x1 conv to 960
      channels (PaddleClas's ``conv_last``). 16 // 5 = 3, so: index 0 = conv_stem/bn1 +
      blocks.0.0, 1.0, 1.1; index 1 = blocks.2.*; index 2 = blocks.3.0-2; index 3 = blocks.3.3,
      4.0, 4.1; index 4 = blocks.5.* + blocks.6.0 (PaddleClas also puts conv_last in the last
      group). conv_head (1x1 to 1280) and the classifier are head (multiplier 1.0), as in
      PaddleClas. mobilenetv3_small_100 (12 blocks, 12 // 5 = 2) matches PaddleClas's
      lr_interval = 2 the same way.

    Both need a feature pyramid (``feature_info`` reductions strictly increasing): the list
    means "shallow to deep stages", which an isotropic ViT does not have (use layer decay).
    """
    name = type(model).__name__
    if not hasattr(model, "group_matcher"):
        raise ValueError(f"cannot split {name} into {_NUM_LR_GROUPS} lr_mult groups: "
                         "it has no timm group_matcher()")
    reductions = [info["reduction"] for info in getattr(model, "feature_info", [])]
    if len(reductions) < 4 or any(b <= a for a, b in zip(reductions, reductions[1:])):
        raise ValueError(
            f"cannot split {name} into {_NUM_LR_GROUPS} lr_mult groups (stem + 4 stages): its "
            f"feature_info reductions {reductions} are not a feature pyramid"
        )
    stem, _ = _compile_matcher(model.group_matcher(coarse=True))
    index = {n: 0 for n, _ in model.named_parameters() if stem.match(n)}

    stages = _block_units(model, coarse=True)
    if len(stages) == _NUM_LR_GROUPS - 1:
        for stage_number, names in enumerate(stages, start=1):
            index.update({n: stage_number for n in names})
        return index

    blocks = _block_units(model, coarse=False)
    if len(blocks) < _NUM_LR_GROUPS:
        raise ValueError(
            f"cannot split {name} into {_NUM_LR_GROUPS} lr_mult groups: it has "
            f"{len(stages)} stages and {len(blocks)} blocks after the stem"
        )
    interval = len(blocks) // _NUM_LR_GROUPS
    for block_number, names in enumerate(blocks):
        index.update({n: min(block_number // interval, _NUM_LR_GROUPS - 1) for n in names})
    return index


def param_groups(
    model: nn.Module,
    *,
    weight_decay: float,
    lr_mult: Optional[Sequence[float]] = None,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups: weight-decay exclusions and per-stage LR multipliers.

    Only parameters with ``requires_grad`` are included, each in exactly one group.

    Parameters
    ----------
    model : nn.Module
        Usually a timm model.
    weight_decay : float
        L2 decay for weights. Not applied to parameters with ``ndim <= 1`` (norm scales/shifts,
        biases: decaying them only shrinks the function's scale, as timm and PaddleClas also
        exclude them) nor to names matched by ``model.no_weight_decay()`` (fnmatch patterns,
        e.g. ViT's ``pos_embed``/``cls_token``), as timm does.
    lr_mult : sequence of 5 floats, optional
        Multipliers for (stem, stage 1..4); the head (classifier and whatever timm's
        ``group_matcher`` leaves unmatched, e.g. MobileNetV3's ``conv_head``) keeps 1.0. The
        multiplier applies to every parameter of a stage, norms included. See
        :func:`_stage_index` for how stages are found; a model that cannot be split into 5
        raises ValueError naming its class.

    Returns
    -------
    list of dict
        Groups with ``params``, ``param_names``, ``weight_decay`` and ``lr_mult``; empty groups
        are dropped. :func:`set_lr` sets each group's ``lr`` to ``base_lr * lr_mult``.
    """
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if lr_mult is not None:
        lr_mult = [float(m) for m in lr_mult]
        if len(lr_mult) != _NUM_LR_GROUPS or any(not m >= 0 for m in lr_mult):
            raise ValueError(
                f"lr_mult must be {_NUM_LR_GROUPS} non-negative numbers "
                f"(stem, stage 1..4), got {lr_mult!r}"
            )
        stage_of = _stage_index(model)
    no_decay_patterns = list(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else []

    groups: dict[tuple[float, float], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decays = param.ndim > 1 and not any(fnmatch.fnmatch(name, p) for p in no_decay_patterns)
        this_decay = float(weight_decay) if decays else 0.0
        this_mult = 1.0
        if lr_mult is not None and name in stage_of:
            this_mult = lr_mult[stage_of[name]]
        group = groups.setdefault(
            (this_mult, this_decay),
            {"params": [], "param_names": [], "weight_decay": this_decay, "lr_mult": this_mult},
        )
        group["params"].append(param)
        group["param_names"].append(name)
    return list(groups.values())


def lr_at(step: int, *, total_steps: int, warmup_steps: int, base_lr: float) -> float:
    """Learning rate at ``step``: linear warmup, then cosine decay to 0.

    PaddleClas's ``cosine_decay_warmup``: during the first ``warmup_steps`` steps the rate
    rises linearly to ``base_lr``, as ``base_lr * (step + 1) / warmup_steps`` -- PaddleClas
    starts at exactly 0, which wastes the first step, so we start one increment above it.
    From ``warmup_steps`` on it follows ``½ base_lr (1 + cos(π t))`` with
    ``t = (step - warmup_steps) / (total_steps - warmup_steps)``, reaching 0 at
    ``total_steps`` (and staying 0 after it).

    Examples
    --------
    >>> lr_at(0, total_steps=100, warmup_steps=10, base_lr=1.0)
    0.1
    >>> lr_at(10, total_steps=100, warmup_steps=10, base_lr=1.0)
    1.0
    >>> lr_at(100, total_steps=100, warmup_steps=10, base_lr=1.0)
    0.0
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps!r}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps!r}"
        )
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step!r}")
    if not base_lr >= 0:
        raise ValueError(f"base_lr must be >= 0, got {base_lr!r}")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return 0.0
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * progress))


def scale_lr(lr: float, global_batch: int, reference_batch: int = 256) -> float:
    """Linear scaling rule: ``lr * global_batch / reference_batch``.

    A learning rate tuned for ``reference_batch`` images per step is multiplied by k when the
    batch grows k-fold, keeping the per-image update size (Goyal et al. 2017, "Accurate, Large
    Minibatch SGD"; PaddleClas's configs quote lr for 256 images the same way). Pair it with a
    warmup for large k.

    >>> scale_lr(0.1, 1024)
    0.4
    """
    if global_batch <= 0:
        raise ValueError(f"global_batch must be > 0, got {global_batch!r}")
    if reference_batch <= 0:
        raise ValueError(f"reference_batch must be > 0, got {reference_batch!r}")
    return lr * global_batch / reference_batch


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's ``lr`` to ``lr * group["lr_mult"]`` (groups without one use 1.0)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
    nesterov: bool = False,
    lr_mult: Optional[Sequence[float]] = None,
    freeze_backbone: bool = False,
) -> torch.optim.SGD:
    """SGD with momentum over :func:`param_groups`, group LRs already set via :func:`set_lr`.

    Parameters
    ----------
    model : nn.Module
        The student; modified in place when ``freeze_backbone`` is true.
    lr : float
        Base learning rate (after :func:`scale_lr`); the schedule overwrites it per step.
    weight_decay, lr_mult
        See :func:`param_groups`.
    momentum : float
        SGD momentum.
    nesterov : bool
        Nesterov momentum (needs ``momentum > 0``).
    freeze_backbone : bool
        Train only ``model.get_classifier()``: every other parameter gets
        ``requires_grad=False`` and is left out of the optimizer (PaddleClas's final
        FixRes-style fine-tune "all weights except the fully connected layer are frozen").
        Batch-norm statistics still update in train mode; that is the caller's choice.
    """
    if not lr >= 0:
        raise ValueError(f"lr must be >= 0, got {lr!r}")
    if not momentum >= 0:
        raise ValueError(f"momentum must be >= 0, got {momentum!r}")
    if nesterov and momentum == 0:
        raise ValueError("nesterov=True needs momentum > 0, got momentum=0")
    if freeze_backbone:
        head = {id(p) for p in _classifier_params(model)}
        for param in model.parameters():
            param.requires_grad_(id(param) in head)
    groups = param_groups(model, weight_decay=weight_decay, lr_mult=lr_mult)
    if not groups:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    optimizer = torch.optim.SGD(
        groups, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay
    )
    set_lr(optimizer, lr)
    return optimizer


def make_ema(model: nn.Module, decay: float) -> nn.Module:
    """An exponential moving average of ``model``'s weights: timm's ``ModelEmaV3``.

    Call ``ema.update(model, step=step)`` after each optimizer step; evaluate ``ema.module``.
    The copy lives on the model's device and dtype.
    """
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"EMA decay must be in [0, 1), got {decay!r}")
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=decay)
