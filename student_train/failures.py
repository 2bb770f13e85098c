"""Images that cannot be read during training: left out, counted and listed, or the run stops.

The teacher pass never loses a batch to one bad file: the row is marked invalid and listed in
``STORE/failed.txt``. Training does the same with the images it meets (a file damaged or
replaced since the teacher read it, a validation image): the DataLoader workers do not raise
for it — a worker's exception reaches the main process as a whole traceback inside one
message, mid-epoch — but return the sample marked as failed; :class:`BadImages` drops it from
its batch in the main process (or, with ``--bad-images stop``, ends the run with one line
naming the file), and after every epoch :class:`FailedFile` on rank 0 lists every image left
out so far in ``RUN_DIR/failed.txt`` (``path<TAB>reason``, the teacher pass's format).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from labelstore import read_lines

from . import distributed as D
from .config import BAD_IMAGES

POLICIES = BAD_IMAGES
FAILED_FILE = "failed.txt"


class UnreadableImage(ValueError):
    """An image a sample needs cannot be decoded (``reason`` as failed.txt gives it)."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"cannot decode {path}: {reason}")
        self.path, self.reason = path, reason


class BadImages:
    """The main process's side: which rows of a batch to keep, and what was left out.

    Samples carry ``""`` when fine and ``"path<TAB>reason"`` when their image failed (paths
    cannot hold a tab: ``labelstore.KEY_RULE``).
    """

    def __init__(self, policy: str = "skip", *, hint: str = ""):
        if policy not in POLICIES:
            raise ValueError(f"--bad-images must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.policy, self.hint = policy, hint     # hint: what the stop message adds
        self.left_out: list[tuple[str, str]] = []   # since the last drain, one per occurrence

    def keep(self, failures: Sequence[str]) -> Optional[torch.Tensor]:
        """Boolean mask of the rows to keep, or None when every row is fine."""
        bad = [i for i, failure in enumerate(failures) if failure]
        if not bad:
            return None
        for i in bad:
            path, _, reason = failures[i].partition("\t")
            if self.policy == "stop":
                raise UnreadableImage(path, reason + self.hint)
            self.left_out.append((path, reason))
        mask = torch.ones(len(failures), dtype=torch.bool)
        mask[bad] = False
        return mask

    def drain(self) -> list[tuple[str, str]]:
        left_out, self.left_out = self.left_out, []
        return left_out


class FailedFile:
    """``RUN_DIR/failed.txt`` on rank 0: every image left out so far, with its latest reason
    (kept across ``--resume``; a fresh run starts it anew)."""

    def __init__(self, run_dir: str, *, resume: bool):
        self.path = os.path.join(run_dir, FAILED_FILE)
        self.reasons: dict[str, str] = {}
        if resume and os.path.exists(self.path):
            for line in read_lines(self.path, "failures file"):
                path, _, reason = line.partition("\t")
                self.reasons[path] = reason
        elif os.path.exists(self.path):
            os.remove(self.path)  # a run that died before its first checkpoint left it

    def __len__(self) -> int:
        return len(self.reasons)

    def add(self, left_out: list[tuple[str, str]]) -> None:
        if not left_out:
            return
        self.reasons.update(left_out)
        tmp = f"{self.path}.tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.writelines(f"{path}\t{reason}\n" for path, reason in self.reasons.items())
        os.replace(tmp, self.path)


def gather_left_out(bad: BadImages, failed: Optional[FailedFile], env: D.DistEnv) -> int:
    """Every rank's images left out since the last call, listed by rank 0; returns how many
    samples (all ranks) were left out."""
    every = [pair for part in D.all_gather(bad.drain(), env) for pair in part]
    if failed is not None:
        failed.add(every)
    return len(every)
