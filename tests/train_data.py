"""Tiny data for the trainer's tests: generated images and label stores written directly
with ``labelstore.create/write`` (no teacher run needed).

Images are class-coloured with noise and sizes that vary, so that boxes in fractions map to
different pixel regions and a tiny model can learn something in a few steps.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

import labelstore
from teacher_infer.imaging import ViewSpec, plan_views

PALETTE = np.array([[220, 40, 40], [40, 200, 60], [50, 70, 230], [230, 210, 40],
                    [200, 60, 220], [40, 220, 220], [120, 120, 120], [250, 150, 30]])


def make_images(root: str, *, n: int, classes: int, seed: int = 0, folders: bool = True,
                prefix: str = "img") -> tuple[list[str], np.ndarray]:
    """Write ``n`` PNGs under ``root`` (in class folders ``c0..`` when ``folders``).

    Returns (keys relative to root, labels).
    """
    rng = np.random.default_rng(seed)
    keys, labels = [], rng.integers(0, classes, n)
    for i, label in enumerate(labels):
        height, width = int(rng.integers(36, 56)), int(rng.integers(36, 64))
        base = PALETTE[label % len(PALETTE)] * (0.6 + 0.4 * (label // len(PALETTE) % 2))
        pixels = base + rng.normal(0, 40, (height, width, 3))
        # a bright stripe whose position depends on the class: not a flat colour
        col = int(width * (label + 1) / (classes + 1))
        pixels[:, max(0, col - 2):col + 2] = 255
        key = f"c{label}/{prefix}{i}.png" if folders else f"{prefix}{i}.png"
        os.makedirs(os.path.dirname(os.path.join(root, key)), exist_ok=True)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(os.path.join(root, key))
        keys.append(key)
    return keys, labels.astype(np.int64)


def teacher_rows(labels: np.ndarray, *, classes: int, views: int, topk: int, seed: int = 0,
                 confidence: float = 0.7) -> tuple[np.ndarray, np.ndarray]:
    """Teacher-like (n, V, k) indices and probs: the true class first with ``confidence``
    (a random class where the label is -1), then random other classes."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    indices = np.zeros((n, views, topk), dtype=np.int64)
    probs = np.zeros((n, views, topk), dtype=np.float64)
    for i in range(n):
        for v in range(views):
            first = labels[i] if labels[i] >= 0 else rng.integers(classes)
            others = rng.permutation([c for c in range(classes) if c != first])[:topk - 1]
            indices[i, v] = [first, *others]
            rest = rng.dirichlet(np.ones(topk)) * (1 - confidence)
            probs[i, v] = [confidence + rest[0], *rest[1:]]
            probs[i, v] *= 0.98  # leave a residual outside the top-k
    return indices, probs


def make_store(path: str, root: str, keys: list[str], labels: np.ndarray, *, classes: int,
               views: int = 1, topk: int = 3, seed: int = 0, invalid=(), input_size: int = 32,
               complete: bool = True, chunk_rows: int = 64,
               class_names: list[str] | None = None) -> dict:
    """A complete label store over images under ``root`` with view boxes as infer-teacher
    plans them (view 0 = eval crop, others RandomResizedCrop + flip). Returns its arrays."""
    spec = ViewSpec(views=views, input_size=(input_size, input_size), crop_pct=0.875, seed=seed)
    boxes = np.zeros((len(keys), views, 4), dtype=np.uint16)
    flips = np.zeros((len(keys), views), dtype=bool)
    for i, key in enumerate(keys):
        with Image.open(os.path.join(root, key)) as image:
            boxes[i], flips[i] = plan_views(key, image.height, image.width, spec)
    indices, probs = teacher_rows(labels, classes=classes, views=views, topk=topk, seed=seed)
    valid = np.ones(len(keys), dtype=bool)
    valid[list(invalid)] = False
    writer = labelstore.create(path, keys=keys, num_classes=classes, topk=topk, views=views,
                               labels=labels, chunk_rows=chunk_rows,
                               attrs={"dataset": {"root": os.path.abspath(root)},
                                      "teacher": {"model": "synthetic"},
                                      "class_names": class_names})
    stop = len(keys) if complete else min(chunk_rows, len(keys) - 1)
    writer.write(0, indices[:stop], probs[:stop],
                 boxes=boxes[:stop], flips=flips[:stop],
                 valid=valid[:stop])
    writer.close()
    return {"indices": indices, "probs": probs, "boxes": boxes, "flips": flips, "valid": valid}
