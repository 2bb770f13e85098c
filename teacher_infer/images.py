"""Image bytes by store key: image files and samples of tar shards through one reader.

Every row of a store, and every sample of a data source, names its image by its *key*
below a root (the store's ``dataset.root``) and, when the image lies in a WebDataset tar
shard, by its ``tar`` row (``labelstore.TAR_FIELDS``: the image member's byte offset and
size, and its shard's size and stamp when listed; docs/format.md, "Stores of shard data").
:class:`ImageSource` reads either: a row whose offset is -1 (or that has no ``tar`` row)
is the file ``root/key``; any other row is the byte range of the shard its key names
(``teacher_infer.shards``: the shard's size and stamp compared before its first read, the
tar header in front of every range checked), so the rows of a store merged from a folder
and from shards read alike. Consecutive rows of one shard are read as one sequential
range (:meth:`ImageSource.read_many`).

The teacher pass's workers (``imaging.ViewDataset``, both decoders), mixing partners
(``imaging.augment``), training and ``ssld eval`` (``student_train``), ``ssld verify``'s
recomputation and dedup's SIFT stage all read images here. Errors are ``OSError``
(``FileNotFoundError`` for a missing file or shard, ``shards.ShardReadError`` for a shard
that changed or does not hold the indexed member): a failed row, never another image's
bytes. No torch here.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import numpy as np

from .shards import ShardReader, ShardReadError, split_key
from .shards import _storage

NOT_IN_SHARD = -1   # the tar offset of a row that is an image file


def in_shard(tar_row: Any) -> bool:
    """Whether a ``tar`` row locates an image in a shard (offset not -1)."""
    return tar_row is not None and int(tar_row[0]) != NOT_IN_SHARD


class ImageSource:
    """The images below ``root`` (a local folder or an fsspec URL), by key.

    ``stamps=False`` compares a shard's size only, not its stamp (modification time or
    ETag): for shards copied without their times (``cp`` without ``-p``), at the cost of
    not noticing a shard rewritten in place at the same size (each row's tar header is
    still checked). Picklable; each thread, and each process (DataLoader workers, forked or
    spawned), opens its own shard files.

    Examples
    --------
    >>> images = ImageSource(store.attrs["dataset"]["root"])          # doctest: +SKIP
    >>> data = images.read(store.keys[7], store.read_tar(7)[0])       # doctest: +SKIP
    """

    def __init__(self, root: str, *, stamps: bool = True):
        self.root = _storage.normalize(str(root))
        self.stamps = stamps
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"<ImageSource {self.root!r}{'' if self.stamps else ' (sizes only)'}>"

    def __getstate__(self) -> dict:
        return {"root": self.root, "stamps": self.stamps}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def path(self, key: str) -> str:
        """Where the image of ``key`` is (the file, or the shard's path + ``/`` + sample key):
        what messages and failure lists name."""
        return _storage.join(self.root, str(key))

    def _reader(self) -> ShardReader:
        reader = getattr(self._local, "reader", None)
        # one per thread and per process: a ShardReader serves one thread, and a forked
        # worker must not share its parent's connections to object storage
        if reader is None or self._local.pid != os.getpid():
            reader = self._local.reader = ShardReader(self.root)
            self._local.pid = os.getpid()
        return reader

    def _located(self, tar_row: Any) -> list[int]:
        row = [int(v) for v in tar_row]
        if not self.stamps:
            row[3] = 0  # a stamp of 0: the reader compares the size only
        return row

    def read(self, key: str, tar_row: Any = None) -> bytes:
        """The image bytes of ``key`` (with its ``tar`` row when it has one)."""
        if not in_shard(tar_row):
            return self._read_file(key)
        try:
            return self._reader().read(key, self._located(tar_row))
        except ValueError as exc:  # a key that names no shard: the row is damaged
            raise ShardReadError(f"{key}: {exc}") from None

    def _read_file(self, key: str) -> bytes:
        path = self.path(key)
        if not _storage.is_remote(path):
            with open(path, "rb") as handle:
                return handle.read()
        try:
            return _storage.read_bytes(path)
        except ValueError as exc:  # a storage client's error: this row fails
            raise OSError(str(exc)) from None

    def read_many(self, keys: Sequence[str], tar: np.ndarray | None = None
                  ) -> list[tuple[bytes | None, OSError | None]]:
        """``(bytes, None)`` or ``(None, error)`` per key, in order. The shard rows among
        them go to the shard reader together, so consecutive rows of one shard (a store
        chunk of the teacher pass) are one sequential range read in large blocks
        (``ShardReader.read_many``; docs/benchmarks.md, "Shards")."""
        out: list[tuple[bytes | None, OSError | None]] = [(None, None)] * len(keys)
        sharded = [] if tar is None else [i for i in range(len(keys)) if in_shard(tar[i])]
        for i in sorted(set(range(len(keys))) - set(sharded)):
            try:
                out[i] = (self._read_file(keys[i]), None)
            except OSError as exc:
                out[i] = (None, exc)
        if sharded:
            rows = np.array([self._located(tar[i]) for i in sharded], dtype=np.int64)
            try:
                found = self._reader().read_many([str(keys[i]) for i in sharded], rows)
                for j, data, error in found:
                    out[sharded[j]] = (data, error)
            except ValueError:  # a key that names no shard: each row on its own
                for i in sharded:
                    try:
                        out[i] = (self.read(keys[i], tar[i]), None)
                    except OSError as exc:
                        out[i] = (None, exc)
        return out

    def problems(self, keys: Sequence[str], tar: np.ndarray | None = None, *,
                 rows: Sequence[int] | None = None, limit: int = 3) -> tuple[int, list[str]]:
        """What stops ``rows`` (default: all) from being read, before any is: the number of
        images missing and up to ``limit`` examples. Files are looked for one by one; shards
        once each, by one listing per folder (a missing shard counts its rows; a shard whose
        size or stamp differs from the rows' — changed since it was indexed — counts them
        too, its example saying so)."""
        rows = range(len(keys)) if rows is None else rows
        missing, examples = 0, []
        shards: dict[tuple[str, int, int], list[int]] = {}
        files = []
        for i in rows:
            if tar is None or not in_shard(tar[i]):
                files.append(self.path(keys[i]))
                continue
            size, stamp = int(tar[i][2]), int(tar[i][3]) if self.stamps else 0
            try:
                shard = split_key(str(keys[i]))[0]
            except ValueError as exc:
                missing += 1
                examples.append(str(exc))
                continue
            shards.setdefault((shard, size, stamp), []).append(i)
        if files:  # threads hide a network file system's latency
            with ThreadPoolExecutor(max_workers=16) as pool:
                found = list(pool.map(_exists, files, chunksize=256))
            absent = [path for path, ok in zip(files, found) if not ok]
            missing += len(absent)
            examples += absent[:limit]
        if shards:
            from .shards._source import stat_shards

            names = sorted(shards)
            found = stat_shards([_storage.join(self.root, name) for name, _, _ in names])
            for (name, size, stamp), now in zip(names, found):
                problem = None
                if now is None:
                    problem = f"shard {_storage.join(self.root, name)} is missing"
                elif now[0].size != size or (stamp and now[0].stamp != stamp):
                    what = (f"size {size:,} -> {now[0].size:,} bytes" if now[0].size != size
                            else "modification time" if not _storage.is_remote(self.root)
                            else "ETag")
                    problem = (f"shard {_storage.join(self.root, name)} changed since it was "
                               f"indexed ({what})")
                if problem:
                    missing += len(shards[(name, size, stamp)])
                    if len(examples) < limit:
                        examples.append(problem)
        return missing, examples[:limit]

    def close(self) -> None:
        """Close this thread's open shard files."""
        reader = getattr(self._local, "reader", None)
        if reader is not None:
            reader.close()


def _exists(path: str) -> bool:
    if not _storage.is_remote(path):
        return os.path.isfile(path)
    try:
        _storage.stat(path)
    except (OSError, ValueError):
        return False
    return True


def root_problem(root: str | None) -> str | None:
    """Why ``root`` cannot hold a store's images (None: it can): not recorded, or a local
    path that is no folder. A URL is taken as it is (its objects are read when needed)."""
    if not root:
        return "records no dataset root"
    if _storage.is_remote(str(root)):
        return None
    return None if os.path.isdir(str(root)) else f"its image root {root} is not a folder here"
