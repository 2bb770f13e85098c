"""The pixel operations of augmentation records, on uint8 image batches on any device.

Every kernel takes ``images``, a uint8 tensor (n, 3, H, W) on any device, and one
argument per image (a sequence of length n), and returns a new uint8 tensor. Images are
independent: an image's result does not depend on the other images of the batch, so a
worker applying a record to one view and the GPU applying it to a batch of thousands give
the same bytes.

Bit-exactness. The kernels reproduce PIL's arithmetic (what timm's RandAugment runs),
operation by operation: integer formulas where PIL uses integers (RGB→L, equalize,
posterize, solarize), float32 where PIL blends in float32 (``ImagingBlend``, the 3×3
``SMOOTH`` filter of sharpness), float64 where PIL resamples in double (the affine
transform with bilinear filter: ``affine_transform`` and ``bilinear_filter32RGB`` of
Pillow's ``Geometry.c``), with the same operation order and the same truncations. Every
step is a separate elementwise torch operation, each IEEE-rounded on its own (no fused
multiply-add, which torch only emits inside single kernels such as ``lerp``/``addcmul``,
not used here), and reductions are over integers; so CPU and CUDA give the same bytes,
and the tests find them equal to PIL's on every pixel. Arguments are computed on the host
(Python floats, :mod:`.table`), identically for both paths.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch

# PIL's SMOOTH kernel (1 1 1 / 1 5 1 / 1 1 1) / 13, divided in float32 like Pillow's _filter.
_SMOOTH_EDGE = float(np.float32(1.0) / np.float32(13.0))
_SMOOTH_CENTER = float(np.float32(5.0) / np.float32(13.0))


def _column(values: Sequence[float], images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per-image arguments as an (n, 1, 1, 1) tensor on the images' device."""
    return torch.as_tensor(np.asarray(values), dtype=dtype).to(images.device).view(-1, 1, 1, 1)


def _to_uint8(values: torch.Tensor) -> torch.Tensor:
    """Clamp to [0, 255] and truncate toward zero, as PIL's ``(UINT8)`` casts do (a float
    to uint8 conversion truncates)."""
    return values.clamp_(0, 255).to(torch.uint8)


def _apply_lut(images: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """``lut`` (n, 3, 256) of integers in [0, 255] applied per image and channel."""
    n, channels, height, width = images.shape
    flat = images.reshape(n, channels, height * width).long()
    return torch.gather(lut.long(), 2, flat).to(torch.uint8).view(n, channels, height, width)


def _histograms(images: torch.Tensor) -> torch.Tensor:
    """(n, 3, 256) int64 counts of each value per image and channel."""
    n, channels = images.shape[:2]
    offsets = torch.arange(n * channels, device=images.device).view(-1, 1) * 256
    values = images.reshape(n * channels, -1).long() + offsets
    return torch.bincount(values.flatten(), minlength=n * channels * 256).view(n, channels, 256)


# -- colour ops ---------------------------------------------------------------------------

def identity(images: torch.Tensor, args: Sequence | None = None) -> torch.Tensor:
    return images.clone()


def invert(images: torch.Tensor, args: Sequence | None = None) -> torch.Tensor:
    """``ImageOps.invert``."""
    return 255 - images


def posterize(images: torch.Tensor, bits: Sequence[int]) -> torch.Tensor:
    """``ImageOps.posterize``: keep the ``bits`` high bits (0 keeps none: black; 8 or more:
    unchanged, as timm skips the op)."""
    kept = np.clip(np.asarray(bits, dtype=np.int64), 0, 8)
    masks = (255 << (8 - kept)) & 255
    return images & _column(masks, images, torch.uint8)


def solarize(images: torch.Tensor, thresholds: Sequence[int]) -> torch.Tensor:
    """``ImageOps.solarize``: values at or above the threshold are inverted."""
    threshold = _column(thresholds, images, torch.int16)
    return torch.where(images.to(torch.int16) < threshold, images, 255 - images)


def solarize_add(images: torch.Tensor, adds: Sequence[int]) -> torch.Tensor:
    """timm's ``solarize_add``: values below 128 get ``add`` (saturating at 255)."""
    add = _column(adds, images, torch.int16)
    raised = (images.to(torch.int16) + add).clamp_(max=255).to(torch.uint8)
    return torch.where(images < 128, raised, images)


def auto_contrast(images: torch.Tensor, args: Sequence | None = None) -> torch.Tensor:
    """``ImageOps.autocontrast`` (no cutoff): each channel's [lo, hi] stretched to [0, 255]
    through PIL's float64 table ``int(v * scale + offset)``, ``scale = 255 / (hi - lo)``,
    ``offset = -lo * scale``; a channel with one value is unchanged."""
    n, channels = images.shape[:2]
    flat = images.reshape(n, channels, -1)
    low = flat.amin(-1).double()
    high = flat.amax(-1).double()
    stretch = high > low
    # a true division (``255.0 / tensor`` is computed as 255 · (1 / tensor) by torch,
    # rounded twice): PIL's table differs from it at values where v · scale is an integer
    scale = torch.full_like(low, 255.0).div_(torch.where(stretch, high - low,
                                                         torch.ones_like(low)))
    offset = (-low) * scale
    levels = torch.arange(256, dtype=torch.float64, device=images.device)
    lut = (levels * scale[..., None] + offset[..., None]).trunc_().clamp_(0, 255)
    lut = torch.where(stretch[..., None], lut, levels)
    return _apply_lut(images, lut)


def equalize(images: torch.Tensor, args: Sequence | None = None) -> torch.Tensor:
    """``ImageOps.equalize``, in integers: per channel ``step = (count - count of the
    highest value) // 255`` and ``lut[i] = (step // 2 + count below i) // step``, clipped
    to 255 as PIL's ``point`` clips; unchanged where ``step`` is 0 (one or few values)."""
    histogram = _histograms(images)
    levels = torch.arange(256, device=images.device)
    present = histogram > 0
    top_value = torch.where(present, levels, -1).amax(-1, keepdim=True)
    top_count = torch.gather(histogram, 2, top_value.clamp(min=0))[..., 0]
    step = (histogram.sum(-1) - top_count) // 255
    below = torch.cumsum(histogram, -1) - histogram
    safe_step = step.clamp(min=1)[..., None]
    lut = ((safe_step // 2 + below) // safe_step).clamp_(max=255)
    lut = torch.where((step > 0)[..., None], lut, levels)
    return _apply_lut(images, lut)


def _luminance(images: torch.Tensor) -> torch.Tensor:
    """PIL's RGB → L: ``(R·19595 + G·38470 + B·7471 + 2^15) >> 16`` (n, 1, H, W) int32."""
    rgb = images.to(torch.int32)
    return (rgb[:, 0:1] * 19595 + rgb[:, 1:2] * 38470 + rgb[:, 2:3] * 7471 + 0x8000) >> 16


def _blend(degenerate: torch.Tensor, images: torch.Tensor,
           factors: Sequence[float]) -> torch.Tensor:
    """``Image.blend(degenerate, images, factor)``, PIL's float32 arithmetic:
    ``(UINT8)(d + alpha * (x - d))`` with ``alpha`` the factor rounded to float32,
    clipped to [0, 255] (extrapolation for factors outside [0, 1])."""
    alpha = _column(np.asarray(factors, dtype=np.float32), images, torch.float32)
    start = degenerate.to(torch.float32)
    # integers are exact in float32: the difference equals PIL's int difference converted
    return _to_uint8(images.to(torch.float32).sub_(start).mul_(alpha).add_(start))


def color(images: torch.Tensor, factors: Sequence[float]) -> torch.Tensor:
    """``ImageEnhance.Color``: blend with the image's grey version."""
    return _blend(_luminance(images).expand_as(images), images, factors)


def contrast(images: torch.Tensor, factors: Sequence[float]) -> torch.Tensor:
    """``ImageEnhance.Contrast``: blend with a flat image of the mean grey level,
    ``int(mean + 0.5)`` with the mean in float64 (``ImageStat``)."""
    grey = _luminance(images)
    count = grey[0].numel()
    mean = (grey.reshape(len(images), -1).sum(-1).double() / count + 0.5).floor()
    degenerate = mean.to(torch.int32).view(-1, 1, 1, 1).expand_as(images)
    return _blend(degenerate, images, factors)


def brightness(images: torch.Tensor, factors: Sequence[float]) -> torch.Tensor:
    """``ImageEnhance.Brightness``: blend with black."""
    return _blend(torch.zeros_like(images), images, factors)


def _smooth(images: torch.Tensor) -> torch.Tensor:
    """PIL's ``ImageFilter.SMOOTH`` (``ImagingFilter3x3``): float32, rows summed bottom
    to top as Pillow does, +0.5 and truncated; the one-pixel border is copied."""
    out = images.clone()
    if images.shape[-1] < 3 or images.shape[-2] < 3:
        return out
    pixels = images.to(torch.float32)

    def row(rows: torch.Tensor, centre: float) -> torch.Tensor:
        return ((rows[..., :-2] * _SMOOTH_EDGE + rows[..., 1:-1] * centre)
                + rows[..., 2:] * _SMOOTH_EDGE)

    total = 0.5 + row(pixels[..., 2:, :], _SMOOTH_EDGE)
    total = total + row(pixels[..., 1:-1, :], _SMOOTH_CENTER)
    total = total + row(pixels[..., :-2, :], _SMOOTH_EDGE)
    out[..., 1:-1, 1:-1] = _to_uint8(total)
    return out


def sharpness(images: torch.Tensor, factors: Sequence[float]) -> torch.Tensor:
    """``ImageEnhance.Sharpness``: blend with the SMOOTH-filtered image."""
    return _blend(_smooth(images), images, factors)


# -- geometric ops --------------------------------------------------------------------------

def _rotation_matrix(degrees: float, height: int, width: int) -> tuple[float, ...] | None:
    """PIL's ``Image.rotate`` inverse matrix about the centre, None where PIL copies
    (a multiple of 360°). Table v1 levels stay below 40°, so PIL's other shortcuts (90°,
    180°, 270° by transposition) never apply."""
    angle = degrees % 360.0
    if angle == 0:
        return None
    theta = -math.radians(angle)
    a, b = round(math.cos(theta), 15), round(math.sin(theta), 15)
    d, e = round(-math.sin(theta), 15), round(math.cos(theta), 15)
    centre_x, centre_y = width / 2, height / 2
    # PIL: the translation is the matrix applied to -centre (with c = f = 0.0), + centre
    c = a * -centre_x + b * -centre_y + 0.0 + centre_x
    f = d * -centre_x + e * -centre_y + 0.0 + centre_y
    return (a, b, c, d, e, f)


def _affine(images: torch.Tensor, matrices: list[tuple[float, ...] | None],
            fill: Sequence[int]) -> torch.Tensor:
    """PIL's ``Image.transform(size, AFFINE, matrix, BILINEAR, fillcolor=fill)`` per image
    (None: unchanged). Output pixel (x, y) samples the input at
    ``(a(x+½) + b(y+½) + c, d(x+½) + e(y+½) + f)``; outside the image it is ``fill``;
    inside, bilinear between the four neighbours (edge-clamped) in float64, truncated."""
    todo = [i for i, matrix in enumerate(matrices) if matrix is not None]
    if not todo:
        return images.clone()
    device = images.device
    every = len(todo) == len(images)
    index = None if every else torch.as_tensor(todo).to(device)
    n, channels, height, width = len(todo), images.shape[1], images.shape[2], images.shape[3]
    coefficients = torch.tensor([matrices[i] for i in todo], dtype=torch.float64).to(device)
    a, b, c, d, e, f = (coefficients[:, k].view(n, 1, 1) for k in range(6))
    xs = (torch.arange(width, dtype=torch.float64, device=device) + 0.5).view(1, 1, width)
    ys = (torch.arange(height, dtype=torch.float64, device=device) + 0.5).view(1, height, 1)
    x_in = (a * xs + b * ys).add_(c)   # (n, H, W), the rounding steps of Geometry.c
    y_in = (d * xs + e * ys).add_(f)
    inside = (x_in >= 0) & (x_in < width) & (y_in >= 0) & (y_in < height)
    x_in.sub_(0.5)
    y_in.sub_(0.5)
    x_floor, y_floor = x_in.floor(), y_in.floor()
    dx, dy = x_in.sub_(x_floor).unsqueeze(1), y_in.sub_(y_floor).unsqueeze(1)
    x0 = x_floor.long()
    x1 = (x0 + 1).clamp_(0, width - 1)
    x0.clamp_(0, width - 1)
    # PIL reads row y + 1 only inside the image and reuses row y's value otherwise; the
    # clamped row y + 1 is then row y itself, so clamping gives the same value.
    y0 = y_floor.long()
    y1 = (y0 + 1).clamp_(0, height - 1).mul_(width)
    y0.clamp_(0, height - 1).mul_(width)
    # Integers up to 255 are exact in float64: differences of gathered values equal PIL's
    # integer differences converted to double.
    source = images if every else images[index]
    pixels = source.reshape(n, channels, height * width).to(torch.float64)

    def corner(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        at = (rows + cols).view(n, 1, -1).expand(n, channels, -1)
        return torch.gather(pixels, 2, at).view(n, channels, height, width)

    def lerp(left: torch.Tensor, right: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # PIL's BILINEAR(v, a, b, d): a + (b - a) * d
        return right.sub_(left).mul_(weight).add_(left)

    top = lerp(corner(y0, x0), corner(y0, x1), dx)
    bottom = lerp(corner(y1, x0), corner(y1, x1), dx)
    value = lerp(top, bottom, dy).to(torch.uint8)  # in [0, 255]: the cast truncates, as PIL's
    fill_values = torch.as_tensor(list(fill), dtype=torch.uint8).to(device).view(1, -1, 1, 1)
    warped = torch.where(inside.unsqueeze(1), value, fill_values)
    if every:
        return warped
    out = images.clone()
    out[index] = warped
    return out


def rotate(images: torch.Tensor, degrees: Sequence[float], fill: Sequence[int]) -> torch.Tensor:
    """``Image.rotate(degrees, BILINEAR, fillcolor=fill)`` (counter-clockwise)."""
    height, width = images.shape[-2:]
    return _affine(images, [_rotation_matrix(float(v), height, width) for v in degrees], fill)


def shear_x(images: torch.Tensor, factors: Sequence[float], fill: Sequence[int]) -> torch.Tensor:
    """timm's ``shear_x``: the affine matrix (1, factor, 0, 0, 1, 0)."""
    return _affine(images, [(1.0, float(v), 0.0, 0.0, 1.0, 0.0) for v in factors], fill)


def shear_y(images: torch.Tensor, factors: Sequence[float], fill: Sequence[int]) -> torch.Tensor:
    """timm's ``shear_y``: the affine matrix (1, 0, 0, factor, 1, 0)."""
    return _affine(images, [(1.0, 0.0, 0.0, float(v), 1.0, 0.0) for v in factors], fill)


def translate_x(images: torch.Tensor, fractions: Sequence[float],
                fill: Sequence[int]) -> torch.Tensor:
    """timm's ``translate_x_rel``: shift by ``fraction · W`` pixels (1, 0, fW, 0, 1, 0)."""
    width = images.shape[-1]
    return _affine(images, [(1.0, 0.0, float(v) * width, 0.0, 1.0, 0.0) for v in fractions],
                   fill)


def translate_y(images: torch.Tensor, fractions: Sequence[float],
                fill: Sequence[int]) -> torch.Tensor:
    """timm's ``translate_y_rel``: shift by ``fraction · H`` pixels (1, 0, 0, 0, 1, fH)."""
    height = images.shape[-2]
    return _affine(images, [(1.0, 0.0, 0.0, 0.0, 1.0, float(v) * height) for v in fractions],
                   fill)


# kernel name (table.Op.kernel) -> function(images, args) or function(images, args, fill)
COLOUR_KERNELS: dict[str, Callable] = {
    "identity": identity, "invert": invert, "posterize": posterize, "solarize": solarize,
    "solarize_add": solarize_add, "auto_contrast": auto_contrast, "equalize": equalize,
    "color": color, "contrast": contrast, "brightness": brightness, "sharpness": sharpness,
}
GEOMETRIC_KERNELS: dict[str, Callable] = {
    "rotate": rotate, "shear_x": shear_x, "shear_y": shear_y, "translate_x": translate_x,
    "translate_y": translate_y,
}


# Images per kernel call on a CPU: a batch's float64 temporaries (38 MB per 32 views at
# 224 px) would leave the cache and make a batch several times slower per view than one view.
CPU_CHUNK = 4


def _in_chunks(function: Callable, images: torch.Tensor, *per_image: Sequence) -> torch.Tensor:
    """``function(images, *per_image)``, on a CPU ``CPU_CHUNK`` images at a time (images are
    independent, so the bytes are the same)."""
    if images.device.type != "cpu" or len(images) <= CPU_CHUNK:
        return function(images, *per_image)
    return torch.cat([function(images[i:i + CPU_CHUNK], *(part[i:i + CPU_CHUNK]
                                                          for part in per_image))
                      for i in range(0, len(images), CPU_CHUNK)])


def run_kernel(name: str, images: torch.Tensor, args: Sequence,
               fill: Sequence[int]) -> torch.Tensor:
    """Kernel ``name`` on ``images`` with one argument per image (geometric ops fill the
    uncovered area with ``fill``)."""
    if name in GEOMETRIC_KERNELS:
        return _in_chunks(lambda part, part_args: GEOMETRIC_KERNELS[name](part, part_args, fill),
                          images, list(args))
    return _in_chunks(COLOUR_KERNELS[name], images, list(args))


# -- erasing and mixing ----------------------------------------------------------------------

def grid_span(start: int, length: int, size: int) -> tuple[int, int]:
    """A box side on the records' /255 grid → pixel [begin, end) on a side of ``size``
    pixels: each edge rounded to the nearest pixel (half up), in integers."""
    begin = (2 * int(start) * size + 255) // 510
    end = (2 * (int(start) + int(length)) * size + 255) // 510
    return begin, end


def pixel_rect(box: Sequence[int], height: int, width: int) -> tuple[int, int, int, int]:
    """A (y0, x0, h, w) grid box → pixel (top, bottom, left, right)."""
    top, bottom = grid_span(box[0], box[2], height)
    left, right = grid_span(box[1], box[3], width)
    return top, bottom, left, right


def erase(images: torch.Tensor, boxes: np.ndarray, fill: Sequence[int]) -> torch.Tensor:
    """Random erasing: each image's boxes (n, E, 4) on the /255 grid (h or w 0: no box)
    set to the constant ``fill``."""
    out = images.clone()
    height, width = images.shape[-2:]
    fill_values = torch.as_tensor(list(fill), dtype=torch.uint8).to(images.device).view(-1, 1, 1)
    for i, j in zip(*np.nonzero((boxes[..., 2] > 0) & (boxes[..., 3] > 0))):
        top, bottom, left, right = pixel_rect(boxes[i, j], height, width)
        out[i, :, top:bottom, left:right] = fill_values
    return out


def mixup(images: torch.Tensor, partners: torch.Tensor, lambdas: Sequence[int]) -> torch.Tensor:
    """MixUp of uint8 images: ``λ·x + (1 − λ)·partner`` with ``λ = L / 255``, rounded half
    up, in integers: ``(2·(x·L + p·(255 − L)) + 255) // 510``."""
    return _in_chunks(_mixup, images, partners, np.asarray(lambdas))


def _mixup(images: torch.Tensor, partners: torch.Tensor, lambdas: np.ndarray) -> torch.Tensor:
    weight = _column(lambdas.astype(np.int32), images, torch.int32)
    total = images.to(torch.int32) * weight + partners.to(torch.int32) * (255 - weight)
    return ((2 * total + 255) // 510).to(torch.uint8)


def cutmix(images: torch.Tensor, partners: torch.Tensor, boxes: np.ndarray) -> torch.Tensor:
    """CutMix: each image's box (n, 4) on the /255 grid replaced by the partner's pixels."""
    out = images.clone()
    height, width = images.shape[-2:]
    for i, box in enumerate(boxes):
        top, bottom, left, right = pixel_rect(box, height, width)
        out[i, :, top:bottom, left:right] = partners[i, :, top:bottom, left:right]
    return out
