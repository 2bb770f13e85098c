"""The progress bar of listing and indexing (tqdm on stderr, or a silent stand-in)."""
from __future__ import annotations

import sys


def bar(enabled: bool, total: int, desc: str, unit: str):
    """A tqdm bar with throughput and ETA; redrawn rarely when stderr is a log file."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=False,
                dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 30.0)
