"""Reading model weights: the one checkpoint reader of the teacher pass, training and eval.

Accepted: a state dict in ``.safetensors``/``.pt``/``.pth``, or a training checkpoint holding
one under ``state_dict_ema``/``model_ema``/``state_dict``/``model``... (EMA preferred, as
timm's ``load_checkpoint``), with DDP's ``module.`` and torch.compile's ``_orig_mod.``
prefixes stripped. ``--checkpoint``, ``--init``, ``--teacher-checkpoint`` and ``ssld eval``
all read through here, so they accept the same files.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Sequence

# Keys under which training checkpoints keep the weights, most preferred first (EMA first, as
# timm's load_checkpoint does).
CHECKPOINT_KEYS = ("state_dict_ema", "model_ema", "ema", "state_dict", "model", "module", "net")
STRIPPED_PREFIXES = ("module.", "_orig_mod.")


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def read_state_dict(path: str) -> tuple[dict[str, Any], str | None]:
    """(state dict, key it was found under) from a .safetensors / .pth / .pt file."""
    import torch

    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        try:
            return load_file(path, device="cpu"), None
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"cannot read safetensors checkpoint {path}: {exc}") from None
    import argparse
    try:
        # weights_only: no arbitrary code from a pickle; argparse.Namespace is what timm's and
        # many training scripts store next to the weights.
        with torch.serialization.safe_globals([argparse.Namespace]):
            blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        message = " ".join(str(exc).split())[:300]
        raise ValueError(f"cannot read checkpoint {path} as a weights-only torch file: "
                         f"{message}") from None
    if not isinstance(blob, dict):
        raise ValueError(f"checkpoint {path} holds a {type(blob).__name__}, not a state dict")
    found = None
    for key in CHECKPOINT_KEYS:
        if isinstance(blob.get(key), dict) and blob[key]:
            blob, found = blob[key], key
            break
    if hasattr(blob, "state_dict") and not isinstance(blob, dict):
        blob = blob.state_dict()
    if not blob or not all(isinstance(v, torch.Tensor) for v in blob.values()):
        keys = ", ".join(list(blob)[:6])
        raise ValueError(f"checkpoint {path} has no state dict (top-level keys: {keys}; "
                         f"looked under {', '.join(CHECKPOINT_KEYS)})")
    return blob, found


def strip_prefixes(state: dict[str, Any]) -> dict[str, Any]:
    """Drop DDP's ``module.`` and torch.compile's ``_orig_mod.`` when every key has one."""
    changed = True
    while changed and state:
        changed = False
        for prefix in STRIPPED_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


def load_weights(model, path: str) -> str | None:
    """Load a checkpoint strictly into ``model``; ValueError naming what does not fit."""
    state, found = read_state_dict(path)
    state = strip_prefixes(state)
    own = model.state_dict()
    shapes = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if shapes:
        key = shapes[0]
        hint = ""
        classifier = model.default_cfg.get("classifier") if hasattr(model, "default_cfg") else None
        if classifier and key.startswith(str(classifier)):
            hint = f" (the checkpoint has {state[key].shape[0]} classes: pass --num-classes " \
                   f"{state[key].shape[0]})"
        raise ValueError(f"checkpoint {path} does not fit the model: {key} has shape "
                         f"{tuple(state[key].shape)}, the model expects {tuple(own[key].shape)}"
                         f"{hint}")
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not fit the model: {len(missing)} missing "
                         f"key(s) (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                         f"(e.g. {unexpected[:3]})")
    model.load_state_dict(state, strict=True)
    return found



def saved_entries(path: str) -> dict[str, Any] | None:
    """The top-level dict of a torch checkpoint, memory-mapped (tensors are not read), or
    None for a file that is not one (safetensors, other formats: the weights reader reports
    what is wrong with them)."""
    import torch

    if path.endswith(".safetensors") or not os.path.isfile(path):
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - not a zip-format torch file
        return None
    return blob if isinstance(blob, dict) else None


def saved_class_names(path: str | None, num_classes: int) -> list[str] | None:
    """The names of the ``num_classes`` classes a checkpoint records (``class_names``:
    train-student writes those of the data it trained on), or None when it records none —
    or another number of them (a classifier replaced since: they do not apply)."""
    names = (saved_entries(path) or {}).get("class_names") if path else None
    if (isinstance(names, (list, tuple)) and len(names) == num_classes
            and all(isinstance(n, str) for n in names)):
        return list(names)
    return None


def checkpoint_classes(path: str, heads: str | Sequence[str]) -> int | None:
    """Rows of the first classifier weight ``{head}.weight`` the checkpoint holds — its class
    count — or None when it holds none of ``heads``."""
    state = strip_prefixes(read_state_dict(path)[0])
    for head in (heads,) if isinstance(heads, str) else heads:
        weight = state.get(f"{head}.weight")
        if weight is not None:
            return int(weight.shape[0])
    return None
