"""Whether a root holds a store's images, checked before the work that reads them.

``dedup``'s SIFT stage and ``verify``'s teacher check read images at ``root + key`` (a file,
or the row's byte range of its tar shard). A root that is not the one the keys are relative
to (a typo, the parent folder, another copy) used to surface only at the end, as every image
"unreadable": a near-empty exclude list with exit status 0, or a verification failed on every
row. Here a sample of the rows is looked up first (files, shards and their recorded size and
stamp, through ``teacher_infer.ImageSource``) and such a root is refused in one line naming
the option.
"""
from __future__ import annotations

import numpy as np

from .images import ImageSource, root_problem

SAMPLE = 64            # rows looked up (evenly spread over the rows, valid rows only)
MIN_FOUND = 0.5        # fewer of them found than this: the root does not hold the images


def check_image_root(root: str, store, *, option: str, given: bool,
                     name: str | None = None) -> None:
    """Raise unless ``root`` (a folder, or a URL) holds the images of most sampled valid rows
    of ``store`` (a ``LabelStore``). ``option`` names the option (``--pool-root``);
    ``given``: the user passed it (else it is the store's recorded ``dataset.root``); ``name``
    how messages call the store (default: ``the store PATH``)."""
    name = name or f"the store {store.path}"
    where = f"{option} {root}" if given else f"the dataset root {root} recorded by {name}"
    fix = (f"pass the folder the keys of {name} are relative to" if given else
           f"pass {option} with the folder its keys are relative to")
    problem = root_problem(root)
    if problem:
        raise FileNotFoundError(f"{where} is not a folder here; {fix}")
    rows = np.flatnonzero(store.valid)
    if not len(rows):
        return
    picked = rows[np.unique(np.linspace(0, len(rows) - 1, min(SAMPLE, len(rows))).astype(int))]
    keys = [str(key) for key in store.keys[picked]]
    tar = store.read_tar(picked) if store.tar_fields else None
    missing, examples = ImageSource(str(root)).problems(keys, tar, limit=1)
    if len(picked) - missing < MIN_FOUND * len(picked):
        raise ValueError(f"{where} does not hold the images of {name}: {missing} of "
                         f"{len(picked)} sampled rows are not there (e.g. {examples[0]}); "
                         f"{fix}")
