"""A shard source as the user writes it → the ordered list of its shards.

Accepted (any of them local or an fsspec URL such as ``s3://bucket/in22k``):

- a brace pattern, ``/data/in22k/imagenet22k-train-{0000..4095}.tar`` (``braceexpand``,
  as webdataset and timm expand it; every name it expands to must exist), or a glob,
  ``/data/in22k/*-train-*.tar`` (sorted; ``**`` spans folders); several joined by ``::``;
- one ``.tar`` file;
- a folder (or URL prefix) of shards: its ``*.tar`` files, sorted, not recursive;
- an index file: timm's ``_info.json`` (``…/_info.json#train`` picks a split; the only
  split when there is one), a wids shard index (``*.json`` with ``wids_version`` 1), or an
  ssld index (``build_index``'s output folder or its ``ssld-shard-index.json``).

The *root* is the folder the store keys are relative to: the folder of the pattern's
literal start (``/data/in22k``), the folder given, or the index file's folder. A shard's
*name* is its path below the root (``imagenet22k-train-0001.tar``) and starts every key of
its samples (``imagenet22k-train-0001.tar/n01440764_10026``). The shard of a store key is
found again as the key up to its first path component ending in ``.tar``, so no folder in
the root or between the root and a shard may end in ``.tar`` (refused here).
"""
from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass

from . import _formats, _storage

INDEX_MANIFEST = "ssld-shard-index.json"
_COMPRESSED = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst", ".tar.lz4")
_WILDCARD = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class ShardFile:
    """One shard: where it is, what it was when resolved, and what its index files say."""

    name: str                        # path below the root, POSIX: 'imagenet22k-train-0001.tar'
    path: str                        # absolute local path or URL
    size: int
    stamp: int                       # see _storage: mtime ns locally, ETag digest remotely
    expected: int | None = None      # sample count from _info.json / a wids index
    dali_index: str | None = None    # DALI's NAME.idx beside the shard, if there is one


@dataclass(frozen=True)
class ShardSet:
    """The shards of a source, in order (the order of the store's rows)."""

    spec: str
    kind: str                        # pattern | file | folder | timm | wids | index
    root: str
    shards: tuple[ShardFile, ...]

    def __len__(self) -> int:
        return len(self.shards)

    @property
    def total_bytes(self) -> int:
        return sum(shard.size for shard in self.shards)


def is_shard_source(spec: str) -> bool:
    """Whether ``spec`` names shards rather than an image folder or a list file: a
    pattern or file ending in ``.tar``, an index file, a URL, or a folder holding ``.tar``
    files or an ssld index (looks at the folder's top level only)."""
    spec = str(spec)
    base = spec.split("#", 1)[0]
    if "::" in spec or base.endswith((".tar", ".json")) or _storage.is_remote(spec):
        return True
    if _WILDCARD.search(spec) or "{" in spec:
        return ".tar" in spec
    folder = _storage.normalize(spec)
    if not os.path.isdir(folder):
        return False
    with os.scandir(folder) as entries:  # names only (no stat): a folder of a million images
        return any((entry.name.endswith(".tar") or entry.name == INDEX_MANIFEST)
                   and entry.is_file() for entry in entries)


def resolve_shards(spec: str, *, option: str = "--data") -> ShardSet:
    """The shards ``spec`` names (see the module docstring), each stat'ed once.

    ``option`` is the name errors give ``spec``. FileNotFoundError for a missing shard,
    folder or index; ValueError for a pattern that matches nothing, a shard named twice,
    compressed shards, or an index file that is inconsistent.

    >>> resolve_shards("/data/in22k/imagenet22k-train-{0000..4095}.tar")   # doctest: +SKIP
    ShardSet(spec=..., kind='pattern', root='/data/in22k', shards=(...4096 shards...))
    """
    spec = str(spec).strip()
    if not spec:
        raise ValueError(f"{option} is empty")
    base, _, split = spec.partition("#")
    if base.endswith(".json") and "::" not in spec:
        return _from_index_file(spec, base, split or None, option)
    if "::" in spec or _WILDCARD.search(spec) or "{" in spec:
        return _from_patterns(spec, option)
    path = _storage.normalize(spec)
    if path.endswith(".tar") and (_storage.is_remote(path) or not os.path.isdir(path)):
        return _from_patterns(spec, option)   # one shard
    return _from_folder(spec, option)


def _check_names(shards: list[ShardFile], root: str, spec: str, option: str) -> None:
    """Names that keys can carry: unique, ``.tar``, no folder ending in ``.tar`` on the way."""
    folders = [part for part in _storage.normalize(root).replace("\\", "/").split("/") if part]
    if any(part.endswith(".tar") for part in folders):
        raise ValueError(f"{option} {spec}: the folder {root} has a part ending in .tar; keys "
                         "find their shard by the first part ending in .tar: rename the folder")
    seen: set[str] = set()
    for shard in shards:
        if shard.name.endswith(_COMPRESSED):
            raise ValueError(f"{option} {spec}: {shard.path} is compressed; samples are read by "
                             "byte range, which needs plain .tar shards (decompress them)")
        if not shard.name.endswith(".tar"):
            raise ValueError(f"{option} {spec}: {shard.path} is not a .tar file")
        if any(part.endswith(".tar") for part in shard.name.split("/")[:-1]):
            raise ValueError(f"{option} {spec}: {shard.name} lies in a folder ending in .tar; "
                             "keys find their shard by the first part ending in .tar")
        if shard.name in seen:
            raise ValueError(f"{option} {spec}: shard {shard.path} is named twice")
        seen.add(shard.name)


def stat_shards(paths: list[str]) -> list[tuple[_storage.FileInfo, str | None] | None]:
    """Per path: its size and stamp and its DALI ``.idx`` (or None), from one listing per
    folder; None for a path that does not exist."""
    listings: dict[str, dict[str, _storage.FileInfo] | None] = {}
    out = []
    for path in paths:
        folder = _storage.parent(path)
        if folder not in listings:
            listings[folder] = _storage.list_files(folder)
        files = listings[folder] or {}
        base = posixpath.basename(path) if _storage.is_remote(path) else os.path.basename(path)
        info = files.get(base)
        idx = files.get(_formats.dali_index_name(base))
        out.append(None if info is None else (info, idx.path if idx is not None else None))
    return out


def _stat_all(paths: list[str], root: str, spec: str, option: str,
              expected: list[int | None] | None = None) -> list[ShardFile]:
    """ShardFiles for ``paths`` (see :func:`stat_shards`), checked (``_check_names``)."""
    found = stat_shards(paths)
    missing = [path for path, entry in zip(paths, found) if entry is None]
    if missing:
        raise FileNotFoundError(f"{option} {spec}: shard {missing[0]} does not exist "
                                f"({len(missing):,} of {len(paths):,} shards missing)")
    shards = []
    for number, (path, (info, idx)) in enumerate(zip(paths, found)):
        name = _storage.relative(path, root)
        if name is None:
            raise ValueError(f"{option} {spec}: shard {path} is not below the root {root}")
        shards.append(ShardFile(name, path, info.size, info.stamp,
                                expected[number] if expected else None, idx))
    _check_names(shards, root, spec, option)
    return shards


def _literal_root(pattern: str) -> str:
    """The folder of a pattern's literal start: ``/d/a-{0..9}.tar`` → ``/d``."""
    cut = len(pattern)
    for mark in ("{", "*", "?", "["):
        at = pattern.find(mark)
        if at >= 0:
            cut = min(cut, at)
    head = pattern[:cut]
    return head.rsplit("/", 1)[0] if "/" in head else "."


def _common_root(roots: list[str]) -> str:
    if len(set(roots)) == 1:
        return roots[0]
    if any(_storage.is_remote(root) for root in roots):
        schemes = {root.split("://", 1)[0] for root in roots if "://" in root}
        if len(schemes) != 1 or not all(_storage.is_remote(root) for root in roots):
            raise ValueError(f"shard patterns on different storages: {', '.join(roots)}")
        scheme = schemes.pop()
        common = posixpath.commonpath(["/" + root.split("://", 1)[1] for root in roots])
        return f"{scheme}://{common.lstrip('/')}"
    return posixpath.commonpath(roots)


def _from_patterns(spec: str, option: str) -> ShardSet:
    from braceexpand import braceexpand

    parts = [part for part in spec.split("::") if part]
    roots = [_storage.normalize(_literal_root(part)) for part in parts]
    paths: list[str] = []
    for part in parts:
        expanded = list(braceexpand(part))
        for name in expanded:
            if _WILDCARD.search(name):
                found = [path for path in _storage.glob(_storage.normalize(name))
                         if path.endswith(".tar") or path.endswith(_COMPRESSED)]
                if not found:
                    raise ValueError(f"{option} {spec}: {name} matches no .tar file")
                paths += found
            else:
                paths.append(_storage.normalize(name))
    if not paths:
        raise ValueError(f"{option} {spec}: matches no .tar file")
    root = _common_root(roots)
    kind = "file" if len(parts) == 1 and paths == [_storage.normalize(spec)] else "pattern"
    if kind == "file":
        root = _storage.parent(paths[0])
    return ShardSet(spec, kind, root, tuple(_stat_all(paths, root, spec, option)))


def _from_folder(spec: str, option: str) -> ShardSet:
    folder = _storage.normalize(spec)
    files = _storage.list_files(folder)
    if files is None:
        raise FileNotFoundError(f"{option} {spec} does not exist")
    if INDEX_MANIFEST in files:
        return _from_index_file(spec, _storage.join(folder, INDEX_MANIFEST), None, option)
    names = sorted(name for name in files if name.endswith(".tar"))
    if not names:
        packed = sorted(name for name in files if name.endswith(_COMPRESSED))
        hint = (f"; {packed[0]} and others are compressed: samples are read by byte range, "
                "which needs plain .tar shards" if packed else "")
        raise ValueError(f"{option} {spec}: no .tar shards in this folder{hint}")
    info_name = next((name for name in ("_info.json", "info.json") if name in files), None)
    expected = None
    if info_name is not None:
        info = _formats.load_json(_storage.read_bytes(files[info_name].path),
                                  f"{spec}/{info_name}")
        split_of = _formats.timm_split_of(info)
        splits = sorted({split_of[name] for name in names if name in split_of})
        if len(splits) > 1:
            raise ValueError(f"{option} {spec} holds the splits {', '.join(splits)} of its "
                             f"{info_name}: give {spec.rstrip('/')}/{info_name}#SPLIT or a "
                             "pattern")
        if splits:
            listed, counts = _formats.timm_split(info, splits[0], f"{spec}/{info_name}")
            by_name = dict(zip(listed, counts))
            expected = [by_name.get(name) for name in names]
    paths = [files[name].path for name in names]
    return ShardSet(spec, "folder", folder,
                    tuple(_stat_all(paths, folder, spec, option, expected)))


def _from_index_file(spec: str, path: str, split: str | None, option: str) -> ShardSet:
    path = _storage.normalize(path)
    try:
        raw = _storage.read_bytes(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{option} {spec}: {path} does not exist") from None
    index = _formats.load_json(raw, path)
    folder = _storage.parent(path)
    if not isinstance(index, dict):
        raise ValueError(f"{option} {spec}: {path} is not a shard index")
    if index.get("format") == "ssld.shardindex":
        from ._index import manifest_shards

        if split:
            raise ValueError(f"{option} {spec}: an ssld index has no splits")
        return ShardSet(spec, "index", index.get("root") or folder,
                        tuple(manifest_shards(index, path)))
    if "splits" in index:
        names, counts = _formats.timm_split(index, split, path)
        paths = [_storage.join(folder, name) for name in names]
        return ShardSet(spec, "timm", folder,
                        tuple(_stat_all(paths, folder, spec, option, list(counts))))
    if split:
        raise ValueError(f"{option} {spec}: #{split} picks a split of timm's _info.json; "
                         f"{path} is not one")
    entries = _formats.wids_shards(index, path)
    paths = [_storage.normalize(entry["url"]) if "://" in entry["url"]
             or entry["url"].startswith("/") else _storage.join(folder, entry["url"])
             for entry in entries]
    root = folder if all(_storage.relative(p, folder) is not None for p in paths) else \
        _common_root([_storage.parent(p) for p in paths])
    shards = _stat_all(paths, root, spec, option, [int(e["nsamples"]) for e in entries])
    for shard, entry in zip(shards, entries):
        if entry.get("filesize") is not None and int(entry["filesize"]) != shard.size:
            raise ValueError(f"{option} {spec}: shard {shard.path} has {shard.size:,} bytes, "
                             f"{path} says {int(entry['filesize']):,}")
    return ShardSet(spec, "wids", root, tuple(shards))
