"""The CPU threads of a process that computes: one count for torch, OpenMP, BLAS and OpenCV.

Every entry point that computes (``teacher_infer.run``, ``teacher_infer.verify``, dedup,
``student_train.train``, ``student_train.evaluate``) calls :func:`set_threads` with its
config's ``threads`` before any work, so ``--threads N`` and ``threads=N`` from Python do the
same. ``None`` (the default) is the environment variable ``SSLD_THREADS`` when it is set (a
driver that runs many ssld commands, like the studies in experiments/, sets it once), else the
CPUs available to this rank (:func:`.cpus_per_rank`): on a GPU node of one's own, dedup's SIFT
stage and every other CPU stage use the cores they have.
Where the cores are shared with other jobs, threads wait for each other at every parallel
region: on a 2-core machine with one other CPU-bound process, a resnet18 training step at 32 px
ran at 7 images/s with 2 torch threads and at 168 with 1 (docs/benchmarks.md, "The quickstart";
benchmarks/threads_bench.py). There, ask for 1 (the quickstart and the tests do).
"""
from __future__ import annotations

import os
import sys

from .device import cpus_per_rank
from .dist import Dist

ENV_THREADS = "SSLD_THREADS"   # the default of every command's --threads when set


def set_threads(threads: int | None = None, dist: Dist | None = None) -> int:
    """Use ``threads`` CPU threads in this process and in the processes it starts (None:
    ``$SSLD_THREADS``, else the CPUs available to this rank); returns the count."""
    if threads is None:
        threads = _env_threads()
    if threads is None:
        threads = cpus_per_rank(dist or Dist.from_env())
    if int(threads) < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    threads = int(threads)
    # read when torch or OpenBLAS load later, and inherited by DataLoader workers
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ["OPENCV_FOR_THREADS_NUM"] = str(threads)   # OpenCV reads it when it loads
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    if "cv2" in sys.modules:
        sys.modules["cv2"].setNumThreads(threads)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - scikit-learn brings it
        pass
    else:
        threadpool_limits(threads)  # BLAS / OpenMP libraries already loaded (numpy's)
    return threads


def _env_threads() -> int | None:
    value = os.environ.get(ENV_THREADS, "").strip()
    if not value:
        return None
    threads = int(value) if value.isdigit() else 0
    if threads < 1:
        raise ValueError(f"{ENV_THREADS}={value!r}: must be a whole number of threads >= 1 "
                         "(or unset: the CPUs available per rank)")
    return threads
