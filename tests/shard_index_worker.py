"""``build_index`` under torchrun, for tests/test_shards.py: ``SOURCE OUT``; prints each
rank's count of shards listed, and rank 0 the summary."""
from __future__ import annotations

import sys

import torch

from teacher_infer.runtime import Dist
from teacher_infer.shards import build_index


def main() -> int:
    dist = Dist.from_env()
    dist.init(torch.device("cpu"))
    try:
        result = build_index(sys.argv[1], sys.argv[2], dist=dist)
    except (ValueError, OSError) as exc:
        print(f"rank {dist.rank}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        dist.close()
    if dist.is_main:
        print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
