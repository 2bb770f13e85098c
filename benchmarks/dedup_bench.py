"""dedup at scale: stage-1 pairs/s (torch vs the numpy baseline), stage-2 pairs/s, memory.

Run:  python benchmarks/dedup_bench.py [--queries 2048] [--pool 100000] [--dim 2048]
                                       [--device cpu|cuda] [--skip-numpy] [--sift-pairs 48]
                                       [--workdir DIR] [--json FILE]

On the CPU a third run multiplies in bf16 (``--precision bf16``; ``--skip-bf16``
leaves it out). Query and pool stores of random float16 embeddings (every 50th pool row a noisy copy
of a query, so stage 1 has pairs to keep) are generated once in ``--workdir`` and
reused. Each stage-1 measurement runs in a fresh process, so its peak RSS (VmHWM) is
its own; both read the same stores through ``dedup.search``, and their pairs are
checked to be identical. The CPU figures are extrapolated to ImageNet-22k against
ImageNet val: 14 M × 50 k pairs at D = 2048, and 50 k × top-m SIFT pairs.

Stage 2 verifies ``--sift-pairs`` pairs of generated images (the generator of
tests/test_dedup.py: half near-copies, half unrelated), with one thread and with one
thread per core. ``--device cuda`` (the GPU script) times the torch path on the GPU;
``--skip-numpy`` leaves out the baseline there (at >= 2 M pool rows it takes hours).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))

import labelstore  # noqa: E402
from teacher_infer.dedup import search as dedup_search  # noqa: E402
from teacher_infer.dedup import sift  # noqa: E402

FULL_POOL, FULL_QUERIES, FULL_DIM, FULL_TOP_M = 14_000_000, 50_000, 2048, 5
PIECE = 65536   # rows generated per write call


def make_store(path: str, rows: int, dim: int, seed: int, copies_of: np.ndarray | None = None):
    """A store of ``rows`` random float16 embeddings (written once, then reused)."""
    if os.path.exists(os.path.join(path, "zarr.json")):
        return
    keys = [f"img_{i:09d}.jpg" for i in range(rows)]
    writer = labelstore.create(path, keys=keys, num_classes=2, topk=1, embedding_dim=dim,
                               overwrite=True)
    rng = np.random.default_rng(seed)
    for lo in range(0, rows, PIECE):
        n = min(PIECE, rows - lo)
        embeddings = rng.standard_normal((n, dim), dtype=np.float32)
        if copies_of is not None:   # every 50th row: a noisy copy of a query
            planted = np.arange(lo + (-lo) % 50, lo + n, 50)
            embeddings[planted - lo] = (copies_of[planted % len(copies_of)] + 0.3
                                        * rng.standard_normal((len(planted), dim),
                                                              dtype=np.float32))
        writer.write(lo, np.zeros((n, 1, 1), dtype=np.int64), np.full((n, 1, 1), 0.5),
                     embeddings=embeddings.astype(np.float16))
    writer.close()


def peak_rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _stage1(query: str, pool: str, device: str, precision: str, top_m: int, threshold: float,
            queue) -> None:
    query_store, pool_store = labelstore.open(query), labelstore.open(pool)
    warm = 0.0
    if device != "numpy":   # import torch and start its kernels outside the timed search
        started = time.perf_counter()
        import torch

        dev = torch.device(device)
        (torch.ones(64, 64, device=dev) @ torch.ones(64, 64, device=dev)).topk(5, dim=1)
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        warm = time.perf_counter() - started
    start_rss = peak_rss_mib()
    started = time.perf_counter()
    pairs = dedup_search.search(query_store, pool_store, threshold=threshold, top_m=top_m,
                                device=device, precision=precision)
    seconds = time.perf_counter() - started
    gpu = None
    if device.startswith("cuda"):
        import torch

        gpu = torch.cuda.max_memory_allocated() / 2**20
    queue.put(dict(seconds=seconds, torch_start_seconds=warm, pairs=len(pairs), passes=pairs.passes,
                   peak_rss_mib=peak_rss_mib(), rss_before_mib=start_rss, gpu_peak_mib=gpu,
                   result=(pairs.query_rows.tolist(), pairs.pool_rows.tolist(),
                           pairs.cosines.tolist())))


def stage1(query: str, pool: str, device: str, precision: str, top_m: int,
           threshold: float) -> dict:
    """One search in a fresh process (spawned: its own peak RSS)."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_stage1, args=(query, pool, device, precision, top_m,
                                                    threshold, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def stage2(workdir: str, pairs: int, workers: int) -> dict:
    """SIFT verification of generated image pairs (half copies, half unrelated)."""
    import cv2
    from test_dedup import natural_image, near_duplicate

    root = os.path.join(workdir, "images")
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    query_keys, pool_keys = [], []
    for i in range(pairs):
        query_key, pool_key = f"q_{i:04d}.png", f"p_{i:04d}.jpg"
        if not os.path.exists(os.path.join(root, pool_key)):
            image = natural_image(rng)
            cv2.imwrite(os.path.join(root, query_key), image)
            data = (near_duplicate(image, rng) if i % 2 == 0 else
                    cv2.imencode(".jpg", natural_image(rng))[1].tobytes())
            with open(os.path.join(root, pool_key), "wb") as handle:
                handle.write(data)
        query_keys.append(query_key)
        pool_keys.append(pool_key)
    rows = np.arange(pairs)
    candidates = dedup_search.Candidates(rows, rows, np.ones(pairs, dtype=np.float32))
    started = time.perf_counter()
    inliers, _ = sift.verify_pairs(candidates, np.asarray(query_keys, dtype=object),
                                   np.asarray(pool_keys, dtype=object), root, root,
                                   workers=workers)
    seconds = time.perf_counter() - started
    confirmed = inliers >= sift.DEFAULT_MIN_INLIERS
    return dict(pairs=pairs, workers=workers, seconds=seconds, pairs_per_s=pairs / seconds,
                copies_confirmed=int(confirmed[0::2].sum()),
                unrelated_confirmed=int(confirmed[1::2].sum()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=2048)
    parser.add_argument("--pool", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--top-m", type=int, default=FULL_TOP_M)
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--device", default="cpu", help="torch device of stage 1 (cpu, cuda)")
    parser.add_argument("--skip-numpy", action="store_true", help="no numpy baseline")
    parser.add_argument("--skip-bf16", action="store_true",
                        help="on the CPU, no extra run with --precision bf16")
    parser.add_argument("--sift-pairs", type=int, default=48, help="0: no stage-2 timing")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "dedup_bench"))
    parser.add_argument("--json", default=None, help="Also write the figures here.")
    args = parser.parse_args()

    os.makedirs(args.workdir, exist_ok=True)
    name = f"{args.queries}q_{args.pool}p_{args.dim}d"
    query = os.path.join(args.workdir, f"query_{name}.zarr")
    pool = os.path.join(args.workdir, f"pool_{name}.zarr")
    started = time.perf_counter()
    make_store(query, args.queries, args.dim, seed=1)
    queries = labelstore.open(query).read_embeddings(slice(None))
    make_store(pool, args.pool, args.dim, seed=2, copies_of=queries)
    print(f"stores: {args.queries:,} queries, {args.pool:,} pool rows, D = {args.dim} "
          f"({time.perf_counter() - started:.1f} s to make or open)")

    pairs_total = args.queries * args.pool
    figures: dict = dict(queries=args.queries, pool=args.pool, dim=args.dim, top_m=args.top_m,
                         threshold=args.threshold, cpu_count=os.cpu_count())
    runs = {}
    plan = [("numpy", "numpy", "auto"), (f"torch {args.device}", args.device, "auto")]
    if args.device == "cpu" and not args.skip_bf16:
        plan.append(("torch cpu bf16", "cpu", "bf16"))
    for label, device, precision in plan:
        if label == "numpy" and args.skip_numpy:
            continue
        run = stage1(query, pool, device, precision, args.top_m, args.threshold)
        run["pairs_per_s"] = pairs_total / run["seconds"]
        runs[label] = run
        gpu = f", GPU peak {run['gpu_peak_mib']:,.0f} MiB" if run["gpu_peak_mib"] else ""
        print(f"stage 1 {label:>14}: {run['seconds']:7.2f} s  {run['pairs_per_s']:.3g} pairs/s  "
              f"({run['pairs']:,} pairs kept, {run['passes']} pass(es)), peak RSS "
              f"{run['peak_rss_mib']:,.0f} MiB (after opening the stores "
              f"{run['rss_before_mib']:,.0f}){gpu}")
    results = {label: run.pop("result") for label, run in runs.items()}
    figures["stage1"] = runs
    if "numpy" in runs:
        for label in list(runs)[1:]:
            same = results[label] == results["numpy"]
            ratio = runs["numpy"]["seconds"] / runs[label]["seconds"]
            figures.setdefault("stage1_speedup_vs_numpy", {})[label] = ratio
            figures.setdefault("stage1_same_pairs", {})[label] = same
            print(f"stage 1 {label} vs numpy: {ratio:.2f}× the pairs/s; identical pairs: {same}")
    scale = FULL_POOL * FULL_QUERIES * FULL_DIM / (pairs_total * args.dim)
    for label, run in runs.items():
        hours = run["seconds"] * scale / 3600
        figures.setdefault("extrapolated_stage1_hours", {})[label] = hours
        print(f"extrapolated 14 M × 50 k × 2048 with {label}: {hours:,.1f} h")

    if args.sift_pairs:
        figures["stage2"] = []
        for workers in sorted({1, os.cpu_count() or 1}):
            run = stage2(args.workdir, args.sift_pairs, workers)
            figures["stage2"].append(run)
            hours = FULL_QUERIES * FULL_TOP_M / run["pairs_per_s"] / 3600
            print(f"stage 2, {workers} thread(s): {run['pairs_per_s']:.2f} pairs/s "
                  f"({run['copies_confirmed']}/{args.sift_pairs // 2} copies confirmed, "
                  f"{run['unrelated_confirmed']} unrelated); 50 k × {FULL_TOP_M} pairs: "
                  f"{hours:.1f} h here")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(figures, handle, indent=2)


if __name__ == "__main__":
    main()
