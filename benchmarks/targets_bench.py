"""Teacher targets sparse from the workers to the loss, against the dense rows the workers made
before (issue 26): bytes a batch moves from a DataLoader worker to the main process, the
worker's time per sample, and the device's time to make the dense rows (in the loss).

Run:  python benchmarks/targets_bench.py [--classes 1000 21841] [--k 10] [--batch 256]

Per C: ``dense`` is the former worker path (``labelstore.densify`` of one sample's view, a
(C,) float32 tensor per sample, stacked by the default collate); ``sparse`` is
``StoreDataset.target`` (``SparseTargets.from_topk``: ``labelstore.normalize_topk`` of k + 1
numbers) stacked by ``collate``, then ``SparseTargets.dense()`` where the loss runs. The floor
of the worker's work is reading the row (not measured here: the same in both). Bytes are the
tensors' storage, which is what the workers' shared memory carries.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

import labelstore
from student_train import SparseTargets

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from labelstore_bench import timed as _timed  # noqa: E402  (best-of-3 mean seconds a call)


def measure(classes: int, k: int, batch: int) -> dict:
    rng = np.random.default_rng(0)
    dist = rng.dirichlet(np.full(classes, 0.05), batch)
    indices = np.argsort(-dist, axis=1)[:, :k]
    probs = np.take_along_axis(dist, indices, 1).astype(np.float16).astype(np.float32)
    residual = (1 - dist[np.arange(batch)[:, None], indices].sum(1)).astype(np.float32)

    def dense_sample(i: int) -> torch.Tensor:
        return torch.from_numpy(labelstore.densify(indices[i:i + 1], probs[i:i + 1],
                                                   residual[i:i + 1], classes)[0])

    def sparse_sample(i: int) -> SparseTargets:
        one = SparseTargets.from_topk(indices[i:i + 1], probs[i:i + 1], residual[i:i + 1],
                                      classes)
        return SparseTargets(one.indices[0], one.probs[0], one.residual[0], classes)

    dense_batch = torch.stack([dense_sample(i) for i in range(batch)])
    sparse_batch = SparseTargets.stack([sparse_sample(i) for i in range(batch)])
    assert torch.equal(sparse_batch.dense(), dense_batch)      # the same targets
    moved = lambda *ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    return {
        "classes": classes, "k": k, "batch": batch,
        "dense_bytes_per_batch": moved(dense_batch),
        "sparse_bytes_per_batch": moved(sparse_batch.indices, sparse_batch.probs,
                                        sparse_batch.residual),
        "dense_worker_us_per_sample": 1e6 * _timed(lambda: dense_sample(7), 200),
        "sparse_worker_us_per_sample": 1e6 * _timed(lambda: sparse_sample(7), 200),
        "dense_stack_ms_per_batch": 1e3 * _timed(lambda: torch.stack([dense_batch[i]
                                                              for i in range(batch)]), 5),
        "device_dense_ms_per_batch": 1e3 * _timed(sparse_batch.dense, 5),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[1000, 21841])
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for classes in args.classes:
        found = measure(classes, args.k, args.batch)
        found["bytes_ratio"] = found["dense_bytes_per_batch"] / found["sparse_bytes_per_batch"]
        found["worker_ratio"] = (found["dense_worker_us_per_sample"]
                                 / found["sparse_worker_us_per_sample"])
        print(json.dumps({key: round(v, 3) if isinstance(v, float) else v
                          for key, v in found.items()}))


if __name__ == "__main__":
    main()
