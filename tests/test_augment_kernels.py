"""The pixels of augmentation records (``teacher_infer.imaging.augment``): every op equals
timm's own RandAugment op on PIL at several magnitudes and both signs, erasing and CutMix
boxes equal NumPy slicing, MixUp equals a float64 blend, and a view gives the same bytes
alone, inside a batch in any order, and on any device."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from teacher_infer.imaging.augment import ViewRecords, augment_views, mix_views, pixel_rect
from teacher_infer.imaging.augment.table import OPS_V1, RAND_INCREASING_OPS, RAND_OPS

timm_aa = pytest.importorskip("timm.data.auto_augment")

FILL = (124, 116, 104)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def textured(height: int, width: int, seed: int) -> np.ndarray:
    """An RGB image with gradients, edges, flat areas and noise (H, W, 3) uint8."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([x * 255 // max(width - 1, 1), y * 200 // max(height - 1, 1),
                      ((x // 7 + y // 5) % 2) * 180 + 30], axis=-1).astype(np.int64)
    image[height // 3: height // 2, width // 4: width // 2] = (250, 20, 90)  # a flat patch
    image += rng.integers(-25, 26, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


IMAGES = [textured(45, 64, 0), textured(64, 45, 1), textured(33, 33, 2)]


def as_tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def as_arrays(pixels: torch.Tensor) -> list[np.ndarray]:
    return [view.permute(1, 2, 0).cpu().numpy() for view in pixels]


def one_op(op_name: str, level: int, count: int = 1, dims_op: int = 1) -> ViewRecords:
    records = ViewRecords.empty((count,), {"op": dims_op})
    records.ops[:, 0] = [op.name for op in OPS_V1].index(op_name)
    records.levels[:, 0] = level
    return records


def timm_op(name: str, image: np.ndarray, magnitude: float, negative: bool,
            monkeypatch) -> np.ndarray:
    """timm's AugmentOp body at this magnitude (no noise, always applied), its random sign
    forced, bilinear resampling: the reference the stored record must reproduce."""
    monkeypatch.setattr(random, "random", lambda: 1.0 if negative else 0.0)
    hparams = {"translate_const": 250, "img_mean": FILL}
    level_fn = timm_aa.LEVEL_TO_ARG[name]
    args = level_fn(magnitude, hparams) if level_fn is not None else ()
    if name.startswith("Posterize") and args[0] == 0:
        # Pillow >= 11 refuses posterize(img, 0) (timm's op then fails); keeping 0 bits is 0
        return np.zeros_like(image)
    out = timm_aa.NAME_TO_OP[name](Image.fromarray(image), *args, fillcolor=FILL,
                                   resample=Image.Resampling.BILINEAR)
    return np.asarray(out)


SIGNED = [op.name for op in OPS_V1 if op.signed]
CASES = [(name, level) for name in sorted(set(RAND_OPS) | set(RAND_INCREASING_OPS))
         for level in ((0, 13, 57, 90, 100, 120) if name not in SIGNED
                       else (0, 13, -13, 57, -90, 100, -120))]


@pytest.mark.parametrize("name,level", CASES)
def test_each_op_equals_timm_on_pil(name, level, monkeypatch):
    """A stored (op, level) record replays timm's op with that magnitude and sign on every
    pixel: same argument formula (table), same PIL arithmetic (kernels)."""
    for image in IMAGES:
        got = as_arrays(augment_views(as_tensor([image]), one_op(name, level), FILL))[0]
        expected = timm_op(name, image, abs(level) / 10, level < 0, monkeypatch)
        np.testing.assert_array_equal(got, expected, err_msg=f"{name} level {level}")


def test_ops_change_pixels():
    """A guard against a reference and a kernel that agree by doing nothing: at level 90
    every op but Identity changes the textured image."""
    pixels = as_tensor(IMAGES[:1])
    for op in OPS_V1[1:]:
        level = 90 if op.arg is not None else 0
        out = augment_views(pixels, one_op(op.name, level), FILL)
        assert not torch.equal(out, pixels), op.name


def test_posterize_and_solarize_against_numpy():
    image = IMAGES[0].astype(np.int64)
    for level, bits in ((0, 0), (24, 0), (25, 1), (50, 2), (99, 3), (100, 4)):
        out = as_arrays(augment_views(as_tensor(IMAGES[:1]), one_op("Posterize", level), FILL))
        mask = (255 << (8 - bits)) & 255
        np.testing.assert_array_equal(out[0], image & mask)
    for level in (0, 10, 50, 100):
        threshold = min(256, int(level / 100 * 256))
        out = as_arrays(augment_views(as_tensor(IMAGES[:1]), one_op("Solarize", level), FILL))
        np.testing.assert_array_equal(out[0], np.where(image < threshold, image, 255 - image))


def test_histogram_ops_on_degenerate_images(monkeypatch):
    """Flat and two-valued channels (PIL's shortcuts: nothing to stretch or equalise, and
    equalize tables above 255 clipped) match timm/PIL too."""
    flat = np.full((20, 30, 3), 77, np.uint8)
    two = np.zeros((1, 510, 3), np.uint8)
    two[0, 509:] = 255
    two[0, :100] = 7
    for image in (flat, two):
        for name in ("AutoContrast", "Equalize"):
            out = as_arrays(augment_views(as_tensor([image]), one_op(name, 0), FILL))
            np.testing.assert_array_equal(out[0], timm_op(name, image, 0, False, monkeypatch))


def test_erase_boxes_equal_numpy_slicing():
    rng = np.random.default_rng(3)
    for height, width in ((45, 64), (224, 224), (7, 300)):
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        records = ViewRecords.empty((1,), {"erase": 2})
        records.erase_boxes[0] = [[10, 200, 100, 55], [0, 0, 255, 1]]
        out = as_arrays(augment_views(as_tensor([image]), records, FILL))[0]
        expected = image.copy()
        for y0, x0, h, w in records.erase_boxes[0].astype(np.float64):
            top, bottom = (math.floor(v / 255 * height + 0.5) for v in (y0, y0 + h))
            left, right = (math.floor(v / 255 * width + 0.5) for v in (x0, x0 + w))
            expected[top:bottom, left:right] = FILL
        np.testing.assert_array_equal(out, expected)
    assert pixel_rect((0, 0, 255, 255), 224, 224) == (0, 224, 0, 224)


def mixed_records(lambdas, boxes) -> ViewRecords:
    records = ViewRecords.empty((len(lambdas),), {"mix": 1})
    records.mix_partners[:] = 5
    records.mix_lambdas[:] = lambdas
    records.mix_boxes[:] = boxes
    return records


def test_mixup_equals_float64_blend():
    rng = np.random.default_rng(4)
    lambdas = [0, 1, 77, 128, 200, 254, 255]
    own = rng.integers(0, 256, (len(lambdas), 3, 40, 50), dtype=np.uint8)
    partner = rng.integers(0, 256, own.shape, dtype=np.uint8)
    out = mix_views(torch.from_numpy(own), torch.from_numpy(partner),
                    mixed_records(lambdas, [[0, 0, 0, 0]] * len(lambdas))).numpy()
    lam = np.asarray(lambdas, dtype=np.float64).reshape(-1, 1, 1, 1) / 255
    expected = np.floor(lam * own + (1 - lam) * partner + 0.5)  # no exact halves: 255 is odd
    np.testing.assert_array_equal(out, expected.astype(np.uint8))


def test_cutmix_box_takes_the_partner_pixels_and_only_those():
    rng = np.random.default_rng(5)
    own = rng.integers(0, 256, (2, 3, 45, 64), dtype=np.uint8)
    partner = rng.integers(0, 256, own.shape, dtype=np.uint8)
    boxes = [[30, 40, 100, 120], [0, 0, 255, 255]]
    out = mix_views(torch.from_numpy(own), torch.from_numpy(partner),
                    mixed_records([200, 0], boxes)).numpy()
    expected = own.copy()
    for i, (y0, x0, h, w) in enumerate(boxes):
        top, bottom = (math.floor(v / 255 * 45 + 0.5) for v in (y0, y0 + h))
        left, right = (math.floor(v / 255 * 64 + 0.5) for v in (x0, x0 + w))
        expected[i, :, top:bottom, left:right] = partner[i, :, top:bottom, left:right]
    np.testing.assert_array_equal(out, expected)
    # views that do not mix are left alone, whatever their partner slot holds
    records = mixed_records([200, 0], boxes)
    records.mix_partners[:] = -1
    np.testing.assert_array_equal(mix_views(torch.from_numpy(own), torch.from_numpy(partner),
                                            records).numpy(), own)


def random_records(count: int, seed: int) -> ViewRecords:
    """Records with every op, random levels and signs, some erasing."""
    rng = np.random.default_rng(seed)
    records = ViewRecords.empty((count,), {"op": 3, "erase": 1})
    records.ops[:] = rng.integers(0, len(OPS_V1), records.ops.shape)
    levels = rng.integers(0, 121, records.levels.shape)
    signs = np.where([[OPS_V1[i].signed for i in row] for row in records.ops],
                     rng.choice([-1, 1], records.ops.shape), 1)
    records.levels[:] = levels * signs
    erased = rng.random(count) < 0.5
    records.erase_boxes[erased, 0] = [20, 30, 90, 60]
    return records


@pytest.mark.parametrize("device", DEVICES)
def test_a_view_is_the_same_alone_in_a_batch_and_on_any_device(device):
    """The worker path (one view at a time, CPU) and the batch path (all views, any order,
    on the device after DALI) give the same bytes."""
    rng = np.random.default_rng(6)
    images = [textured(48, 48, seed) for seed in range(12)]
    pixels = as_tensor(images)
    records = random_records(len(images), seed=7)
    alone = torch.cat([augment_views(pixels[i:i + 1], records.map(lambda a: a[i:i + 1]), FILL)
                       for i in range(len(images))])
    order = rng.permutation(len(images))
    batch = augment_views(pixels[order].to(device), records.map(lambda a: a[order]), FILL)
    assert batch.device.type == device
    torch.testing.assert_close(batch.cpu(), alone[order], rtol=0, atol=0)
    # (V, n) leading shape, as DALI's view-major output
    grid = records.map(lambda a: a.reshape((3, 4) + a.shape[1:]))
    torch.testing.assert_close(augment_views(pixels.view(3, 4, 3, 48, 48), grid, FILL)
                               .reshape(12, 3, 48, 48), alone, rtol=0, atol=0)


def test_ops_apply_in_record_order(monkeypatch):
    """Two ops in a view: the second sees the first's output (timm's order)."""
    records = ViewRecords.empty((1,), {"op": 2})
    names = [op.name for op in OPS_V1]
    records.ops[0] = [names.index("Rotate"), names.index("Solarize")]
    records.levels[0] = [-70, 40]
    out = as_arrays(augment_views(as_tensor(IMAGES[:1]), records, FILL))[0]
    first = timm_op("Rotate", IMAGES[0], 7.0, True, monkeypatch)
    np.testing.assert_array_equal(out, timm_op("Solarize", first, 4.0, False, monkeypatch))


def test_bad_pixels_are_refused():
    records = ViewRecords.empty((2,), {"op": 1})
    with pytest.raises(ValueError, match="pixels must be uint8 of shape"):
        augment_views(torch.zeros(3, 3, 8, 8, dtype=torch.uint8), records, FILL)
    with pytest.raises(ValueError, match="pixels must be uint8"):
        augment_views(torch.zeros(2, 3, 8, 8), records, FILL)


def test_rendered_view_equals_timm_pipeline_on_the_crop(monkeypatch):
    """The whole contract of a mixed view, from a decoded image: the row's stored crop and
    flip (render_views), its ops in record order and its erasing box, then mixed with the
    partner's view as the partner's own records make it (its crop, flip, ops and erasing).
    Reference: PIL crops, timm's op functions, NumPy boxes and a float64 blend."""
    from teacher_infer.imaging.augment import AugmentSpec, plan_records
    from teacher_infer.imaging.decode import render_views
    from teacher_infer.imaging.views import ViewSpec, plan_views

    spec = ViewSpec(views=4, input_size=(40, 40), crop_pct=0.875)
    augment = AugmentSpec(augment="rand-m9-n2-mstd0.5-p0.9", erase=1.0, mixup=0.5,
                          mix_prob=1.0, fill=FILL)
    keys = ["a/0.png", "a/1.png"]
    images = [Image.fromarray(textured(90, 120, 10)), Image.fromarray(textured(100, 80, 11))]

    def record(row):
        return plan_records(augment, seed=0, key=keys[row], row=row, rows=2, chunk_rows=2,
                            views=4)

    def ours_unmixed(row):
        boxes, flips = plan_views(keys[row], images[row].height, images[row].width, spec)
        return augment_views(render_views(images[row], boxes, flips, spec, "bilinear"),
                             record(row), FILL)

    def reference_unmixed(row, view):
        boxes, flips = plan_views(keys[row], images[row].height, images[row].width, spec)
        crop = render_views(images[row], boxes[view:view + 1], flips[view:view + 1], spec,
                            "bilinear")[0].permute(1, 2, 0).numpy()
        rec = record(row)
        for op_id, level in zip(rec.ops[view], rec.levels[view]):
            if op_id:
                crop = timm_op(OPS_V1[op_id].name, crop, abs(int(level)) / 10, level < 0,
                               monkeypatch)
        crop = crop.copy()
        for y0, x0, h, w in rec.erase_boxes[view].astype(np.float64):
            if h and w:
                top, bottom = (math.floor(v / 255 * 40 + 0.5) for v in (y0, y0 + h))
                left, right = (math.floor(v / 255 * 40 + 0.5) for v in (x0, x0 + w))
                crop[top:bottom, left:right] = FILL
        return crop

    records = record(0)
    partner_pixels = torch.zeros(4, 3, 40, 40, dtype=torch.uint8)
    partner_rows = ours_unmixed(1)
    for view in np.flatnonzero(records.mixed):
        assert records.mix_partners[view] == 1
        partner_pixels[view] = partner_rows[records.mix_views[view]]
    ours = mix_views(ours_unmixed(0), partner_pixels, records)
    assert records.mixed[1:].all() and (records.ops[1:] > 0).any()
    for view in range(4):
        expected = reference_unmixed(0, view)
        if records.mixed[view]:
            lam = records.mix_lambdas[view] / 255
            partner = reference_unmixed(1, int(records.mix_views[view])).astype(np.float64)
            expected = np.floor(lam * expected + (1 - lam) * partner + 0.5).astype(np.uint8)
        np.testing.assert_array_equal(ours[view].permute(1, 2, 0).numpy(), expected,
                                      err_msg=f"view {view}")
