"""Where outputs may go, and what ssld may delete.

Two promises live here, shared by every command that writes:

- an output never overlaps an input: ``--out`` equal to, inside, or containing a data
  root, a source store or any other input is refused, compared by *real* path, so a
  symlinked alias of an input is caught too (:func:`check_disjoint`);
- ``--overwrite`` only ever deletes what ssld wrote: a directory is removed only when
  it is recognisably a label store and holds nothing but a store's own entries
  (:func:`remove_store`); anything else is refused, naming what is there.

An output file that cannot be written at all (a directory, a missing folder) is refused
before the work that would fill it (:func:`check_output_file`).
"""
from __future__ import annotations

import fnmatch
import json
import os
import shutil
from typing import Any, Iterable, Mapping

from . import _format as fmt

# Top-level entries a label store directory may hold besides its arrays: the group's
# metadata (and zarr's temporary file of it, left by a run killed while rewriting it) and
# the failure records infer-teacher keeps next to it.
STORE_FILES = ("zarr.json", "zarr.*.partial", "failed.txt", "failed.txt.tmp",
               "failed.rank*.part")

# The group attribute a store carries while ``create`` makes its arrays (docs/format.md):
# a store that still has it was never finished and holds no row.
CREATING = "creating"


def local_path(path: Any) -> str | None:
    """The filesystem path of a local store (``file://`` stripped), None for other URLs."""
    text = os.fspath(path) if isinstance(path, os.PathLike) else str(path)
    if "://" in text:
        return text[len("file://"):] if text.startswith("file://") else None
    return text


def exists(path: Any) -> bool:
    """Whether a local path or an fsspec URL exists. An unreachable endpoint, missing
    credentials or a missing bucket is a ValueError with one line naming the URL (never a
    traceback from the storage client)."""
    local = local_path(path)
    if local is not None:
        return os.path.lexists(local)
    try:
        import fsspec

        fs, inner = fsspec.core.url_to_fs(str(path))
        return bool(fs.exists(inner))
    except ImportError as exc:
        raise ImportError(f"{path}: no filesystem for this URL ({exc}); for s3:// install "
                          "s3fs") from None
    except Exception as exc:  # noqa: BLE001 - botocore/aiohttp/gcsfs raise their own kinds
        message = " ".join(str(exc).split()) or type(exc).__name__
        raise ValueError(f"cannot reach {path}: {type(exc).__name__}: {message}") from None


def real_path(path: Any) -> str:
    """Symlinks resolved (also through parents of a path that does not exist yet);
    fsspec URLs are returned as they are."""
    local = local_path(path)
    return os.path.realpath(local) if local is not None else str(path).rstrip("/")


def _overlap(out: str, other: str) -> str | None:
    """How ``out`` relates to ``other`` (both real paths), or None when disjoint."""
    if out == other:
        return "is"
    if out.startswith(other.rstrip("/") + "/"):
        return "is inside"
    if other.startswith(out.rstrip("/") + "/"):
        return "contains"
    return None


def check_disjoint(out: Any, inputs: Mapping[str, Any | Iterable[Any]], *,
                   option: str = "--out") -> None:
    """ValueError when ``out`` is, is inside, or contains one of ``inputs``.

    ``inputs`` maps a description (``"--data"``, ``"input store"``) to one path or a
    list of paths; None entries are ignored. Paths are compared after resolving
    symlinks, so an alias of an input cannot slip through.
    """
    target = real_path(out)
    for what, paths in inputs.items():
        if paths is None:
            continue
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        for path in paths:
            if path is None:
                continue
            relation = _overlap(target, real_path(path))
            if relation:
                raise ValueError(f"{option} {out} {relation} {what} {path}: an output may not "
                                 "overlap an input (nothing was written)")


def check_output_file(path: str, option: str) -> None:
    """Refuse, before any work, an output file path that cannot be written: an existing
    directory, a missing or unwritable parent folder; for an fsspec URL, an unreachable
    endpoint, a missing bucket or an existing folder. ``option`` names it in the message."""
    if local_path(path) is None:
        return _check_remote_output_file(str(path), option)
    path = local_path(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{option} {path} is a directory; give a file name")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"{option} {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise PermissionError(f"{option} {path}: not writable")


def _check_remote_output_file(url: str, option: str) -> None:
    """An object-storage output file: reachable, in a bucket that exists, not a folder.
    (A "folder" of object storage is only a prefix: a new one needs no creating.)"""
    import fsspec

    if exists(url):  # one line, naming the URL, when the endpoint cannot be reached
        fs, inner = fsspec.core.url_to_fs(url)
        if fs.isdir(inner):
            raise IsADirectoryError(f"{option} {url} is a folder; give a file name")
        return
    fs, inner = fsspec.core.url_to_fs(url)
    bucket = inner.strip("/").split("/", 1)[0]
    if "/" in inner.strip("/") and not fs.exists(bucket):
        raise FileNotFoundError(f"{option} {url}: bucket {bucket} does not exist")


def is_store_dir(path: str) -> bool:
    """True for a local directory whose zarr.json says it is an ssld label store."""
    attrs = _local_attributes(path)
    return attrs is not None and attrs.get("format") == fmt.FORMAT


def _local_attributes(path: str) -> dict | None:
    """The group attributes of the local folder ``path`` (None: not a zarr group)."""
    try:
        with open(os.path.join(path, "zarr.json"), encoding="utf-8") as handle:
            meta = json.load(handle)
    except (OSError, ValueError):
        return None
    attrs = meta.get("attributes") if isinstance(meta, dict) else None
    return attrs if isinstance(attrs, dict) else None


def unfinished_creation(path: Any) -> bool:
    """True for an ssld label store whose creation never finished (its creator stopped:
    a full disk, a kill): it holds no row, so a new ``create`` may replace it."""
    local = local_path(path)
    if local is not None:
        attrs = _local_attributes(local) if os.path.isdir(local) else None
    else:
        import zarr

        try:
            attrs = dict(zarr.open_group(str(path), mode="r").attrs)
        except Exception:  # noqa: BLE001 - not a readable group: not one of ours
            attrs = None
    return bool(attrs and attrs.get("format") == fmt.FORMAT and attrs.get(CREATING))


def _foreign_entries(path: str) -> list[str]:
    """Top-level entries of a store directory that no store writes."""
    arrays = {spec.name for spec in fmt.SCHEMA} | {fmt.PARTNER_GROUP}
    foreign = []
    for entry in sorted(os.listdir(path)):
        full = os.path.join(path, entry)
        if entry in arrays and os.path.isdir(full) and not os.path.islink(full):
            continue
        if any(fnmatch.fnmatch(entry, pattern) for pattern in STORE_FILES) \
                and os.path.isfile(full) and not os.path.islink(full):
            continue
        foreign.append(entry)
    return foreign


def check_replaceable(path: Any, *, option: str = "--out") -> None:
    """ValueError unless ``path`` is absent or a label store that ssld may delete."""
    local = local_path(path)
    if local is None:
        return _check_remote_replaceable(path, option)
    if not os.path.lexists(local):
        return
    if os.path.islink(local):
        raise ValueError(f"{option} {path} is a symbolic link; refusing to replace it "
                         "(point --out at the real location)")
    if not os.path.isdir(local) or not is_store_dir(local):
        kind = "a directory" if os.path.isdir(local) else "a file"
        raise ValueError(f"{option} {path} exists and is {kind}, not an ssld label store; "
                         "--overwrite only replaces label stores (remove it yourself or choose "
                         "another --out)")
    foreign = _foreign_entries(local)
    if foreign:
        raise ValueError(f"{option} {path} is a label store but also holds {foreign[0]!r}"
                         f"{f' and {len(foreign) - 1} other entries' if len(foreign) > 1 else ''}"
                         " that ssld did not write; refusing to delete it")


def _check_remote_replaceable(url: Any, option: str) -> None:
    import zarr

    if not exists(url):
        return
    try:
        attrs = dict(zarr.open_group(str(url), mode="r").attrs)
    except Exception as exc:  # noqa: BLE001 - any failure means "not recognisably ours"
        raise ValueError(f"{option} {url} exists and could not be read as a label store "
                         f"({type(exc).__name__}: {exc}); refusing to replace it") from None
    if attrs.get("format") != fmt.FORMAT:
        raise ValueError(f"{option} {url} exists and is not an ssld label store; refusing to "
                         "replace it")


def remove_store(path: Any, *, option: str = "--out") -> None:
    """Delete a local label store after :func:`check_replaceable` (remote: zarr's mode "w"
    clears the group when it is recreated). ``zarr.json`` goes last: a removal that is
    interrupted leaves a store that is still recognisably ssld's, to be replaced again."""
    check_replaceable(path, option=option)
    local = local_path(path)
    if local is None or not os.path.lexists(local):
        return
    for entry in sorted(os.listdir(local), key=lambda name: name == "zarr.json"):
        full = os.path.join(local, entry)
        if os.path.isdir(full) and not os.path.islink(full):
            shutil.rmtree(full)
        else:
            os.remove(full)
    os.rmdir(local)


def disk_bytes(path: Any) -> int | None:
    """Bytes on disk of a local store directory or file (None for remote stores)."""
    local = local_path(path)
    if local is None or not os.path.exists(local):
        return None
    if os.path.isfile(local):
        return os.path.getsize(local)
    total = 0
    for root, _dirs, files in os.walk(local):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


def human_size(nbytes: int | None) -> str:
    """``1536`` → ``"1.5 KiB"``; None → ``"-"``."""
    if nbytes is None:
        return "-"
    size = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{nbytes} B"
