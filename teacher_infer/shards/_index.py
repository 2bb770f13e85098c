"""``build_index``: list every shard once, in parallel and resumably, and keep the result.

The teacher pass needs every key before it creates its store (rank 0 writes the keys at
creation), so the listing comes first; for ImageNet-22k (13.7 M samples, 4,095 shards on a
cluster file system or object storage) it is worth doing once and keeping, apart from
the GPU run: every command that reads the same shards (infer-teacher, eval, train-student
``--data``, verify) loads the index in seconds instead of listing again.

Layout of an index folder ``OUT``::

    OUT/ssld-shard-index.json      manifest: source, root, every shard (name, size, stamp,
                                   expected and listed sample count), complete
    OUT/parts/NAME.npz             one per shard: keys, labels, offsets, sizes, and the
                                   size/stamp of the file listed

Each part is written whole and atomically (rename into place locally, one PUT on object
storage) as soon as its shard is listed, so a killed run resumes with the shards that have
no part; a shard that changed since its part was written is listed again. Ranks of
``torchrun`` list disjoint shares (shard i on rank i mod world); rank 0 then checks the
whole (a ``__key__`` in two shards) and marks the manifest complete.
"""
from __future__ import annotations

import io
import json
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from labelstore import OutputLock, __version__, fingerprint

from . import _storage
from ._formats import load_json
from ._listing import (ShardListing, ShardSamples, assemble, list_many, on_main,
                       raise_failures)
from ._progress import bar
from ._source import INDEX_MANIFEST, ShardFile, ShardSet, resolve_shards, stat_shards

if TYPE_CHECKING:  # pragma: no cover
    from .config import IndexConfig

FORMAT = "ssld.shardindex"
VERSION = 1
PARTS = "parts"


@dataclass
class IndexResult:
    """What ``build_index`` did; ``str()`` is the one-line summary a command prints."""

    out: str
    shards: int
    samples: int
    listed: int            # shards listed by this run
    reused: int            # shards whose part an earlier run wrote
    via_dali_index: int    # of those listed now: from their DALI .idx
    skipped_members: int   # members that belong to no sample (metadata, no extension)
    seconds: float

    def __str__(self) -> str:
        dali = f", {self.via_dali_index:,} from DALI .idx" if self.via_dali_index else ""
        reused = f", {self.reused:,} kept from an earlier run" if self.reused else ""
        skipped = (f"; {self.skipped_members:,} members outside any sample skipped"
                   if self.skipped_members else "")
        return (f"index: {self.samples:,} samples in {self.shards:,} shards ({self.listed:,} "
                f"listed{dali}{reused}){skipped} in {self.seconds:.1f} s -> {self.out}")


def _part_path(out: str, name: str) -> str:
    return _storage.join(out, f"{PARTS}/{name}.npz")


def _shard_entry(shard: ShardFile, samples: int | None = None) -> dict:
    return {"name": shard.name, "size": shard.size, "stamp": shard.stamp,
            "expected": shard.expected, "dali_index": shard.dali_index, "samples": samples}


def manifest_shards(manifest: dict, where: str) -> list[ShardFile]:
    """The shards a manifest records (size and stamp as listed)."""
    root = manifest.get("root")
    try:
        return [ShardFile(entry["name"], _storage.join(root, entry["name"]), int(entry["size"]),
                          int(entry["stamp"]), entry.get("expected"), entry.get("dali_index"))
                for entry in manifest["shards"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{where}: damaged ssld shard index ({exc})") from None


def _read_manifest(out: str) -> dict | None:
    path = _storage.join(out, INDEX_MANIFEST)
    try:
        raw = _storage.read_bytes(path)
    except FileNotFoundError:
        return None
    manifest = load_json(raw, path)
    if (not isinstance(manifest, dict) or manifest.get("format") != FORMAT
            or manifest.get("version") != VERSION):
        raise ValueError(f"{path} is not an ssld shard index of version {VERSION}")
    return manifest


def _write_manifest(out: str, shards: ShardSet, counts: dict[str, int], complete: bool,
                    extra: dict | None = None) -> None:
    manifest = {"format": FORMAT, "version": VERSION, "spec": shards.spec, "kind": shards.kind,
                "root": shards.root, "complete": complete,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "software": {"ssld": __version__},
                "shards": [_shard_entry(s, counts.get(s.name)) for s in shards.shards],
                **(extra or {})}
    _storage.write_bytes(_storage.join(out, INDEX_MANIFEST),
                         json.dumps(manifest, indent=1).encode("utf-8"))


def _encode_part(listing: ShardListing) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, keys=np.array(listing.keys, dtype=str), labels=listing.labels,
             offsets=listing.offsets, sizes=listing.sizes,
             shard=np.array([listing.shard.size, listing.shard.stamp, listing.skipped],
                            dtype=np.int64), via=np.array(listing.via))
    return buffer.getvalue()


def _decode_part(raw: bytes, shard: ShardFile, where: str) -> ShardListing:
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as part:
            size, stamp, skipped = (int(v) for v in part["shard"])
            listing = ShardListing(ShardFile(shard.name, shard.path, size, stamp, shard.expected,
                                             shard.dali_index),
                                   part["keys"].tolist(), part["labels"], part["offsets"],
                                   part["sizes"], skipped, str(part["via"]))
    except Exception as exc:  # noqa: BLE001 - a damaged zip/npy raises many kinds
        raise ValueError(f"{where} is damaged ({type(exc).__name__}: {exc}); delete it and "
                         "build the index again (only this shard is listed again)") from None
    if (size, stamp) != (shard.size, shard.stamp):
        raise ValueError(f"{where} was made from another version of shard {shard.name}")
    return listing


def _prepare(spec: Any, out: str, option: str) -> tuple[ShardSet, list[str]]:
    """Resolve the source, check ``out`` and write the manifest (incomplete); returns the
    shards and the names whose parts an earlier run left and that still hold."""
    shards = spec if isinstance(spec, ShardSet) else resolve_shards(spec, option=option)
    if shards.kind == "index":
        raise ValueError(f"{option} {shards.spec} is an ssld index already")
    old = _read_manifest(out)
    if old is None:
        listing = _storage.list_files(out)
        if listing:
            raise ValueError(f"--out {out} exists and is not an ssld shard index (it holds "
                             f"{sorted(listing)[0]!r}); choose another folder")
        kept = []
    else:
        if old.get("root") != shards.root:
            raise ValueError(f"--out {out} is the index of {old.get('root')}, not of "
                             f"{shards.root}; choose another folder")
        before = {entry["name"]: (entry["size"], entry["stamp"]) for entry in old["shards"]}
        kept = [s.name for s in shards.shards if before.get(s.name) == (s.size, s.stamp)]
        stale = set(before) - set(kept)
        for name in stale:  # ssld's own parts, of shards that changed or left the source
            _storage.remove(_part_path(out, name))
        present = _present_parts(out)
        kept = [name for name in kept if name in present]
    _write_manifest(out, shards, {}, complete=False)
    return shards, kept


def _present_parts(out: str) -> set[str]:
    """Names of the shards with a part on storage (one listing of the parts folder)."""
    folder = _storage.join(out, PARTS)
    if not _storage.is_remote(folder):
        found = set()
        for top, _, files in os.walk(folder):
            for name in files:
                if name.endswith(".npz"):
                    rel = _storage.relative(os.path.join(top, name), folder)
                    found.add(rel[:-len(".npz")])
        return found
    fs, inner = _storage.filesystem(folder)
    try:
        fs.invalidate_cache(inner)
        names = fs.find(inner)
    except FileNotFoundError:
        return set()
    prefix = inner.rstrip("/") + "/"
    return {name[len(prefix):-len(".npz")] for name in names
            if name.startswith(prefix) and name.endswith(".npz")}


def build_index(source: Any, out: str, *, dist: Any = None, use_dali_index: bool = True,
                threads: int | None = None, progress: bool = False,
                option: str = "--data") -> IndexResult:
    """List every shard of ``source`` (a spec for :func:`resolve_shards`, or a
    ``ShardSet``) into the index folder ``out`` (local or fsspec URL); see the module
    docstring. Run it again after a kill, or after fixing a damaged shard: only shards
    without a valid part are listed.

    Under ``torchrun`` pass the ``Dist`` (process group initialised): ranks list disjoint
    shares. Damage in a shard is reported after every other shard has been listed (their
    parts are kept): ValueError (FileNotFoundError for a missing shard) naming the first.
    """
    started = time.perf_counter()
    out = _storage.normalize(str(out))
    lock = OutputLock(out, command="index")  # one build per index; its ranks share it
    try:
        on_main(dist, lock.acquire)
        shards, kept = on_main(dist, lambda: _prepare(source, out, option))
        rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
        kept_names = set(kept)
        mine = [s for i, s in enumerate(shards.shards)
                if i % world == rank and s.name not in kept_names]

        def commit(listing: ShardListing) -> str:
            _storage.write_bytes(_part_path(out, listing.shard.name), _encode_part(listing))
            return listing.via

        with bar(progress and rank == 0, len(mine), "index shards", "shard") as progress_bar:
            vias, failures = list_many(mine, use_dali_index=use_dali_index, threads=threads,
                                       then=commit, progress=progress_bar)
        summary = (len(vias), vias.count("dali-idx"), failures)
        every = dist.gather(summary) if dist is not None and dist.enabled else [summary]
        raise_failures([f for _, _, part in every for f in part], len(shards))  # every rank
        samples, skipped = on_main(dist, lambda: _finish(out, shards))
    finally:
        lock.release()
    return IndexResult(out, len(shards), samples, sum(n for n, _, _ in every), len(kept),
                       sum(d for _, d, _ in every), skipped, time.perf_counter() - started)


def index(cfg: "IndexConfig") -> IndexResult:
    """``ssld index``: :func:`build_index` of ``cfg.data`` into ``cfg.out``; under
    ``torchrun`` every rank lists a share (a gloo process group is joined for it, so torch
    is imported there only)."""
    from ..runtime import Dist

    dist = Dist.from_env()
    owns = False
    if dist.enabled:
        import torch

        owns = dist.init(torch.device("cpu"))
    try:
        return build_index(cfg.data, cfg.out, dist=dist, use_dali_index=cfg.dali_index,
                           threads=cfg.listing_threads, progress=cfg.progress)
    finally:
        if owns:
            dist.close()


def _load_parts(out: str, shards: ShardSet) -> list[ShardListing]:
    """Every shard's part, read concurrently on object storage."""
    def load(shard: ShardFile) -> ShardListing:
        where = _part_path(out, shard.name)
        try:
            raw = _storage.read_bytes(where)
        except FileNotFoundError:
            raise ValueError(f"index {out}: the part of shard {shard.name} is missing; build "
                             "the index again") from None
        return _decode_part(raw, shard, where)

    if _storage.is_remote(out):
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(16) as pool:
            return list(pool.map(load, shards.shards))
    return [load(shard) for shard in shards.shards]


def _finish(out: str, shards: ShardSet) -> tuple[int, int]:
    """Rank 0: every part read back, keys checked across shards, manifest complete."""
    listings = _load_parts(out, shards)
    samples = assemble(shards, listings)
    listed = ShardSet(shards.spec, shards.kind, shards.root,
                      tuple(listing.shard for listing in listings))
    _write_manifest(out, listed, {l.shard.name: len(l) for l in listings}, complete=True,
                    extra={"samples": len(samples), "fingerprint": fingerprint(samples.keys)})
    return len(samples), sum(listing.skipped for listing in listings)


def load_index(path: str, *, check: bool = True, option: str = "--data") -> ShardSamples:
    """The samples an index folder (or its manifest file) holds, without listing shards.

    With ``check`` every shard is stat'ed (one listing per folder) and compared with its
    recorded size and stamp: FileNotFoundError for a missing shard, ValueError for one
    that changed since the index was made. ValueError for an incomplete index.
    """
    path = _storage.normalize(str(path))
    out = _storage.parent(path) if path.endswith(".json") else path
    manifest = _read_manifest(out)
    if manifest is None:
        raise FileNotFoundError(f"{option} {path}: no {INDEX_MANIFEST} there")
    if not manifest.get("complete"):
        raise ValueError(f"{option} {path}: the index is incomplete; run the index build "
                         "again to finish it")
    shards = ShardSet(manifest.get("spec", ""), manifest.get("kind", ""), manifest["root"],
                      tuple(manifest_shards(manifest, path)))
    if check:
        check_unchanged(shards, option=option)
    listings = _load_parts(out, shards)
    return assemble(shards, listings, check_repeats=False)  # checked when it was built


def check_unchanged(shards: ShardSet, *, option: str = "--data") -> None:
    """Every shard still has the size and stamp recorded (one listing per folder):
    FileNotFoundError for a missing one, ValueError for one that changed."""
    for before, now in zip(shards.shards, stat_shards([s.path for s in shards.shards])):
        if now is None:
            raise FileNotFoundError(f"{option}: shard {before.name} is missing ({before.path})")
        info = now[0]
        if (before.size, before.stamp) != (info.size, info.stamp):
            what = (f"size {before.size:,} -> {info.size:,} bytes" if before.size != info.size
                    else "ETag" if _storage.is_remote(info.path) else "modification time")
            raise ValueError(f"{option}: shard {before.name} changed since it was indexed "
                             f"({what}); build the index again")
