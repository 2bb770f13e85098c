"""teacher_infer.imaging.views: view-0 boxes reproduce timm's eval transform; random views are
deterministic per (seed, key, view) and follow RandomResizedCrop's rules."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import smooth_rgb
from labelstore import BOX_SCALE, dequantize_boxes
from teacher_infer.imaging import (ViewSpec, eval_box, plan_views, quantize_inside,
                                   random_resized_crop_box, render_box)
from teacher_infer.imaging.decode import render_views
from teacher_infer.imaging.views import view_rng


def timm_eval_pixels(image: Image.Image, input_size: int, crop_pct: float, interpolation: str):
    from timm.data import create_transform

    transform = create_transform(input_size=(3, input_size, input_size), crop_pct=crop_pct,
                                 interpolation=interpolation, mean=(0, 0, 0), std=(1, 1, 1))
    return (transform(image) * 255).round().to(torch.uint8)


@pytest.mark.parametrize("height,width", [(40, 64), (64, 40), (57, 57), (375, 500), (33, 90)])
@pytest.mark.parametrize("input_size,crop_pct,interpolation",
                         [(32, 0.875, "bicubic"), (48, 0.95, "bilinear"), (24, 1.0, "bilinear")])
def test_view0_is_timm_eval_transform_and_its_box(height, width, input_size, crop_pct,
                                                  interpolation):
    image = Image.fromarray(smooth_rgb(height, width, seed=height * width))
    spec = ViewSpec(views=1, input_size=(input_size, input_size), crop_pct=crop_pct)
    boxes, flips = plan_views("k", height, width, spec)
    theirs = timm_eval_pixels(image, input_size, crop_pct, interpolation)
    # the PIL decoder renders view 0 with timm's own steps: identical
    rendered = render_views(image, boxes, flips, spec, interpolation)[0]
    torch.testing.assert_close(rendered, theirs, rtol=0, atol=0)
    # replaying the stored box (what the DALI decoder and a student do) is the same region:
    ours = torch.from_numpy(np.array(render_box(image, boxes[0], False, spec.input_size,
                                                interpolation))).permute(2, 0, 1)
    # Same region and filter; PIL rounds its two resampling passes to 8 bits, and the box
    # (quantised to 1/65535, and a float sum of two terms) can move a tap by a hair, so a few
    # pixels differ by a grey level or two. A crop shifted by one pixel differs by ~6 on average.
    diff = (ours.int() - theirs.int()).abs().float()
    assert diff.max() <= 2
    assert diff.mean() < 0.25


def test_eval_box_geometry():
    spec = ViewSpec(views=1, input_size=(224, 224), crop_pct=0.875)
    y0, x0, h, w = eval_box(375, 500, spec)  # resized to 256 x 341, crop 224 x 224
    assert (h, w) == pytest.approx((224 / 256, 224 / 341))
    assert (y0, x0) == pytest.approx((16 / 256, 58 / 341))
    squash = ViewSpec(views=1, input_size=(224, 224), crop_pct=0.875, crop_mode="squash")
    assert eval_box(375, 500, squash) == pytest.approx([16 / 256, 16 / 256, 224 / 256, 224 / 256])
    with pytest.raises(ValueError, match="border"):
        ViewSpec(views=1, input_size=(224, 224), crop_pct=1.0, crop_mode="border")


def test_random_views_depend_only_on_seed_key_view():
    spec = ViewSpec(views=6, input_size=(32, 32), crop_pct=0.875, seed=3)
    boxes, flips = plan_views("cls/a.jpg", 300, 400, spec)
    again_boxes, again_flips = plan_views("cls/a.jpg", 300, 400, spec)
    np.testing.assert_array_equal(boxes, again_boxes)
    np.testing.assert_array_equal(flips, again_flips)
    assert not flips[0]
    assert len({tuple(b) for b in boxes}) == 6  # distinct views
    other_key, _ = plan_views("cls/b.jpg", 300, 400, spec)
    other_seed, _ = plan_views("cls/a.jpg", 300, 400,
                               ViewSpec(views=6, input_size=(32, 32), crop_pct=0.875, seed=4))
    assert not np.array_equal(boxes[1:], other_key[1:])
    assert not np.array_equal(boxes[1:], other_seed[1:])
    # view v's box does not depend on how many views are drawn
    fewer, _ = plan_views("cls/a.jpg", 300, 400,
                          ViewSpec(views=3, input_size=(32, 32), crop_pct=0.875, seed=3))
    np.testing.assert_array_equal(fewer, boxes[:3])


def test_random_resized_crop_follows_scale_and_ratio():
    height, width, scale, ratio = 300, 400, (0.25, 0.5), (3 / 4, 4 / 3)
    areas, aspects, flips = [], [], []
    for i in range(400):
        y0, x0, h, w = random_resized_crop_box(view_rng(0, f"k{i}", 1), height, width, scale,
                                               ratio)
        assert 0 <= y0 and 0 <= x0 and y0 + h <= 1 + 1e-12 and x0 + w <= 1 + 1e-12
        areas.append(h * w)
        aspects.append((w * width) / (h * height))
        flips.append(view_rng(0, f"k{i}", 1).uniform() < 0.5)
    assert min(areas) >= scale[0] - 0.01 and max(areas) <= scale[1] + 0.01
    assert min(aspects) >= ratio[0] - 0.02 and max(aspects) <= ratio[1] + 0.02
    assert np.std(areas) > 0.05


def test_quantized_boxes_stay_inside_the_image():
    boxes = np.array([[0.3, 0.6, 0.7, 0.4], [0.99999, 0.0, 0.00001, 1.0], [0, 0, 1, 1]])
    grid = quantize_inside(boxes)
    assert grid.dtype == np.uint16
    assert np.all(grid[:, 0].astype(int) + grid[:, 2] <= BOX_SCALE)
    assert np.all(grid[:, 1].astype(int) + grid[:, 3] <= BOX_SCALE)
    assert np.all(grid[:, 2:] >= 1)
    np.testing.assert_allclose(dequantize_boxes(grid), boxes, atol=2 / BOX_SCALE)
