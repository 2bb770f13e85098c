"""Cost of ``ssld ensemble`` and ``ssld verify``, measured through the commands.

Run:  python benchmarks/ensemble_bench.py [--rows 200000] [--classes 1000] [--k 10]
                                          [--views 1] [--images 64] [--model test_convnext]
                                          [--input-size 64] [--workdir DIR]

1. Two member stores of ``--rows`` random top-k rows on the same keys, boxes and flips
   (``--classes`` classes, k stored, ``--views`` views) are written through
   ``labelstore.create`` and kept in ``--workdir``; then, each in a fresh process,
   ``ssld ensemble A B --out E`` (mean and geomean) and ``ssld verify E --structure-only``.
2. ``--images`` generated images are labeled by ``ssld infer-teacher`` (``--model`` with
   random weights at ``--input-size``, PIL, CPU); then ``ssld verify STORE --sample N``
   recomputes every row with that teacher.

Rows/s is rows over the command's wall time (process start, imports and model set-up
included) and, in brackets, what the command itself reports for its work.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import labelstore  # noqa: E402


def member(path: str, *, rows: int, classes: int, k: int, views: int, seed: int) -> None:
    """Random teacher-like rows (softmax of scaled normal logits); keys/boxes/flips fixed."""
    if os.path.exists(path):
        return
    rng = np.random.default_rng(seed)
    crops = np.random.default_rng(0)
    keys = [f"n{c:08d}/img_{i}.JPEG" for i, c in enumerate(crops.integers(0, classes, rows))]
    size = crops.uniform(0.3, 0.9, size=(rows, views, 2))
    start = crops.uniform(0, 1, size=(rows, views, 2)) * (1 - size)
    boxes = np.concatenate([start, size], axis=-1)
    flips = crops.random((rows, views)) < 0.5
    with labelstore.create(path, keys=keys, num_classes=classes, topk=k, views=views,
                           attrs={"dataset": {"root": "/images"},
                                  "teacher": {"model": f"random{seed}"}}) as writer:
        step = 16384
        for lo in range(0, rows, step):
            n = min(step, rows - lo)
            logits = rng.normal(scale=2.5, size=(n, views, classes)).astype(np.float32)
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            top = np.argsort(-probs, axis=-1)[..., :k]
            writer.write(lo, top, np.take_along_axis(probs, top, -1), boxes=boxes[lo:lo + n],
                         flips=flips[lo:lo + n])


def command(*args: str) -> tuple[float, str]:
    """Wall seconds and output of ``ssld ARGS`` in a fresh process."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "cli", *args], cwd=REPO, capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=REPO))
    wall = time.perf_counter() - started
    if done.returncode not in (0, 1):
        raise SystemExit(f"ssld {' '.join(args)} failed:\n{done.stderr}")
    return wall, done.stdout


def report(what: str, rows: int, wall: float, output: str, pattern: str) -> None:
    found = re.search(pattern, output)
    own = f" [{found.group(1)} rows/s reported]" if found else ""
    rate = rows / wall
    shown = f"{rate:,.0f}" if rate >= 100 else f"{rate:.2f}"
    print(f"{what}: {rows:,} rows in {wall:.1f} s wall = {shown} rows/s{own}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--views", type=int, default=1)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--model", default="test_convnext")
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "ensbench"))
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    shape = f"{args.rows}r-{args.classes}c-{args.k}k-{args.views}v"
    a, b, e = (os.path.join(args.workdir, f"{name}-{shape}.zarr") for name in "abe")
    for path, seed in ((a, 1), (b, 2)):
        member(path, rows=args.rows, classes=args.classes, k=args.k, views=args.views, seed=seed)
    print(f"members: {args.rows:,} rows x {args.views} view(s), C={args.classes}, k={args.k}")
    for rule in ("mean", "geomean"):
        wall, out = command("ensemble", a, b, "--out", e, "--rule", rule, "--overwrite")
        report(f"ensemble --rule {rule}", args.rows, wall, out, r"\(([\d,]+) rows/s\)")
    wall, out = command("verify", e, "--structure-only")
    report("verify --structure-only", args.rows, wall, out, r"s, ([\d,]+) rows/s\)")
    if args.images < 1:  # --images 0: the store-only commands alone
        return

    from conftest import make_image  # tests/conftest.py: smooth random pictures

    images = os.path.join(args.workdir, f"images-{args.images}")
    for i in range(args.images):
        path = os.path.join(images, f"img{i:04d}.jpg")
        if not os.path.exists(path):
            make_image(path, size=(96 + i % 7 * 16, 80 + i % 5 * 16), seed=i)
    store = os.path.join(args.workdir, f"teacher-{args.model}-{args.input_size}.zarr")
    command("infer-teacher", "--model", args.model, "--random-weights", "--data", images,
            "--out", store, "--input-size", str(args.input_size), "--decoder", "pil",
            "--device", "cpu", "--no-progress", "--topk", str(args.k))
    wall, out = command("verify", store, "--sample", str(args.images), "--device", "cpu")
    report(f"verify --sample {args.images} ({args.model} at {args.input_size} px, CPU)",
           args.images, wall, out, r"\(([\d.,]+) rows/s\)")
    print(out.strip())


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(REPO, "tests"))
    main()
