"""Student and online-teacher models: names, weights and preprocessing come from teacher_infer.

Model names go through ``teacher_infer.resolve_model_name`` (timm names plus the PaddleClas
names of docs/commands.md, "ssld infer-teacher") and weights through the shared checkpoint reader
(:mod:`teacher_infer.runtime`: state dicts in .pt/.pth/.safetensors, training checkpoints,
``module.`` prefixes), so ``--init``, ``--teacher-checkpoint`` and ``ssld eval`` accept exactly
what ``infer-teacher --checkpoint`` accepts.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from torch import nn

from teacher_infer import resolve_model_name
from teacher_infer.runtime import checkpoint_classes, load_weights, read_state_dict, strip_prefixes


def data_config_for(model_name: str, input_size: Optional[int] = None) -> dict[str, Any]:
    """Preprocessing of a timm model (its pretrained config) at an optional input size.

    Returns ``input_size`` (an int: square inputs), ``interpolation``, ``mean``, ``std``,
    ``crop_pct`` and ``crop_mode``, all JSON-safe.
    """
    from timm.data import resolve_data_config
    from timm.models import get_pretrained_cfg

    found = get_pretrained_cfg(model_name)
    pretrained = found.to_dict() if found is not None else {}
    overrides = {} if input_size is None else {"input_size": (3, input_size, input_size)}
    resolved = resolve_data_config(overrides, pretrained_cfg=pretrained)
    _, height, width = resolved["input_size"]
    if height != width:
        raise ValueError(f"{model_name} has a non-square input size {height}x{width}; pass "
                         "--input-size N")
    return {"input_size": int(height), "interpolation": resolved["interpolation"],
            "mean": [float(v) for v in resolved["mean"]],
            "std": [float(v) for v in resolved["std"]],
            "crop_pct": float(resolved["crop_pct"]),
            "crop_mode": resolved.get("crop_mode", "center")}


def student_data_config(cfg) -> tuple[str, dict[str, Any]]:
    """(timm name, preprocessing) of the configured student."""
    name = resolve_model_name(cfg.student)
    return name, data_config_for(name, cfg.input_size)


def create(model_name: str, num_classes: int) -> nn.Module:
    """A timm model with random weights (the caller seeds torch) and ``num_classes`` outputs."""
    import timm

    try:
        return timm.create_model(model_name, pretrained=False, num_classes=num_classes)
    except Exception as exc:  # timm raises RuntimeError/KeyError/TypeError for bad arguments
        raise ValueError(f"cannot create model {model_name}: {' '.join(str(exc).split())}") \
            from None


def build_student(model_name: str, num_classes: int, *, init: Optional[str],
                  log: logging.Logger) -> nn.Module:
    """The student; with ``init``, its weights from a checkpoint (the fine-tune stage).

    A classifier of a different size in ``init`` (an ImageNet student fine-tuned on another
    label set) is left at its random initialisation and logged; any other mismatch is an error.
    """
    model = create(model_name, num_classes)
    if init is None:
        return model
    state, _ = read_state_dict(init)
    state = strip_prefixes(state)
    own = model.state_dict()
    head = _classifier_prefixes(model)
    skipped = [k for k, v in state.items() if k in own and v.shape != own[k].shape
               and k.startswith(head)]
    for key in skipped:
        del state[key]
    # Shapes first: torch's load_state_dict raises a many-line RuntimeError on a mismatch
    # (a checkpoint of another architecture), even with strict=False.
    bad = [k for k, v in state.items() if k in own and v.shape != own[k].shape]
    if bad:
        raise ValueError(f"--init {init} does not fit {model_name}: {bad[0]} has shape "
                         f"{tuple(state[bad[0]].shape)}, the model expects "
                         f"{tuple(own[bad[0]].shape)} (a checkpoint of another architecture?)")
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in skipped]
    if missing or result.unexpected_keys:
        raise ValueError(f"--init {init} does not fit {model_name}: missing {missing[:3]}, "
                         f"unexpected {list(result.unexpected_keys)[:3]}")
    if skipped:
        log.info(f"--init {init}: its classifier has another class count; the {num_classes}-class "
                 "classifier starts from random weights")
    return model


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    heads = model.pretrained_cfg.get("classifier", "fc") if hasattr(model, "pretrained_cfg") \
        else "fc"
    heads = heads if isinstance(heads, (tuple, list)) else (heads,)
    return tuple(f"{h}." for h in heads)


class OnlineTeacher(nn.Module):
    """A frozen teacher run on the student's batch: returns its probabilities (float32).

    The batch arrives normalised with the student's mean/std; when the teacher was trained
    with other statistics the input is re-normalised (an affine map per channel), so both
    see the same crop of the same pixels.
    """

    def __init__(self, model: nn.Module, student_mean_std, teacher_mean_std):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        (s_mean, s_std), (t_mean, t_std) = student_mean_std, teacher_mean_std
        to = lambda v: torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1)  # noqa: E731
        # x_t = (x_s·σ_s + μ_s − μ_t) / σ_t = x_s·scale + shift
        self.register_buffer("scale", to(s_std) / to(t_std))
        self.register_buffer("shift", (to(s_mean) - to(t_mean)) / to(t_std))
        self.same = list(s_mean) == list(t_mean) and list(s_std) == list(t_std)

    def train(self, mode: bool = True) -> "OnlineTeacher":
        return super().train(False)  # always eval mode: BN statistics and dropout fixed

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not self.same:
            images = images * self.scale.to(images.dtype) + self.shift.to(images.dtype)
        return self.model(images).float().softmax(dim=-1)


def load_model(model_name: str, checkpoint: str) -> nn.Module:
    """A timm model with the class count and weights of ``checkpoint`` (EMA preferred)."""
    from timm.models import get_pretrained_cfg

    found = get_pretrained_cfg(model_name)
    heads = (found.to_dict() if found is not None else {}).get("classifier", "fc")
    heads = heads if isinstance(heads, (list, tuple)) else (heads,)
    classes = checkpoint_classes(checkpoint, heads)
    if classes is None:
        raise ValueError(f"checkpoint {checkpoint} has no classifier weight {heads[0]}.weight "
                         f"for {model_name}: is it a checkpoint of this model?")
    model = create(model_name, classes)
    load_weights(model, checkpoint)
    return model


def build_teacher(name: str, checkpoint: str, *, student_mean_std, device: torch.device,
                  channels_last: bool) -> OnlineTeacher:
    """The online teacher of ``--teacher NAME --teacher-checkpoint FILE``."""
    model_name = resolve_model_name(name)
    teacher = OnlineTeacher(load_model(model_name, checkpoint), student_mean_std,
                            _mean_std(data_config_for(model_name)))
    teacher.to(device)
    if channels_last:
        teacher.to(memory_format=torch.channels_last)
    return teacher


def _mean_std(config: dict[str, Any]) -> tuple:
    return config["mean"], config["std"]
