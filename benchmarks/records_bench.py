"""Bytes per view on disk of augmentation records: crop-only, + RandAugment and erasing,
+ MixUp/CutMix, at k = 10, beside Apple's ml-dr (Dataset Reinforcement, ICCV'23: 65, 73 and
90–104 B per view for the same contents).

Run:  python benchmarks/records_bench.py [--rows 16384] [--views 4] [--topk 10]

Then, the CPU cost of the records per view at 224 px on this machine's one torch thread:
drawing them (``plan_records``) and applying them (``augment_views`` + ``mix_views``) one row
at a time as a DataLoader worker does, and in one batch as the GPU path does after DALI
decodes, each beside rendering the view's crop with PIL (``render_views``), the work a PIL
worker does anyway.

Each configuration is a real store written through ``labelstore.create``/``write``: the
same teacher-like top-k rows (``labelstore_bench.teacher_like_rows``, one draw per view),
the boxes and flips of ``plan_views`` (timm's eval view + RandomResizedCrop on images of
ImageNet-like sizes) and the records of ``plan_records``; sizes are the files on disk (keys,
labels and done flags included), divided by rows × views.
"""
from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np

import labelstore
from labelstore_bench import teacher_like_rows, timed
from teacher_infer.imaging.augment import (AugmentSpec, ViewRecords, augment_views, mix_views,
                                           plan_records)
from teacher_infer.imaging.views import ViewSpec, plan_views

CONFIGS = (
    ("crop only", AugmentSpec(), "65"),
    ("+ RandAugment + erasing", AugmentSpec(augment="rand-m9-n2-mstd0.5", erase=0.25), "73"),
    ("+ MixUp/CutMix", AugmentSpec(augment="rand-m9-n2-mstd0.5", erase=0.25, mixup=0.2,
                                   cutmix=1.0), "90–104"),
)


def views_like_teacher(n: int, views: int, k: int, classes: int, seed: int):
    """Keys, labels, and (n, V, k) indices/probs: each view its own teacher-like draw."""
    keys, labels, indices, probs, _ = teacher_like_rows(n, k, classes, seed)
    per_view = [teacher_like_rows(n, k, classes, seed + 1 + view) for view in range(1, views)]
    indices = np.concatenate([indices] + [rows[2] for rows in per_view], axis=1)
    probs = np.concatenate([probs] + [rows[3] for rows in per_view], axis=1)
    return keys, labels, indices, probs


def array_bytes(path: str) -> dict[str, int]:
    """Bytes on disk under each array's directory (metadata included)."""
    sizes = {}
    for name in sorted(os.listdir(path)):
        folder = os.path.join(path, name)
        if os.path.isdir(folder):
            sizes[name] = sum(os.path.getsize(os.path.join(root, file))
                              for root, _, files in os.walk(folder) for file in files)
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--topk", type=int, default=10)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--out", default=None, help="directory for the stores (default: tmp)")
    parser.add_argument("--time-rows", type=int, default=64,
                        help="rows of the CPU cost measurement (0: skip it)")
    args = parser.parse_args()
    n, views, k = args.rows, args.views, args.topk
    chunk_rows = labelstore.DEFAULT_CHUNK_ROWS

    keys, labels, indices, probs = views_like_teacher(n, views, k, args.classes, seed=0)
    rng = np.random.default_rng(1)
    sizes = rng.choice([(375, 500), (500, 375), (333, 500), (500, 500), (480, 640)], size=n)
    spec = ViewSpec(views=views, input_size=(224, 224), crop_pct=0.875)
    planned = [plan_views(key, int(h), int(w), spec) for key, (h, w) in zip(keys, sizes)]
    boxes = np.stack([b for b, _ in planned])
    flips = np.stack([f for _, f in planned])

    workdir = args.out or tempfile.mkdtemp(prefix="ssld-records-")
    print(f"{n:,} rows x {views} views, k = {k}, C = {args.classes}, chunk_rows {chunk_rows}")
    rows = []
    for name, augment, ml_dr in CONFIGS:
        dims = augment.dims() if augment.enabled else None
        records = ViewRecords.stack([
            plan_records(augment, seed=0, key=key, row=row, rows=n, chunk_rows=chunk_rows,
                         views=views) for row, key in enumerate(keys)]) if dims else None
        path = os.path.join(workdir, f"{len(rows)}.zarr")
        with labelstore.create(path, keys=keys, num_classes=args.classes, topk=k, views=views,
                               labels=labels, chunk_rows=chunk_rows, overwrite=True,
                               augment_dims=dims,
                               attrs={"augment": augment.attrs()} if dims else None) as writer:
            extra = records.store_arrays(dims) if dims else {}
            writer.write(0, indices, probs, boxes=boxes, flips=flips, **extra)
        total = labelstore.disk_bytes(path)
        per_array = array_bytes(path)
        record_bytes = sum(per_array[array] for array in (extra or {}))
        rows.append((name, total / (n * views), record_bytes / (n * views), ml_dr, per_array,
                     sorted(extra)))

    print("\n| store | B per view on disk | of which records | ml-dr |")
    print("|---|---|---|---|")
    for name, total, records, ml_dr, _, _ in rows:
        print(f"| {name} | {total:.1f} | {records:.1f} | {ml_dr} |")
    print("\nper array, B per view (last configuration):")
    for array, size in rows[-1][4].items():
        print(f"  {array:13s} {size / (n * views):6.2f}")
    if args.time_rows:
        apply_costs(args.time_rows, views)


def apply_costs(rows: int, views: int) -> None:
    """Seconds per view: crop rendering (PIL), drawing records, applying them per row and
    in one batch."""
    import torch
    from PIL import Image

    from teacher_infer.imaging.decode import render_views

    torch.set_num_threads(1)
    spec = ViewSpec(views=views, input_size=(224, 224), crop_pct=0.875)
    augment = CONFIGS[-1][1]
    rng = np.random.default_rng(2)
    images = [Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8))
              for _ in range(rows)]
    keys = [f"n0/{i}.JPEG" for i in range(rows)]
    plans = [plan_views(key, 375, 500, spec) for key in keys]
    records = [plan_records(augment, seed=0, key=key, row=row, rows=rows, chunk_rows=rows,
                            views=views) for row, key in enumerate(keys)]
    crops = [render_views(image, boxes, flips, spec, "bilinear")
             for image, (boxes, flips) in zip(images, plans)]

    def per_row():
        for pixels, record in zip(crops, records):
            mix_views(augment_views(pixels, record, augment.fill), pixels, record)

    batch_pixels = torch.stack(crops)
    batch_records = ViewRecords.stack(records)
    count = rows * views
    times = {
        "render the crops (PIL, render_views)": timed(lambda: [
            render_views(image, boxes, flips, spec, "bilinear")
            for image, (boxes, flips) in zip(images, plans)], 1),
        "draw the records (plan_records)": timed(lambda: [
            plan_records(augment, seed=0, key=key, row=row, rows=rows, chunk_rows=rows,
                         views=views) for row, key in enumerate(keys)], 1),
        "apply them, one row at a time (worker)": timed(per_row, 1),
        "apply them, one batch (device path, CPU here)": timed(lambda: mix_views(
            augment_views(batch_pixels, batch_records, augment.fill), batch_pixels,
            batch_records), 1),
    }
    floor = times["render the crops (PIL, render_views)"]
    print(f"\nCPU cost per view ({rows} rows x {views} views, 224 px, {augment.augment}, "
          f"erase {augment.erase}, mixup {augment.mixup}, cutmix {augment.cutmix}; one thread)")
    print("| step | µs per view | x crop rendering |")
    print("|---|---|---|")
    for step, seconds in times.items():
        print(f"| {step} | {seconds / count * 1e6:.0f} | {seconds / floor:.2f} |")


if __name__ == "__main__":
    main()
