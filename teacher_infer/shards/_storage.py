"""Where shards live: local files (``os``) or an fsspec URL (``s3://...``), one interface.

Local files are read with ``os.pread`` on a kept descriptor (one system call per range);
object storage with ``fs.cat_file(path, start, end)`` (one ranged GET per range, no HEAD).
A file's *stamp* tells whether it changed since it was indexed: its modification time in
nanoseconds locally, a 64-bit digest of its ETag on object storage (the modification time
where the storage has no ETag), 0 where neither is known (then only the size is compared).
"""
from __future__ import annotations

import hashlib
import os
import posixpath
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from labelstore import local_path


@dataclass(frozen=True)
class FileInfo:
    """What a listing or a stat says about one file."""

    path: str        # absolute local path or URL
    size: int
    stamp: int


def is_remote(path: str) -> bool:
    """True for fsspec URLs other than ``file://`` (those are local paths)."""
    return local_path(path) is None


def normalize(path: str) -> str:
    """A local path made absolute (``file://`` stripped); a URL without a trailing slash."""
    local = local_path(path)
    if local is not None:
        return os.path.abspath(os.path.expanduser(local))
    return path.rstrip("/")


def join(root: str, name: str) -> str:
    """``root`` + a POSIX relative ``name``."""
    if is_remote(root):
        return f"{root.rstrip('/')}/{name}"
    return os.path.join(root, *name.split("/"))


def relative(path: str, root: str) -> str | None:
    """``path`` below ``root`` as a POSIX name, None when it is not below it."""
    if is_remote(root):
        prefix = root.rstrip("/") + "/"
        return path[len(prefix):] if path.startswith(prefix) else None
    rel = os.path.relpath(path, root)
    if rel == os.pardir or rel.startswith(os.pardir + os.sep) or os.path.isabs(rel):
        return None
    return rel.replace(os.sep, "/")


def parent(path: str) -> str:
    return posixpath.dirname(path.rstrip("/")) if is_remote(path) else os.path.dirname(path)


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) of a URL; one line when it cannot be used."""
    try:
        import fsspec

        return fsspec.core.url_to_fs(url)
    except ImportError as exc:
        raise ImportError(f"{url}: no filesystem for this URL ({exc}); for s3:// install "
                          "s3fs") from None


def _storage_error(url: str, exc: Exception) -> Exception:
    """A storage client's error as one line naming the URL (FileNotFoundError kept)."""
    if isinstance(exc, FileNotFoundError):
        return FileNotFoundError(f"{url} does not exist")
    message = " ".join(str(exc).split()) or type(exc).__name__
    return ValueError(f"cannot read {url}: {type(exc).__name__}: {message}")


def etag_stamp(etag: str) -> int:
    """A signed 64-bit digest of an ETag (quotes stripped), to fit the store's int64 column."""
    digest = hashlib.sha256(etag.strip('"').encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def remote_stamp(info: dict) -> int:
    """The stamp of an fsspec ``info``/listing entry: its ETag, else its modification time."""
    for name in ("ETag", "etag", "e_tag"):
        if info.get(name):
            return etag_stamp(str(info[name]))
    for name in ("mtime", "LastModified", "last_modified", "updated"):
        value = info.get(name)
        if isinstance(value, datetime):
            return int(value.timestamp() * 1e9)
        if isinstance(value, (int, float)):
            return int(value * 1e9)
        if isinstance(value, str) and value:
            try:
                return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * 1e9)
            except ValueError:
                continue
    return 0


def stat(path: str) -> FileInfo:
    """Size and stamp of one file (FileNotFoundError when it is missing)."""
    if not is_remote(path):
        st = os.stat(path)
        return FileInfo(path, st.st_size, st.st_mtime_ns)
    fs, inner = filesystem(path)
    try:
        fs.invalidate_cache(inner)  # a listing cached earlier in this process may be stale
        info = fs.info(inner)
    except Exception as exc:  # noqa: BLE001 - each client raises its own kinds
        raise _storage_error(path, exc) from None
    if info.get("type") == "directory":
        raise IsADirectoryError(f"{path} is a folder")
    return FileInfo(path, int(info["size"]), remote_stamp(info))


def list_files(folder: str) -> dict[str, FileInfo] | None:
    """The files directly in ``folder`` by base name (one listing); None when it is no
    folder."""
    if not is_remote(folder):
        if not os.path.isdir(folder):
            return None
        out = {}
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_file():
                    st = entry.stat()
                    out[entry.name] = FileInfo(entry.path, st.st_size, st.st_mtime_ns)
        return out
    fs, inner = filesystem(folder)
    try:
        fs.invalidate_cache(inner)  # another process may have written since the last listing
        entries = fs.ls(inner, detail=True)
    except FileNotFoundError:
        return None
    except Exception as exc:  # noqa: BLE001
        raise _storage_error(folder, exc) from None
    scheme = folder.split("://", 1)[0]
    out = {}
    for info in entries:
        if info.get("type") == "file":
            name = posixpath.basename(info["name"].rstrip("/"))
            out[name] = FileInfo(f"{scheme}://{info['name']}", int(info["size"]),
                                 remote_stamp(info))
    if not out and not fs.isdir(inner):
        return None
    return out


def glob(pattern: str) -> list[str]:
    """Files matching a glob pattern (``**`` spans folders), sorted."""
    if not is_remote(pattern):
        import glob as _glob

        return sorted(p for p in _glob.glob(pattern, recursive=True) if os.path.isfile(p))
    fs, inner = filesystem(pattern)
    scheme = pattern.split("://", 1)[0]
    try:
        found = fs.glob(inner, detail=True)
    except Exception as exc:  # noqa: BLE001
        raise _storage_error(pattern, exc) from None
    return sorted(f"{scheme}://{name}" for name, info in found.items()
                  if info.get("type") == "file")


def read_bytes(path: str) -> bytes:
    if not is_remote(path):
        with open(path, "rb") as handle:
            return handle.read()
    fs, inner = filesystem(path)
    try:
        return fs.cat_file(inner)
    except Exception as exc:  # noqa: BLE001
        raise _storage_error(path, exc) from None


def write_bytes(path: str, data: bytes) -> None:
    """Write a whole file atomically: a local file is renamed into place, an object is one
    PUT (never seen half-written either way)."""
    if not is_remote(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        partial = f"{path}.tmp{os.getpid()}"
        with open(partial, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
        return
    fs, inner = filesystem(path)
    fs.pipe_file(inner, data)


def remove(path: str) -> None:
    if not is_remote(path):
        if os.path.exists(path):
            os.remove(path)
        return
    fs, inner = filesystem(path)
    if fs.exists(inner):
        fs.rm_file(inner)


class RangeFile:
    """Byte ranges of one file: ``os.pread`` on a descriptor kept open, or ranged GETs.

    ``info()`` is the size and stamp of the file being read (``fstat`` of the open
    descriptor locally: a shard replaced by a rename after opening is still the old one,
    consistently).
    """

    def __init__(self, path: str):
        self.path = path
        self._fd: int | None = None
        self._fs = self._inner = None
        if is_remote(path):
            self._fs, self._inner = filesystem(path)
        else:
            self._fd = os.open(path, os.O_RDONLY)

    def info(self) -> FileInfo:
        if self._fd is not None:
            st = os.fstat(self._fd)
            return FileInfo(self.path, st.st_size, st.st_mtime_ns)
        return stat(self.path)

    def read(self, start: int, stop: int) -> bytes:
        """Bytes [start, stop) (fewer only at the end of the file)."""
        if self._fd is not None:
            data = os.pread(self._fd, stop - start, start)
            while len(data) < stop - start:  # pread may return less (signals, large reads)
                more = os.pread(self._fd, stop - start - len(data), start + len(data))
                if not more:
                    break
                data += more
            return data
        try:
            return self._fs.cat_file(self._inner, start=start, end=stop)
        except Exception as exc:  # noqa: BLE001
            raise _storage_error(self.path, exc) from None

    def read_member(self, offset: int, size: int) -> tuple[bytes, bytes]:
        """(the 512-byte header before ``offset``, the ``size`` bytes from it): locally two
        ``pread`` calls, which is faster than one and a copy of the slice (measured:
        docs/benchmarks.md, Shards); one ranged GET remotely."""
        if self._fd is not None:
            return self.read(offset - 512, offset), self.read(offset, offset + size)
        data = self.read(offset - 512, offset + size)
        return data[:512], data[512:]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Window:
    """``read_at(offset, n)`` over a :class:`RangeFile` that reads at least ``min_read``
    bytes at a time and serves later reads inside that window from memory: a listing
    reads a header and the small member after it in one call locally (``min_read`` of a
    few KiB), and a remote shard in a few large ranged GETs (``min_read`` of MiBs)."""

    def __init__(self, source: RangeFile, size: int, min_read: int):
        self.source, self.size, self.min_read = source, size, min_read
        self.start, self.data = 0, b""
        self.reads = 0

    def __call__(self, offset: int, n: int) -> bytes:
        end = offset + n
        if not (self.start <= offset and end <= self.start + len(self.data)):
            self.start = offset
            self.data = self.source.read(offset, min(self.size, offset + max(n, self.min_read)))
            self.reads += 1
        return self.data[offset - self.start:end - self.start]
