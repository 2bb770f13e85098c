"""Reading a row's image bytes from its shard by byte range.

A row is located by its store key (``SHARD/KEY``: the shard is the key up to its first
path component ending in ``.tar``) and its ``tar`` fields (the image's data offset and
size, the shard's size and stamp when it was listed: ``TAR_FIELDS``), so rows of a
merged or selected store are read the same way as the teacher pass's own.

Before the first read from a shard its size and stamp are compared with the row's
(``fstat`` of the open file locally, one HEAD on object storage); every read takes the
512-byte tar header in front of the image too and checks that it is that image's header
(name, size, checksum: ``_tar.member_problem``). A row whose shard is missing, changed
or does not hold its image at the indexed bytes raises :class:`ShardReadError` — an
``OSError``, which the teacher pass's workers turn into a failed row — and another
image's bytes are never returned for it.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Iterator, Sequence

import numpy as np

from . import _storage
from ._tar import BLOCK, member_problem

BLOCK_BYTES = 8 << 20   # one read of a sequential run (a run is read block after block)
MAX_GAP = 1 << 20       # rows closer than this in one shard are read as one run
MAX_OPEN = 64           # shard files kept open per reader


class ShardReadError(OSError):
    """A row's image cannot be read from its shard as indexed (the message says why; the
    row fails, the run goes on). ``lasting``: the shard is missing or changed, so every
    row of it will fail the same way (not a passing error of the storage)."""

    def __init__(self, message: str, *, lasting: bool = True):
        super().__init__(message)
        self.lasting = lasting

    def __reduce__(self):  # DataLoader workers send errors to the main process pickled
        return (_read_error, (str(self), self.lasting))


def _read_error(message: str, lasting: bool) -> "ShardReadError":
    return ShardReadError(message, lasting=lasting)


def split_key(key: str) -> tuple[str, str]:
    """(shard name, sample key) of a store key: the shard is the key up to its first
    path component ending in ``.tar``.

    >>> split_key("train/imagenet22k-train-0001.tar/n01440764_10026")
    ('train/imagenet22k-train-0001.tar', 'n01440764_10026')
    """
    at = key.find(".tar/")  # the first component ending in .tar that is not the last
    if at < 0 or at + 5 == len(key):
        raise ValueError(f"key {key!r} names no shard (no path component ending in .tar "
                         "before the sample key)")
    return key[:at + 4], key[at + 5:]


class ShardReader:
    """Image bytes of shard rows below ``root`` (a local folder or an fsspec URL: the
    ``dataset.root`` of the store or of the ``ShardSamples``).

    >>> reader = ShardReader("/data/in22k")                           # doctest: +SKIP
    >>> data = reader.read(store.keys[7], tar[7])                     # doctest: +SKIP

    Picklable (open files are not carried): DataLoader workers each get their own; one
    reader serves one thread.
    """

    def __init__(self, root: str, *, runs: bool = True, block_bytes: int = BLOCK_BYTES,
                 max_gap: int = MAX_GAP, max_open: int = MAX_OPEN):
        self.root = _storage.normalize(str(root))
        self.runs = runs  # read_many: consecutive rows of a shard as one sequential range
        self.block_bytes, self.max_gap, self.max_open = block_bytes, max_gap, max_open
        self._files: OrderedDict[tuple[str, int, int], Any] = OrderedDict()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_files"] = OrderedDict()
        return state

    def __repr__(self) -> str:
        return f"<ShardReader {self.root!r} ({len(self._files)} shards open)>"

    def close(self) -> None:
        for entry in self._files.values():
            if isinstance(entry, _storage.RangeFile):
                entry.close()
        self._files.clear()

    def _file(self, shard: str, size: int, stamp: int) -> _storage.RangeFile:
        """The open shard, checked once against the size and stamp rows carry. A shard that
        changed keeps failing (its error is kept); one that could not be opened is tried
        again by the next row (a network error may pass)."""
        slot = (shard, size, stamp)
        entry = self._files.get(slot)
        if entry is None:
            entry = self._open(shard, size, stamp)
            if isinstance(entry, ShardReadError) and not entry.lasting:
                raise entry
            self._files[slot] = entry
            if len(self._files) > self.max_open:
                _, old = self._files.popitem(last=False)
                if isinstance(old, _storage.RangeFile):
                    old.close()
        else:
            self._files.move_to_end(slot)
        if isinstance(entry, ShardReadError):
            raise entry
        return entry

    def _open(self, shard: str, size: int, stamp: int) -> "_storage.RangeFile | ShardReadError":
        path = _storage.join(self.root, shard)
        try:
            handle = _storage.RangeFile(path)
            info = handle.info()
        except FileNotFoundError:
            return ShardReadError(f"shard {shard} is missing ({path})")
        except (OSError, ValueError) as exc:
            return ShardReadError(f"shard {shard} cannot be opened: {exc}", lasting=False)
        changed = []
        if info.size != size:
            changed.append(f"size {size:,} -> {info.size:,} bytes")
        if stamp and info.stamp != stamp:
            changed.append("modification time" if not _storage.is_remote(path) else "ETag")
        if changed:
            handle.close()
            return ShardReadError(f"shard {shard} changed since it was indexed "
                                  f"({', '.join(changed)}); index it again")
        return handle

    def read(self, key: str, tar_row: Sequence[int]) -> bytes:
        """The image bytes of the row with store key ``key`` and ``tar`` fields ``tar_row``.
        ShardReadError when they cannot be read as indexed; ValueError for a row that is
        no shard row (offset -1: an image file of a folder store)."""
        shard, sample = split_key(key)
        offset, size, shard_size, stamp = _fields(key, tar_row)
        handle = self._file(shard, shard_size, stamp)
        try:
            header, data = handle.read_member(offset, size)
        except (OSError, ValueError) as exc:
            raise ShardReadError(f"shard {shard}: {sample}: {exc}", lasting=False) from None
        return _checked(header, data, shard, sample, size)

    def read_many(self, keys: Sequence[str], tar: np.ndarray
                  ) -> Iterator[tuple[int, bytes | None, ShardReadError | None]]:
        """``(i, bytes, None)`` or ``(i, None, error)`` for every row ``i``, in order.

        With ``runs`` (the default), consecutive rows of one shard less than ``max_gap``
        bytes apart (a store chunk of the teacher pass: contiguous rows) are read as one
        sequential range, in reads of ``block_bytes`` — one ranged GET each on object
        storage instead of a request per image, and on local disks the faster way to read
        data that is not in the page cache; other rows are read one by one. ``runs=False``
        reads every row by itself: faster when the shards are in the page cache, slower
        from disk (docs/benchmarks.md, Shards). One damaged member fails its row only.
        """
        rows = np.asarray(tar, dtype=np.int64).tolist()
        runs = self._runs(keys, rows) if self.runs else ([i] for i in range(len(rows)))
        for run in runs:
            if len(run) > 1:
                yield from self._read_run(keys, rows, run)
                continue
            try:
                yield run[0], self.read(keys[run[0]], rows[run[0]]), None
            except ShardReadError as exc:
                yield run[0], None, exc

    def _runs(self, keys: Sequence[str], rows: list[list[int]]) -> Iterator[list[int]]:
        run: list[int] = []
        where, end = None, 0
        for i, key in enumerate(keys):
            offset, size, shard_size, stamp = _fields(key, rows[i])
            here = (split_key(key)[0], shard_size, stamp)
            if run and (here != where or not 0 <= offset - BLOCK - end <= self.max_gap):
                yield run
                run = []
            run.append(i)
            where, end = here, offset + size
        if run:
            yield run

    def _read_run(self, keys: Sequence[str], rows: list[list[int]], run: list[int]
                  ) -> Iterator[tuple[int, bytes | None, ShardReadError | None]]:
        shard = split_key(keys[run[0]])[0]
        stop = rows[run[-1]][0] + rows[run[-1]][1]
        try:
            handle = self._file(shard, rows[run[0]][2], rows[run[0]][3])
        except ShardReadError as exc:
            for i in run:
                yield i, None, exc
            return
        start, buffer = 0, b""
        for i in run:
            offset, size = rows[i][0], rows[i][1]
            lo, hi = offset - BLOCK, offset + size
            if hi > start + len(buffer):  # rows go forward: the next read starts here
                try:
                    start, buffer = lo, handle.read(lo, min(stop, max(hi, lo + self.block_bytes)))
                except (OSError, ValueError) as exc:
                    start, buffer = lo, b""
                    yield i, None, ShardReadError(f"shard {shard}: {exc}", lasting=False)
                    continue
            try:
                yield i, _checked(buffer[lo - start:offset - start],
                                  buffer[offset - start:hi - start], shard,
                                  split_key(keys[i])[1], size), None
            except ShardReadError as exc:
                yield i, None, exc


def _fields(key: str, tar_row: Sequence[int]) -> tuple[int, int, int, int]:
    offset, size, shard_size, stamp = (tar_row.tolist() if isinstance(tar_row, np.ndarray)
                                       else tar_row)
    if offset < BLOCK or size < 0:
        raise ValueError(f"row {key!r} has no shard location (offset {offset}): it is not a "
                         "sample of a shard")
    return int(offset), int(size), int(shard_size), int(stamp)


def _checked(header: bytes, data: bytes, shard: str, sample: str, size: int) -> bytes:
    """``data`` after checking that ``header`` is its member's header."""
    if len(header) < BLOCK or len(data) < size:
        raise ShardReadError(f"shard {shard}: {sample}: the shard ends before the indexed "
                             "bytes (truncated)")
    problem = member_problem(header, sample, size)
    if problem:
        raise ShardReadError(f"shard {shard}: {sample}: {problem}")
    return data
