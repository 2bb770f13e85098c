"""``ssld`` under torchrun with ranks out of step, for the multi-rank reliability tests.

Run as ``python -m torch.distributed.run --nproc_per_node N tests/chaos_cli.py ARGS``
(with the repository on PYTHONPATH). Environment variables choose the trouble:

``CHAOS_HOLD_RANK=r``   after its first barrier, rank r waits until some other rank has
                        finished a chunk of ``--out`` (a rank on a loaded machine, or a
                        host whose start-up was slower): a plan re-read from the store at
                        that point differs from the other ranks' plans.
``CHAOS_DELAY_SEED=s``  every rank first sleeps a random 0–``CHAOS_MAX_DELAY`` (default
                        2) seconds drawn from (s, rank).
``CHAOS_KILL_RANK=r``   rank r kills itself with SIGKILL right after writing
``CHAOS_KILL_AFTER``    (default 1) chunks.
"""
from __future__ import annotations

import os
import random
import signal
import sys
import time


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _out(argv: list[str]) -> str:
    return argv[argv.index("--out") + 1]


def _hold_until_a_chunk_is_done(out: str, timeout: float = 240.0) -> None:
    import numpy as np
    import zarr

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if np.asarray(zarr.open_group(out, mode="r")["done"][:]).any():
                return
        except Exception:  # noqa: BLE001 - the store may be mid-creation
            pass
        time.sleep(0.05)


def main() -> int:
    argv = sys.argv[1:]
    rank = _rank()
    seed = os.environ.get("CHAOS_DELAY_SEED")
    if seed is not None:
        rng = random.Random(f"{seed}:{rank}")
        time.sleep(rng.uniform(0.0, float(os.environ.get("CHAOS_MAX_DELAY", "2"))))

    if os.environ.get("CHAOS_HOLD_RANK") == str(rank):
        from teacher_infer.runtime import Dist

        barrier = Dist.barrier
        held = []

        def held_barrier(self) -> None:
            barrier(self)
            if not held:
                held.append(True)
                _hold_until_a_chunk_is_done(_out(argv))

        Dist.barrier = held_barrier

    if os.environ.get("CHAOS_KILL_RANK") == str(rank):
        from labelstore._writer import LabelStoreWriter

        flush = LabelStoreWriter._flush
        after = int(os.environ.get("CHAOS_KILL_AFTER", "1"))
        flushed = []

        def dying_flush(self, first, stop, data) -> None:  # chunk by chunk, to die between
            base = self.chunk_range(first)[0]
            for chunk in range(first, stop):
                lo, hi = self.chunk_range(chunk)
                flush(self, chunk, chunk + 1,
                      {name: value[lo - base:hi - base] for name, value in data.items()})
                flushed.append(chunk)
                if len(flushed) >= after:
                    os.kill(os.getpid(), signal.SIGKILL)

        LabelStoreWriter._flush = dying_flush

    from cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
