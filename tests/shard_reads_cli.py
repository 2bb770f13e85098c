"""``ssld`` with every byte range read from a shard recorded, for tests/test_shards_pipeline.py.

Run as ``python tests/shard_reads_cli.py ARGS`` (or under torchrun) with ``SSLD_TEST_READS``
naming a folder: at exit each process writes ``reads.RANK.json``, the list of
``[path, start, stop]`` it read through ``teacher_infer.shards._storage.RangeFile`` (every
shard read: listing, and the rows' byte ranges). Run with ``--num-workers 0``: DataLoader
workers would read in other processes.
"""
from __future__ import annotations

import atexit
import json
import os
import sys

from teacher_infer.shards import _storage

READS: list[tuple[str, int, int]] = []
_read = _storage.RangeFile.read


def _recorded(self, start: int, stop: int) -> bytes:
    data = _read(self, start, stop)
    READS.append((self.path, start, start + len(data)))
    return data


def _dump() -> None:
    path = os.path.join(os.environ["SSLD_TEST_READS"], f"reads.{os.environ.get('RANK', '0')}.json")
    with open(path, "w") as handle:
        json.dump(READS, handle)


if __name__ == "__main__":
    _storage.RangeFile.read = _recorded
    atexit.register(_dump)
    from cli import main

    sys.exit(main(sys.argv[1:]))
