"""The CPU threads of a command that computes (the ``--threads N`` option is in cli_options.py).

torch, OpenBLAS (under numpy) and OpenCV each start one thread per core by default. When the
cores are shared with other jobs, those threads wait for each other at every parallel region:
on a 2-core machine with one other CPU-bound process, a resnet18 training step at 32 px ran at
7 images/s with 2 torch threads and at 168 with 1 (README, "Quickstart"). One thread is the
default because it is many times faster on a shared machine and at most ~1.4× slower on an idle
one; raise it on a machine of your own.
"""
from __future__ import annotations

import os
import sys

DEFAULT_THREADS = 1


def set_threads(threads: int) -> int:
    """Use ``threads`` CPU threads in this process (and in processes it starts)."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
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

