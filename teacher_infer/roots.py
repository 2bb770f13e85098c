"""Whether a folder holds a store's images, checked before the work that reads them.

``dedup``'s SIFT stage and ``verify``'s teacher check read images at ``root + key``. A root
that is not the folder the keys are relative to (a typo, the parent folder, another copy)
used to surface only at the end, as every image "unreadable": a near-empty exclude list
with exit status 0, or a verification failed on every row. Here a sample of the keys is
looked up first and such a root is refused in one line naming the option.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

SAMPLE = 64            # keys looked up (evenly spread over the rows, valid rows only)
MIN_FOUND = 0.5        # fewer of them on disk than this: the root does not hold the keys


def check_image_root(root: str, keys: Sequence[str], valid: np.ndarray | None, *,
                     option: str, store: str, given: bool) -> None:
    """Raise unless ``root`` is a folder under which most sampled keys (of valid rows) are
    files. ``option`` names the option (``--pool-root``); ``given``: the user passed it
    (else it is the store's recorded ``dataset.root``); ``store`` names the store."""
    where = f"{option} {root}" if given else f"the dataset root {root} recorded by {store}"
    fix = (f"pass the folder the keys of {store} are relative to" if given else
           f"pass {option} with the folder its keys are relative to")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{where} is not a folder here; {fix}")
    rows = np.arange(len(keys)) if valid is None else np.flatnonzero(valid)
    if not len(rows):
        return
    picked = rows[np.unique(np.linspace(0, len(rows) - 1, min(SAMPLE, len(rows))).astype(int))]
    paths = [os.path.join(root, *str(keys[row]).split("/")) for row in picked]
    missing = [path for path in paths if not os.path.isfile(path)]
    if len(paths) - len(missing) < MIN_FOUND * len(paths):
        raise ValueError(f"{where} does not hold the images of {store}: {len(missing)} of "
                         f"{len(paths)} sampled keys are not there (e.g. {missing[0]}); {fix}")
