"""Whole chunks encoded by numpy and numcodecs with the array's own codecs, put on the store
concurrently: the bytes zarr writes, without zarr's per-chunk machinery.

zarr encodes a chunk by the codecs of its array's metadata: an array-to-bytes codec (``bytes``
for numbers: the little-endian values, C order; ``vlen-utf8`` for strings, see ``_keys``), then
bytes-to-bytes codecs (here Blosc and crc32c). Doing the same here, for the codecs this package
writes, skips zarr's indexing, buffer and task layers (measured: about as much time again as
the compression itself). An array with any other codec goes through zarr. The tests compare
every chunk file with zarr's own.

The fast path (here, in ``_keys`` and in the reader's batched reads) uses three zarr internals:
``zarr.core.sync.sync``, ``zarr.core.buffer.default_buffer_prototype`` and the array metadata's
``encode_chunk_key``. It is on only for the zarr releases it is tested with
(:data:`TESTED_ZARR`); with any other zarr every read and write goes through zarr's public API,
slower and byte for byte the same (tests/test_labelstore_keys.py writes a store both ways).
"""
from __future__ import annotations

import asyncio
from typing import Any, Sequence

import numpy as np
import zarr

# The zarr releases (major.minor) the fast path is tested with; add one only after the test
# suite passes on it (setup.cfg's zarr>=3 stands: other releases take the public API).
TESTED_ZARR = ("3.1",)
FAST_PATH = ".".join(zarr.__version__.split(".")[:2]) in TESTED_ZARR

_SHUFFLES = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}
THREADS = 2   # chunks compressed at once (Blosc runs without its own threads under zarr)


class BytesCodecs:
    """The bytes-to-bytes codecs of an array's metadata (Blosc, crc32c), applied in order
    on write and in reverse on read, as zarr applies them."""

    def __init__(self, codecs: Sequence[Any]):
        import google_crc32c
        import numcodecs
        from zarr.codecs import BloscCodec, Crc32cCodec

        self._crc32c = google_crc32c
        self._steps = []
        for codec in codecs:
            if isinstance(codec, BloscCodec):
                config = codec.to_dict()["configuration"]
                blosc = numcodecs.Blosc(cname=config["cname"], clevel=config["clevel"],
                                        shuffle=_SHUFFLES[config["shuffle"]],
                                        blocksize=config["blocksize"],
                                        typesize=config["typesize"])
                self._steps.append(("blosc", blosc))
            elif isinstance(codec, Crc32cCodec):
                self._steps.append(("crc32c", None))
            else:
                raise TypeError(f"no fast path for codec {codec!r}")

    def encode(self, data: bytes) -> bytes:
        for kind, codec in self._steps:
            if kind == "blosc":
                data = bytes(codec.encode(np.frombuffer(data, dtype=np.uint8)))
            else:
                data = data + np.array([self._crc32c.value(data)], dtype=np.uint32).tobytes()
        return data

    def decode(self, data: bytes) -> bytes:
        for kind, codec in reversed(self._steps):
            if kind == "blosc":
                data = bytes(codec.decode(data))
            else:
                inner, stored = data[:-4], data[-4:]
                computed = np.array([self._crc32c.value(inner)], dtype=np.uint32).tobytes()
                if computed != stored:
                    raise ValueError(f"Stored and computed checksum do not match. Stored: "
                                     f"{stored!r}. Computed: {computed!r}.")
                data = inner
        return data


def numeric_codecs(array: Any) -> BytesCodecs | None:
    """The bytes codecs of a zarr v3 array of numbers stored little-endian (``bytes`` codec),
    when its chunks can be written here; None otherwise (also for anything not a zarr array,
    and on a zarr release the fast path is not tested with)."""
    from zarr.codecs import BytesCodec

    if not FAST_PATH:
        return None
    metadata = getattr(array, "metadata", None)
    if getattr(metadata, "zarr_format", None) != 3 or np.dtype(array.dtype).kind not in "biuf":
        return None
    codecs = list(metadata.codecs)
    first = codecs[0] if codecs else None
    if not isinstance(first, BytesCodec) or (np.dtype(array.dtype).itemsize > 1 and
                                             getattr(first.endian, "name", None) != "little"):
        return None
    try:
        return BytesCodecs(codecs[1:])
    except TypeError:
        return None


def chunk_key(array: Any, coords: Sequence[int]) -> str:
    """The key of chunk ``coords`` below its array, by the array's chunk key encoding (zarr's
    own method on the fast path; the v3 spec's two encodings from the metadata otherwise)."""
    coords = tuple(int(c) for c in coords)
    if FAST_PATH:
        return array.metadata.encode_chunk_key(coords)
    encoding = array.metadata.to_dict()["chunk_key_encoding"]
    default = encoding["name"] == "default"
    separator = (encoding.get("configuration") or {}).get("separator", "/" if default else ".")
    key = separator.join(map(str, coords))
    return "c" + separator + key if default else key


def chunk_keys(array: Any, chunks: Sequence[int]) -> list[str]:
    """Store keys of row-chunks ``chunks`` (every other dimension is one chunk)."""
    path = array.store_path.path
    prefix = f"{path}/" if path else ""
    tail = (0,) * (len(array.shape) - 1)
    return [prefix + chunk_key(array, (int(chunk),) + tail) for chunk in chunks]


def put(array: Any, chunks: Sequence[int], encoded: Sequence[bytes]) -> None:
    """Store the encoded row-chunks of ``array``, all requests at once."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    store = array.store_path.store
    prototype = default_buffer_prototype()

    async def put_all() -> None:
        await asyncio.gather(*(store.set(key, prototype.buffer.from_bytes(data))
                               for key, data in zip(chunk_keys(array, chunks), encoded)))

    sync(put_all())


def write_rows(array: Any, codecs: BytesCodecs, lo: int, value: np.ndarray) -> None:
    """``array[lo:lo + len(value)] = value`` for whole row-chunks (``lo`` on a chunk boundary,
    the end on one or at the array's end), as zarr would store them."""
    rows = int(array.chunks[0])
    dtype = np.dtype(array.dtype).newbyteorder("<")
    fill = array.metadata.fill_value
    first, count = lo // rows, (len(value) + rows - 1) // rows
    encoded = []
    for i in range(count):
        part = value[i * rows:(i + 1) * rows]
        if len(part) < rows:  # the array's last chunk: zarr stores it whole, fill-padded
            padded = np.full((rows,) + part.shape[1:], fill, dtype=dtype)
            padded[:len(part)] = part
            part = padded
        encoded.append(codecs.encode(np.ascontiguousarray(part, dtype=dtype).tobytes()))
    put(array, range(first, first + count), encoded)
