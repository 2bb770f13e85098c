"""Label-store throughput: write rows/s, bytes per row-view, load time, batch-read cost.

Run:  python benchmarks/labelstore_bench.py [--rows 1000000] [--out DIR]

Everything is measured in one run and reported as ratios where a floor exists
(batch reads vs numpy fancy indexing on the same in-RAM arrays), because the
machine is shared and absolute times drift.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np
import zarr

import labelstore


def teacher_like_rows(n: int, k: int, classes: int, seed: int):
    """Top-k rows shaped like a real teacher's: skewed top-1 classes, confident heads,
    a long tail in the residual, ImageNet-style keys, center-crop boxes of varied aspect."""
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, classes + 1) ** 0.6
    popularity /= popularity.sum()
    top1 = rng.choice(classes, size=n, p=popularity)
    # the other k-1 classes: near the top-1 (similar classes sit close in ImageNet order)
    offsets = rng.integers(1, 60, size=(n, k - 1)) * rng.choice([-1, 1], size=(n, k - 1))
    indices = np.concatenate([top1[:, None], (top1[:, None] + offsets) % classes], axis=1)
    # repair the rare duplicate ids by walking forward
    for j in range(1, k):
        for _ in range(k):
            clash = (indices[:, :j] == indices[:, j:j + 1]).any(1)
            if not clash.any():
                break
            indices[clash, j] = (indices[clash, j] + 1) % classes
    head = rng.beta(5, 2, size=n)
    tail = np.sort(rng.dirichlet(np.full(k, 0.3), size=n)[:, : k - 1], axis=1)[:, ::-1]
    probs = np.concatenate([head[:, None], (1 - head)[:, None] * 0.9 * tail], axis=1)
    aspect = rng.choice([0.75, 1.0, 4 / 3], size=n)  # h/w of the decoded image
    side_h = np.where(aspect >= 1, 0.875 / aspect, 0.875)
    side_w = np.where(aspect >= 1, 0.875, 0.875 * aspect)
    boxes = np.stack([(1 - side_h) / 2, (1 - side_w) / 2, side_h, side_w], axis=1)
    wnids = np.array([f"n{1440764 + 7 * c:08d}" for c in range(classes)])
    keys = [f"{wnids[c]}/{wnids[c]}_{i}.JPEG" for i, c in enumerate(top1)]
    return keys, top1.astype(np.int32), indices[:, None], probs[:, None], boxes[:, None]


def timed(fn, repeat: int) -> float:
    """Best-of-3 mean seconds per call over ``repeat`` calls."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        best = min(best, (time.perf_counter() - start) / repeat)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--topk", type=int, default=10)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--write-batch", type=int, default=4096,
                        help="rows per write() call (an inference loop writes per batch)")
    parser.add_argument("--out", default=None, help="directory for the store (default: tmp)")
    args = parser.parse_args()
    n, k, classes = args.rows, args.topk, args.classes

    keys, labels, indices, probs, boxes = teacher_like_rows(n, k, classes, seed=0)
    workdir = args.out or tempfile.mkdtemp(prefix="ssld-bench-")
    path = os.path.join(workdir, "bench.zarr")

    start = time.perf_counter()
    writer = labelstore.create(path, keys=keys, num_classes=classes, topk=k, labels=labels,
                               overwrite=True)
    created = time.perf_counter() - start
    start = time.perf_counter()
    for lo in range(0, n, args.write_batch):
        hi = min(lo + args.write_batch, n)
        writer.write(lo, indices[lo:hi], probs[lo:hi], boxes=boxes[lo:hi])
    writer.close()
    write_s = time.perf_counter() - start

    disk = labelstore.disk_bytes(path)
    label_bytes = sum(labelstore.disk_bytes(os.path.join(path, name)) for name in
                      ("indices", "probs", "residual", "boxes", "flips", "valid"))

    start = time.perf_counter()
    st = labelstore.open(path).load()
    load_s = time.perf_counter() - start

    rng = np.random.default_rng(1)
    batches = [rng.integers(0, n, 256) for _ in range(64)]
    it = iter(range(10**9))
    # the floor: the stored arrays in RAM (zarr's own read of each), indexed by numpy
    group = zarr.open_group(path, mode="r")
    ram = {name: np.asarray(group[name][:]) for name in
           ("indices", "probs", "residual", "boxes", "flips", "valid")}

    def ours():
        st.read(batches[next(it) % 64])

    def floor():
        rows = batches[next(it) % 64]
        for name in ("indices", "probs", "residual", "boxes", "flips", "valid"):
            ram[name][rows]

    def dense():
        st.dense(batches[next(it) % 64])

    ours_s, floor_s, dense_s = timed(ours, 200), timed(floor, 200), timed(dense, 200)
    cold = labelstore.open(path)
    cold_s = timed(lambda: cold.read(batches[next(it) % 64]), 3)

    print(f"rows                         {n:,} (k={k}, 1 view, {classes} classes)")
    print(f"create (keys, labels)        {created:.2f} s")
    print(f"write throughput             {n / write_s:,.0f} rows/s ({write_s:.2f} s, "
          f"batches of {args.write_batch})")
    print(f"bytes per row-view, all      {disk / n:.1f} B ({disk / 2**20:.1f} MiB on disk)")
    print(f"bytes per row-view, labels   {label_bytes / n:.1f} B (without keys/labels/done)")
    print(f"open + load into RAM         {load_s:.2f} s")
    print(f"random 256-row read, loaded  {ours_s * 1e6:.1f} us = {ours_s / floor_s:.2f}x numpy "
          f"fancy indexing ({floor_s * 1e6:.1f} us)")
    print(f"random 256-row dense, loaded {dense_s * 1e6:.1f} us (256 x {classes} float32)")
    print(f"random 256-row read, zarr    {cold_s * 1e3:.1f} ms = {cold_s / floor_s:,.0f}x the "
          "loaded floor")
    if args.out is None:
        shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
