"""The configuration of ``ssld index`` (no torch import here): every option is a field, with
its default, through ``config_option``."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class IndexConfig:
    """What ``teacher_infer.shards.index(cfg)`` builds: the kept index of a shard source."""

    data: str                            # the shards: pattern, glob, folder, URL, index file
    out: str                             # the index folder (local or fsspec URL); resumable
    dali_index: bool = True              # list a shard from its DALI .idx when it has one
    # shards listed at once per rank; None: 16 on object storage (ranged GETs), 1 locally
    listing_threads: int | None = None
    progress: bool = True                # tqdm bar on rank 0

    def __post_init__(self) -> None:
        if not str(self.data).strip():
            raise ValueError("--data is empty: give the shards (pattern, folder, URL or index)")
        if not str(self.out).strip():
            raise ValueError("--out is empty: give the index folder to write")
        if self.listing_threads is not None and int(self.listing_threads) < 1:
            raise ValueError(f"--listing-threads must be >= 1, got {self.listing_threads}")
