"""The ``keys`` array's chunks, built and read with numpy instead of one Python object per key.

zarr stores ``keys`` with the ``vlen-utf8`` codec: a chunk of m keys is a little-endian uint32
count m, then per key its uint32 UTF-8 length and its bytes; then the array's bytes codecs
(Blosc, crc32c) as its metadata lists them (applied by ``_chunks``). Through zarr a write
converts every key between numpy string dtypes and Python objects several times and encodes
it one by one, about 1 µs per key; here all keys are joined and encoded once (one C call) and
each chunk is laid out with a few numpy operations, then compressed and checksummed with the
codecs of the array's own metadata and put on the store, chunks concurrently. The stored bytes
are those zarr writes (the tests compare them), so zarr, xarray and every earlier reader read
these stores as before. Arrays with other codecs go through zarr unchanged.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from . import _chunks
from ._chunks import THREADS, BytesCodecs, chunk_keys, put

_NEWLINE = 10
_PRINTABLE_ASCII = bytes(range(0x20, 0x7F)) + b"\n"


@dataclass(frozen=True)
class JoinedKeys:
    """Keys as one UTF-8 buffer, each key followed by a newline (keys never contain one):
    exactly the bytes whose sha256 is the store's key fingerprint."""

    raw: bytes          # the UTF-8 text
    data: np.ndarray    # the same bytes as uint8 (no copy)
    ends: np.ndarray    # (n,) int64: key i is data[ends[i - 1] : ends[i] - 1] (ends[-1] = 0)
    ascii: bool         # every key is ASCII

    @classmethod
    def of(cls, keys: Sequence[str]) -> "JoinedKeys":
        text = "\n".join(keys) + "\n"
        raw = text.encode("utf-8")
        data = np.frombuffer(raw, dtype=np.uint8)
        ends = np.flatnonzero(data == _NEWLINE) + 1
        if len(ends) != len(keys):
            raise ValueError("a key contains a newline")  # check_keys refuses them earlier
        return cls(raw, data, ends, text.isascii())  # isascii: O(1) on CPython's str

    def __len__(self) -> int:
        return len(self.ends)

    def lengths(self) -> np.ndarray:
        """(n,) UTF-8 length of every key."""
        return np.diff(self.ends, prepend=0) - 1

    def plain_ascii(self) -> bool:
        """True when every key is printable ASCII without a space at either end: fit for
        the text files keys go into (``_text.key_problem`` finds nothing), judged on the
        joined bytes in one C pass instead of per key. False says nothing either way."""
        if not self.ascii or self.raw.translate(None, _PRINTABLE_ASCII):
            return False
        starts = self.ends - self.lengths() - 1
        return not (np.any(self.data[starts] == 0x20) or np.any(self.data[self.ends - 2] == 0x20))

    def fingerprint(self) -> str:
        """``_format.fingerprint`` of these keys (sha256 of the keys, one per line)."""
        import hashlib

        return hashlib.sha256(self.raw).hexdigest()

    def chunk(self, lo: int, hi: int, size: int) -> bytes:
        """The vlen-utf8 encoding of a chunk of ``size`` entries holding keys [lo, hi):
        zarr pads the last chunk of an array with fill values (empty strings)."""
        start = int(self.ends[lo - 1]) if lo else 0
        stop = int(self.ends[hi - 1]) if hi > lo else start
        ends = self.ends[lo:hi] - start
        lengths = (np.diff(ends, prepend=0) - 1).astype("<u4")
        text = self.data[start:stop]
        m = hi - lo
        out = np.empty(4 + 4 * m + len(text) - m, dtype=np.uint8)
        out[:4] = np.array([size], dtype="<u4").view(np.uint8)
        # length field j starts after the header, j earlier fields and keys 0..j-1's bytes
        fields = 4 + 4 * np.arange(m) + (ends - lengths - 1 - np.arange(m))
        is_field = np.zeros(len(out), dtype=bool)
        is_field[(fields[:, None] + np.arange(4)).ravel()] = True
        is_field[:4] = True
        out[4:][is_field[4:]] = lengths.view(np.uint8)
        out[~is_field] = text[text != _NEWLINE]
        return out.tobytes() + bytes(4 * (size - m))   # padding: entries of length 0


def _fast_codecs(array) -> BytesCodecs | None:
    """The array's bytes codecs when its chunks can take the fast path, else None (also on a
    zarr release the fast path is not tested with: ``_chunks.TESTED_ZARR``)."""
    from zarr.codecs import VLenUTF8Codec

    if not _chunks.FAST_PATH:
        return None
    metadata = array.metadata
    if getattr(metadata, "zarr_format", None) != 3 or len(array.shape) != 1:
        return None
    codecs = list(metadata.codecs)
    if not codecs or not isinstance(codecs[0], VLenUTF8Codec):
        return None
    try:
        return BytesCodecs(codecs[1:])
    except TypeError:
        return None


def write(array, keys: JoinedKeys) -> None:
    """Store every chunk of the 1-D vlen-utf8 ``array`` from ``keys`` (its whole length)."""
    if len(keys) != array.shape[0]:
        raise ValueError(f"{len(keys)} keys for an array of {array.shape[0]}")
    codecs = _fast_codecs(array)
    if codecs is None:
        array[:] = np.array(_split(keys), dtype=object)
        return
    rows = int(array.chunks[0])
    count = (len(keys) + rows - 1) // rows
    with ThreadPoolExecutor(THREADS) as pool:
        encoded = list(pool.map(
            lambda c: codecs.encode(keys.chunk(c * rows, min((c + 1) * rows, len(keys)), rows)),
            range(count)))
    put(array, range(count), encoded)


def _split(keys: JoinedKeys) -> list[str]:
    return keys.raw.decode("utf-8").split("\n")[:-1]


def read(array, lo: int, hi: int) -> np.ndarray:
    """Keys [lo, hi) of the 1-D vlen-utf8 ``array`` as an object array of str."""
    codecs = _fast_codecs(array)
    if codecs is None:
        return np.asarray(array[lo:hi], dtype=object)
    from numcodecs import VLenUTF8
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    lo, hi = max(0, lo), min(hi, array.shape[0])
    if hi <= lo:
        return np.empty(0, dtype=object)
    rows = int(array.chunks[0])
    chunks = range(lo // rows, (hi - 1) // rows + 1)
    store = array.store_path.store
    prototype = default_buffer_prototype()

    async def get_all():
        return await asyncio.gather(*(store.get(key, prototype=prototype)
                                      for key in chunk_keys(array, chunks)))

    vlen = VLenUTF8()

    def decode(chunk: int, buffer) -> np.ndarray:
        size = min(rows, array.shape[0] - chunk * rows)
        if buffer is None:  # never written (stores before the integrity attribute)
            return np.full(size, array.metadata.fill_value or "", dtype=object)
        return vlen.decode(codecs.decode(buffer.to_bytes()))[:size]

    buffers = sync(get_all())
    if len(buffers) == 1:
        parts = [decode(chunks[0], buffers[0])]
    else:  # Blosc and crc32c release the GIL: two chunks decompress at once
        with ThreadPoolExecutor(THREADS) as pool:
            parts = list(pool.map(decode, chunks, buffers))
    keys = np.concatenate(parts)
    first = chunks[0] * rows
    return keys[lo - first:hi - first]
