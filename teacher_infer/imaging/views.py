"""View geometry: the crop box and flip of every view, as stored in the label store.

Box convention (what ``boxes`` in the store mean and how both decoders use them):
``(y0, x0, h, w)`` as fractions of the decoded image *after* EXIF orientation. A view
is the region ``[x0·W, (x0+w)·W] × [y0·H, (y0+h)·H]`` resampled to the model's input
size (antialiased, filter taps may read pixels just outside the region, exactly like
``PIL.Image.resize(size, box=...)`` and DALI's ``fn.resize(roi_start, roi_end)``), then
mirrored horizontally when the view's flip is set.

- View 0 is timm's evaluation transform (resize so the short side is
  ``floor(input / crop_pct)``, then center crop) expressed as that box. Resampling the
  box gives timm's pixels up to the 8-bit rounding of the resampling passes (at most a
  grey level or two on a few pixels); the PIL decoder renders view 0 with timm's own two
  steps, so its view 0 is exactly timm's eval transform.
- Views 1..V-1 follow torchvision's ``RandomResizedCrop.get_params`` (integer pixel
  boxes, 10 tries, aspect-ratio clamp fallback) and flip with probability 1/2, drawn
  from a generator seeded by ``sha256(seed, key, view)``: the same boxes on any number of
  ranks, in any batch order, and on resume.

Boxes are quantised to the store's uint16 grid *before* anyone crops with them, and
the quantised box is kept inside the image, so replaying a stored box is exact.
Nothing here imports torch.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from labelstore import BOX_SCALE, dequantize_boxes, quantize_boxes


@dataclass(frozen=True)
class ViewSpec:
    """How the views of every image are drawn; recorded in the store's ``preprocessing``."""

    views: int
    input_size: tuple[int, int]             # (height, width) fed to the model
    crop_pct: float
    crop_mode: str = "center"               # timm eval crop mode: center | squash
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.crop_mode not in ("center", "squash"):
            raise ValueError(f"crop_mode {self.crop_mode!r} cannot be expressed as a box inside "
                             "the image (supported: center, squash)")


def eval_geometry(height: int, width: int, spec: ViewSpec) -> tuple[int, int, int, int, int, int]:
    """timm's eval transform of a ``height × width`` image in pixels: the resized size
    ``(new_h, new_w)`` and the center crop ``(top, left, crop_h, crop_w)`` inside it."""
    target_h, target_w = spec.input_size
    scale_h, scale_w = (math.floor(target_h / spec.crop_pct), math.floor(target_w / spec.crop_pct))
    if spec.crop_mode == "squash":
        new_h, new_w = scale_h, scale_w
    elif scale_h == scale_w:
        # torchvision Resize(int): short side = size, long side truncated
        if width <= height:
            new_w, new_h = scale_w, int(scale_w * height / width)
        else:
            new_h, new_w = scale_h, int(scale_h * width / height)
    else:
        # timm ResizeKeepRatio(longest=0): scale by the smaller of the two ratios
        ratio = min(height / scale_h, width / scale_w)
        new_h, new_w = round(height / ratio), round(width / ratio)
    # torchvision CenterCrop; a crop larger than the resized image is clamped to it
    crop_h, crop_w = min(target_h, new_h), min(target_w, new_w)
    top = int(round((new_h - crop_h) / 2.0))
    left = int(round((new_w - crop_w) / 2.0))
    return new_h, new_w, top, left, crop_h, crop_w


def eval_box(height: int, width: int, spec: ViewSpec) -> np.ndarray:
    """timm's eval resize + center crop of an ``height × width`` image as a fractional box."""
    new_h, new_w, top, left, crop_h, crop_w = eval_geometry(height, width, spec)
    return np.array([top / new_h, left / new_w, crop_h / new_h, crop_w / new_w])


def random_resized_crop_box(rng: np.random.Generator, height: int, width: int,
                            scale: tuple[float, float],
                            ratio: tuple[float, float]) -> np.ndarray:
    """torchvision's ``RandomResizedCrop.get_params`` on a numpy generator, as fractions."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return np.array([top / height, left / width, h / height, w / width])
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return np.array([top / height, left / width, h / height, w / width])


def view_rng(seed: int, key: str, view: int) -> np.random.Generator:
    """A generator that depends only on (seed, key, view)."""
    digest = hashlib.sha256(f"{int(seed)}\x00{key}\x00{int(view)}".encode("utf-8")).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest[:16], "little")))


def quantize_inside(boxes: np.ndarray) -> np.ndarray:
    """Fractions → the store's uint16 grid, shrinking h/w by the rounding so y0+h, x0+w <= 1."""
    grid = quantize_boxes(boxes).astype(np.int64)
    grid[..., 2] = np.clip(np.minimum(grid[..., 2], BOX_SCALE - grid[..., 0]), 1, None)
    grid[..., 3] = np.clip(np.minimum(grid[..., 3], BOX_SCALE - grid[..., 1]), 1, None)
    grid[..., 0] = np.minimum(grid[..., 0], BOX_SCALE - grid[..., 2])
    grid[..., 1] = np.minimum(grid[..., 1], BOX_SCALE - grid[..., 3])
    return grid.astype(np.uint16)


def plan_views(key: str, height: int, width: int,
               spec: ViewSpec) -> tuple[np.ndarray, np.ndarray]:
    """Quantised boxes (V, 4) uint16 and flips (V,) bool of one image of the given size."""
    boxes = np.empty((spec.views, 4), dtype=np.float64)
    flips = np.zeros(spec.views, dtype=bool)
    boxes[0] = eval_box(height, width, spec)
    for view in range(1, spec.views):
        rng = view_rng(spec.seed, key, view)
        boxes[view] = random_resized_crop_box(rng, height, width, spec.crop_scale, spec.crop_ratio)
        flips[view] = rng.uniform() < spec.flip_prob
    return quantize_inside(boxes), flips


def is_eval_box(box: np.ndarray, flip: bool, height: int, width: int, spec: ViewSpec) -> bool:
    """Whether a stored view is exactly this spec's evaluation view of a ``height × width``
    image (then it is rendered with timm's own two steps, bit-identical to its transform)."""
    planned = quantize_inside(eval_box(height, width, spec)[None])[0]
    return not bool(flip) and np.array_equal(np.asarray(box, dtype=np.uint16), planned)


@dataclass(frozen=True)
class PlannedViews:
    """Boxes and flips fixed in advance (``infer-teacher --views-from``, ``ssld verify``):
    row ``i`` is cropped with ``boxes[i]`` / ``flips[i]`` instead of views drawn here;
    rows with ``usable[i]`` false are not read and become invalid with ``reason``."""

    boxes: np.ndarray      # (N, V, 4) uint16, the store's grid
    flips: np.ndarray      # (N, V) bool
    usable: np.ndarray     # (N,) bool
    reason: str = "invalid in the reference store"


def pixel_box(box: np.ndarray, height: int, width: int) -> tuple[float, float, float, float]:
    """A stored (quantised or fractional) box as PIL's (left, upper, right, lower) in pixels."""
    y0, x0, h, w = (dequantize_boxes(box) if box.dtype == np.uint16 else box).astype(np.float64)
    return (x0 * width, y0 * height, min(x0 + w, 1.0) * width, min(y0 + h, 1.0) * height)


def separable_roi(boxes: np.ndarray) -> dict[str, np.ndarray]:
    """Stored boxes (..., 4) → relative (y, x) ROIs of a horizontal pass (all rows, the box's
    columns) and a vertical pass (the box's rows, all columns of the first pass's output)."""
    frac = dequantize_boxes(boxes).astype(np.float64)
    y0, x0 = frac[..., 0], frac[..., 1]
    y1 = np.minimum(y0 + frac[..., 2], 1.0)
    x1 = np.minimum(x0 + frac[..., 3], 1.0)
    zero, one = np.zeros_like(y0), np.ones_like(y0)
    pairs = {"x_start": (zero, x0), "x_end": (one, x1), "y_start": (y0, zero), "y_end": (y1, one)}
    return {name: np.stack(pair, axis=-1).astype(np.float32) for name, pair in pairs.items()}
