"""The teacher: model names, weights and preprocessing.

- Names: any timm name (``arch`` or ``arch.tag``) plus the PaddleClas names users know
  (docs/commands.md, "ssld infer-teacher": model and weights). timm's deprecated
  ``ig_resnext101_32x{16,32,48}d`` aliases all map to the *32x8d* weights; they are resolved
  here to the right ``fb_wsl_ig1b_ft_in1k`` tags (and 32x48d, which timm lacks, is refused).
- Weights: ``--checkpoint`` (read by :mod:`teacher_infer.runtime.checkpoint`, the reader
  training shares), ``--pretrained`` from timm's hub cache without waiting on a network,
  or seeded random weights when asked for.
- Preprocessing: ``timm.data.resolve_data_config`` of the model with the user's
  overrides; the result is recorded in the store.
"""
from __future__ import annotations

import difflib
import os
import threading
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from .runtime.checkpoint import checkpoint_classes, load_weights, sha256_file

# PaddleClas model names → timm names (matched case-insensitively).
PADDLE_NAMES = {
    "resnext101_32x8d_wsl": "resnext101_32x8d.fb_wsl_ig1b_ft_in1k",
    "resnext101_32x16d_wsl": "resnext101_32x16d.fb_wsl_ig1b_ft_in1k",
    "resnext101_32x32d_wsl": "resnext101_32x32d.fb_wsl_ig1b_ft_in1k",
    "resnet18": "resnet18", "resnet34": "resnet34", "resnet50": "resnet50",
    "resnet101": "resnet101", "resnet152": "resnet152",
    "resnet18_vd": "resnet18d", "resnet34_vd": "resnet34d", "resnet50_vd": "resnet50d",
    "resnet101_vd": "resnet101d", "resnet152_vd": "resnet152d", "resnet200_vd": "resnet200d",
    "mobilenetv3_large_x1_0": "mobilenetv3_large_100",
    "mobilenetv3_large_x0_75": "mobilenetv3_large_075",
    "mobilenetv3_small_x1_0": "mobilenetv3_small_100",
    "mobilenetv3_small_x0_75": "mobilenetv3_small_075",
    "mobilenetv2": "mobilenetv2_100", "mobilenetv2_x1_0": "mobilenetv2_100",
    "efficientnetb0": "efficientnet_b0", "efficientnetb1": "efficientnet_b1",
    "efficientnetb2": "efficientnet_b2", "efficientnetb3": "efficientnet_b3",
    "densenet121": "densenet121", "densenet161": "densenet161", "densenet169": "densenet169",
    "res2net50_26w_4s": "res2net50_26w_4s", "hrnet_w18_c": "hrnet_w18",
    "ghostnet_x1_0": "ghostnet_100", "regnetx_4gf": "regnetx_040",
    "vit_base_patch16_224": "vit_base_patch16_224",
    "deit_base_patch16_224": "deit_base_patch16_224",
    "swintransformer_base_patch4_window7_224": "swin_base_patch4_window7_224",
    # timm's own deprecated aliases, which load 32x8d weights for every width:
    "ig_resnext101_32x8d": "resnext101_32x8d.fb_wsl_ig1b_ft_in1k",
    "ig_resnext101_32x16d": "resnext101_32x16d.fb_wsl_ig1b_ft_in1k",
    "ig_resnext101_32x32d": "resnext101_32x32d.fb_wsl_ig1b_ft_in1k",
}
# Names whose timm alias loads other weights and that have no correct timm counterpart.
UNAVAILABLE = {"ig_resnext101_32x48d": "timm has no 32x48d ResNeXt (its alias loads 32x8d)",
               "resnext101_32x48d_wsl": "timm has no 32x48d ResNeXt"}
NETWORK_PROBE_SECONDS = 3.0


def resolve_model_name(name: str) -> str:
    """The timm model name to create for ``name``; ValueError listing close matches if none.

    >>> resolve_model_name("ResNet50_vd")
    'resnet50d'
    >>> resolve_model_name("resnext101_32x16d_wsl")
    'resnext101_32x16d.fb_wsl_ig1b_ft_in1k'
    """
    import timm
    from timm.models import is_model

    if name.lower() in UNAVAILABLE:
        raise ValueError(f"model {name!r} is not available: {UNAVAILABLE[name.lower()]}")
    mapped = PADDLE_NAMES.get(name.lower())
    if mapped is not None:
        return mapped
    arch, _, tag = name.partition(".")
    if is_model(arch) and not _is_deprecated(arch):
        if tag and name not in timm.list_pretrained(f"{arch}.*"):
            tags = [m.partition(".")[2] for m in timm.list_pretrained(f"{arch}.*")]
            raise ValueError(f"model {arch} has no pretrained tag {tag!r}; tags: "
                             f"{', '.join(tags) or 'none'}")
        return name
    if _is_deprecated(arch) and not tag:
        from timm.models._registry import _deprecated_models
        return _deprecated_models[arch]
    candidates = timm.list_models() + list(PADDLE_NAMES)
    lowered = {c.lower(): c for c in candidates}
    close = difflib.get_close_matches(name.lower(), list(lowered), n=5, cutoff=0.6)
    hint = f"; close matches: {', '.join(lowered[c] for c in close)}" if close else ""
    raise ValueError(f"unknown model {name!r}{hint}")


def _is_deprecated(arch: str) -> bool:
    from timm.models._registry import _deprecated_models
    return arch in _deprecated_models


def _downloadable(urls: list[str], timeout: float = NETWORK_PROBE_SECONDS) -> str | None:
    """None when one of ``urls`` answers a HEAD request with 2xx/3xx within ``timeout``
    seconds (DNS included), else why not."""
    import urllib.error
    import urllib.request

    answers: list[str | None] = []

    def probe() -> None:
        why = "no answer"
        for url in urls:
            try:
                request = urllib.request.Request(url, method="HEAD")
                with urllib.request.urlopen(request, timeout=timeout):
                    answers.append(None)
                    return
            except urllib.error.HTTPError as exc:
                why = f"HTTP {exc.code} from {url}"
            except (OSError, ValueError) as exc:
                why = f"{type(exc).__name__} for {url}"
        answers.append(why)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return answers[0] if answers else f"no answer within {timeout:.0f} s"


def cached_pretrained_file(pretrained_cfg: dict[str, Any]) -> str | None:
    """The weights file of a pretrained config in the HF hub or torch hub cache, if there."""
    hub_id = pretrained_cfg.get("hf_hub_id")
    if hub_id:
        from huggingface_hub import try_to_load_from_cache
        names = [pretrained_cfg.get("hf_hub_filename"), "model.safetensors", "pytorch_model.bin",
                 "open_clip_pytorch_model.bin"]
        for filename in filter(None, names):
            found = try_to_load_from_cache(hub_id, filename)
            if isinstance(found, str) and os.path.isfile(found):
                return found
    url = pretrained_cfg.get("url")
    if url:
        import torch
        cached = os.path.join(torch.hub.get_dir(), "checkpoints",
                              os.path.basename(urlparse(url).path))
        if os.path.isfile(cached):
            return cached
    return None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def pretrained_source(name: str) -> str | None:
    """A local weights file for timm's ``name`` (None: download, the network answered).

    Raises ValueError at once when the weights are neither cached nor reachable.
    """
    from timm.models import get_pretrained_cfg

    found = get_pretrained_cfg(name)
    cfg = found.to_dict() if found is not None else {}
    if not (cfg.get("hf_hub_id") or cfg.get("url") or cfg.get("file")):
        raise ValueError(f"timm has no pretrained weights for {name}; pass --checkpoint FILE")
    local = cfg.get("file") or cached_pretrained_file(cfg)
    if local is not None:
        return local
    if cfg.get("hf_hub_id"):
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
        urls = [f"{endpoint}/{cfg['hf_hub_id']}/resolve/main/{filename}"
                for filename in ("model.safetensors", "pytorch_model.bin")]
    else:
        urls = [cfg["url"]]
    why = "HF_HUB_OFFLINE is set" if _offline() else _downloadable(urls)
    if why is not None:
        where = cfg.get("hf_hub_id") or cfg.get("url")
        raise ValueError(f"pretrained weights for {name} ({where}) are not in the local cache "
                         f"and the network is unreachable ({why}): fetch them where there is a "
                         "network (timm.create_model(NAME, pretrained=True)) or pass "
                         "--checkpoint FILE")
    return None


@dataclass
class Teacher:
    """A model ready for inference and what the store records about it."""

    model: Any                       # torch.nn.Module in eval mode on its device
    name: str                        # resolved timm name
    num_classes: int
    data_config: dict[str, Any]      # resolved preprocessing
    record: dict[str, Any] = field(default_factory=dict)   # the store's "teacher" attribute


def _json_safe(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def load_teacher(cfg, device) -> Teacher:
    """Create the teacher of ``cfg`` (an InferConfig) on ``device`` with its weights."""
    import timm
    import torch
    from timm.data import resolve_data_config

    name = resolve_model_name(cfg.model)
    kwargs: dict[str, Any] = {"num_classes": cfg.num_classes}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}  # None = the model's default
    # Seeded so that random weights are the same on every rank and in every resumed run.
    torch.manual_seed(cfg.seed)
    record: dict[str, Any] = {"model": name, "requested": cfg.model, "checkpoint": None,
                              "checkpoint_sha256": None}
    if cfg.pretrained:
        # timm's own loader (it adapts old checkpoints and classifier sizes), pointed at the
        # cached file so that it never goes to the network for it.
        local = pretrained_source(name)
        kwargs.update(pretrained=True, pretrained_cfg_overlay=None if local is None else
                      {"file": local})
        record.update(weights="pretrained", pretrained_from=local or "download")
    try:
        model = timm.create_model(name, **kwargs)
    except Exception as exc:  # noqa: BLE001 - timm raises RuntimeError/KeyError for bad args
        raise ValueError(f"cannot create model {name}: {' '.join(str(exc).split())}") from None
    if cfg.checkpoint:
        if cfg.num_classes is None:
            # a fine-tuned teacher (e.g. a train-student checkpoint) brings its own class count
            classifier = getattr(model, "default_cfg", {}).get("classifier")
            classes = (checkpoint_classes(cfg.checkpoint, classifier)
                       if isinstance(classifier, str) else None)
            if classes is not None and classes != model.num_classes:
                model.reset_classifier(classes)
        record["checkpoint_key"] = load_weights(model, cfg.checkpoint)
        record.update(weights="checkpoint", checkpoint=os.path.abspath(cfg.checkpoint),
                      checkpoint_sha256=sha256_file(cfg.checkpoint))
    elif not cfg.pretrained:
        record.update(weights=f"random(seed={cfg.seed})")
    pretrained_cfg = {k: v for k, v in dict(model.pretrained_cfg).items()
                      if k not in ("label_names", "label_descriptions")}
    record["pretrained_cfg"] = _json_safe(pretrained_cfg)
    record["num_classes"] = int(model.num_classes)

    overrides = {"input_size": None if cfg.input_size is None else (3, cfg.input_size,
                                                                    cfg.input_size),
                 "interpolation": cfg.interpolation, "mean": cfg.mean, "std": cfg.std,
                 "crop_pct": cfg.crop_pct}
    data_config = resolve_data_config({k: v for k, v in overrides.items() if v is not None},
                                      model=model)
    model.eval().to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    return Teacher(model, name, int(model.num_classes), data_config, record)
