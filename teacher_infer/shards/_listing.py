"""Listing shards: the samples of each (key, label, the image's byte range), and all of them
as the rows of a store-to-be (:class:`ShardSamples`).

One shard is listed from its DALI ``.idx`` when it has a usable one, else from its tar
headers (:mod:`._tar`): locally a few KiB read per sample (``os.pread``), on object
storage the shard read through 16 MiB ranged GETs (one request per header would be
millions of requests). Listing is parallel over ``torchrun`` ranks (each lists a share of
the shards) and, on object storage, over threads within a rank.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np

from labelstore import KEY_RULE, TAR_FIELDS, escapes_root, first_bad_key

from . import _formats, _storage
from ._source import ShardFile, ShardSet
from ._tar import BLOCK, Header, Member, group_samples, iter_members, sample_arrays

if TYPE_CHECKING:  # pragma: no cover
    from ._reader import ShardReader

LOCAL_MIN_READ = 4 << 10     # a header, a small member after it, often the next header
REMOTE_MIN_READ = 16 << 20   # object storage: few large ranged GETs per shard
REMOTE_THREADS = 16          # shards listed at once per rank on object storage


@dataclass(frozen=True)
class ShardListing:
    """The samples of one shard, in tar order."""

    shard: ShardFile                 # size and stamp: the file that was listed
    keys: list[str]                  # sample keys (webdataset ``__key__``)
    labels: np.ndarray               # (n,) int64 from ``cls``, -1 without
    offsets: np.ndarray              # (n,) int64 first byte of each image's data
    sizes: np.ndarray                # (n,) int64 image bytes
    skipped: int                     # members that belong to no sample
    via: str                         # "tar" (headers scanned) or "dali-idx"

    def __len__(self) -> int:
        return len(self.keys)


def list_shard(shard: ShardFile, *, use_dali_index: bool = True) -> ShardListing:
    """The samples of one shard. ValueError naming the shard for damage (see ``_tar``), a
    sample count that differs from the one its index file promised, or a DALI index that
    does not describe it; FileNotFoundError when it is gone."""
    remote = _storage.is_remote(shard.path)
    try:
        source = _storage.RangeFile(shard.path)
    except FileNotFoundError:
        raise FileNotFoundError(f"shard {shard.name} does not exist ({shard.path})") from None
    try:
        if not remote:  # the file actually read (it may have changed since it was resolved)
            info = source.info()
            shard = ShardFile(shard.name, shard.path, info.size, info.stamp, shard.expected,
                              shard.dali_index)
        read_at = _storage.Window(source, shard.size,
                                  REMOTE_MIN_READ if remote else LOCAL_MIN_READ)
        members, via = None, "tar"
        if use_dali_index and shard.dali_index:
            members = _dali_members(shard, source)
            via = "dali-idx" if members is not None else via
        if members is None:
            members = iter_members(read_at, shard.size, shard.name)
        samples, skipped = group_samples(iter(members), read_at, shard.name)
    finally:
        source.close()
    if not samples:
        raise ValueError(f"shard {shard.name} has no samples")
    if shard.expected is not None and len(samples) != shard.expected:
        raise ValueError(f"shard {shard.name} has {len(samples):,} samples, its index file says "
                         f"{shard.expected:,}")
    keys = [sample.key for sample in samples]
    _check_keys(keys, shard.name)
    return ShardListing(shard, keys, skipped=skipped, via=via, **sample_arrays(samples))


def _dali_members(shard: ShardFile, source: _storage.RangeFile) -> list[Member] | None:
    """The members a DALI v1.2 index lists, checked against the shard (module docstring
    of ``_formats``); None for a v1.1 index."""
    where = shard.dali_index
    members = _formats.parse_dali_index(
        _storage.read_bytes(where).decode("utf-8", "replace"), where)
    if members is None:
        return None
    problem = _formats.dali_range_problem(members, shard.size) if members else "no members"
    if problem is None:
        first, last = members[0], members[-1]
        end = last.offset + (last.size + BLOCK - 1) // BLOCK * BLOCK
        for member in (first, last):
            problem = _header_problem(source.read(member.offset - BLOCK, member.offset), member)
            if problem:
                break
        if problem is None and source.read(end, end + BLOCK).count(0) != BLOCK:
            problem = "the shard goes on after the last member it lists"
    if problem:
        raise ValueError(f"{where} does not describe shard {shard.name} (made for another "
                         f"version of it?): {problem}; delete it or rebuild it with DALI's "
                         "wds2idx.py")
    return members


def _header_problem(header: bytes, member: Member) -> str | None:
    """Whether ``header`` is the tar header of ``member``: checksum, size, and the name
    when a header can hold it whole (ASCII, at most 100 bytes)."""
    parsed = Header(header)
    if not parsed.checksum_ok or parsed.size != member.size:
        return f"no header of a {member.size:,}-byte member before byte {member.offset:,}"
    if member.name.isascii() and len(member.name) <= 100 and \
            parsed.name.decode("utf-8", "replace") != member.name:
        return f"the header before byte {member.offset:,} names {parsed.name!r}, not " \
               f"{member.name!r}"
    return None


def _check_keys(keys: list[str], shard: str) -> None:
    bad = first_bad_key(keys)
    if bad is not None:
        row, problem = bad
        raise ValueError(f"shard {shard}: __key__ {keys[row]!r} {problem}; {KEY_RULE}")
    for key in keys:
        if escapes_root(key) or "" in key.split("/"):
            raise ValueError(f"shard {shard}: __key__ {key!r} is absolute or has an empty or "
                             "'..' part; it cannot name a sample below its shard")


@dataclass(frozen=True)
class ShardSamples:
    """The samples of a shard source as the rows of a store: ``keys`` (``SHARD/KEY``,
    unique), ``labels`` and ``tar`` (per row: the image's byte offset and size, and its
    shard's size and stamp when listed: :data:`TAR_FIELDS`), in shard order.

    Has the attributes of ``teacher_infer.data.Samples`` the teacher pass reads (``root``,
    ``source``, ``keys``, ``labels``, ``class_names``, ``len``); images are read with
    :meth:`reader`, not by path.
    """

    root: str
    keys: list[str]
    labels: np.ndarray                 # (N,) int64, -1 where unknown
    tar: np.ndarray                    # (N, 4) int64: TAR_FIELDS
    shards: tuple[ShardFile, ...]      # as listed (size, stamp of the file read)
    bounds: np.ndarray                 # (S + 1,) first row of each shard, then N
    spec: str = ""
    kind: str = ""
    source: str = "shards"
    class_names: list[str] | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def path(self, row: int) -> str:
        """Where row ``row``'s image is: its shard's path + ``/`` + its sample key."""
        return _storage.join(self.root, self.keys[row])

    def shard_of(self, row: int) -> ShardFile:
        return self.shards[int(np.searchsorted(self.bounds, row, side="right")) - 1]

    def reader(self, **options: Any) -> "ShardReader":
        """A :class:`ShardReader` of these rows' images (``read(key, tar_row)``)."""
        from ._reader import ShardReader

        return ShardReader(self.root, **options)


def assemble(shards: ShardSet, listings: Sequence[ShardListing], *,
             check_repeats: bool = True) -> ShardSamples:
    """The rows of all listings in shard order. ValueError when a ``__key__`` appears in
    two shards (``check_repeats``; a listing already refused repeats within one shard)."""
    if check_repeats:
        owner: dict[str, str] = {}
        for listing in listings:
            name = listing.shard.name
            for key in listing.keys:
                first = owner.setdefault(key, name)
                if first != name:
                    raise ValueError(f"__key__ {key!r} is in shard {first} and in shard {name} "
                                     "(the same sample twice?)")
    counts = np.array([len(listing) for listing in listings], dtype=np.int64)
    keys = [f"{listing.shard.name}/{key}" for listing in listings for key in listing.keys]
    tar = np.empty((int(counts.sum()), len(TAR_FIELDS)), dtype=np.int64)
    tar[:, 0] = np.concatenate([listing.offsets for listing in listings])
    tar[:, 1] = np.concatenate([listing.sizes for listing in listings])
    tar[:, 2] = np.repeat([listing.shard.size for listing in listings], counts)
    tar[:, 3] = np.repeat([listing.shard.stamp for listing in listings], counts)
    return ShardSamples(shards.root, keys, np.concatenate([l.labels for l in listings]), tar,
                        tuple(listing.shard for listing in listings),
                        np.concatenate([[0], np.cumsum(counts)]), spec=shards.spec,
                        kind=shards.kind)


def list_many(shards: Iterable[ShardFile], *, use_dali_index: bool = True,
              threads: int | None = None, then: Callable[[ShardListing], Any] | None = None,
              progress: Any = None) -> tuple[list[Any], list[tuple[str, str, str]]]:
    """List ``shards`` (threads: ``REMOTE_THREADS`` on object storage, 1 locally). Returns
    the listings in order — or what ``then`` returns for each, so that a caller that
    stores them need not hold them all — and the failures as (shard name, error type,
    message): damage in one shard does not stop the others."""
    shards = list(shards)
    if threads is None:
        threads = REMOTE_THREADS if any(_storage.is_remote(s.path) for s in shards) else 1

    def one(shard: ShardFile) -> Any:
        try:
            listing = list_shard(shard, use_dali_index=use_dali_index)
            return listing if then is None else then(listing)
        except (ValueError, OSError) as exc:
            return _Failure(shard.name, type(exc).__name__, str(exc))
        finally:
            if progress is not None:
                progress.update(1)

    if threads > 1 and len(shards) > 1:
        with ThreadPoolExecutor(min(threads, len(shards))) as pool:
            results = list(pool.map(one, shards))
    else:
        results = [one(shard) for shard in shards]
    return ([r for r in results if not isinstance(r, _Failure)],
            [tuple(r) for r in results if isinstance(r, _Failure)])


class _Failure(tuple):
    """(shard name, error type, message) of a shard that could not be listed."""

    def __new__(cls, *fields: str) -> "_Failure":
        return super().__new__(cls, fields)


def on_main(dist: Any, make: Callable[[], Any]) -> Any:
    """``Dist.on_main`` for a ``dist`` that may be None (a single process)."""
    from ..runtime import Dist

    return (dist if dist is not None else Dist()).on_main(make)


def raise_failures(failures: Sequence[tuple[str, str, str]], total: int) -> None:
    """One line for the first failure (and how many shards failed); the type is kept for a
    missing file (FileNotFoundError), ValueError otherwise."""
    if not failures:
        return
    _, kind, message = failures[0]
    more = f" ({len(failures):,} of {total:,} shards failed)" if len(failures) > 1 else ""
    raise (FileNotFoundError if kind == "FileNotFoundError" else ValueError)(message + more)


def list_samples(shards: ShardSet, *, dist: Any = None, use_dali_index: bool = True,
                 threads: int | None = None, progress: bool = False) -> ShardSamples:
    """Every sample of ``shards``, listed now (nothing is written). Under ``torchrun`` pass
    the ``Dist``: each rank lists a share and every rank gets every row (all-gather), so
    keep this for data sets of up to a few million samples and build an index
    (:func:`build_index`) for more.
    """
    from ._progress import bar

    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    mine = list(shards.shards[rank::world])
    with bar(progress and rank == 0, len(mine), "list shards", "shard") as progress_bar:
        listings, failures = list_many(mine, use_dali_index=use_dali_index, threads=threads,
                                       progress=progress_bar)
    if dist is not None and dist.enabled:
        gathered = dist.gather((listings, failures))
        listings = [listing for part, _ in gathered for listing in part]
        failures = [failure for _, part in gathered for failure in part]
    raise_failures(failures, len(shards))
    order = {shard.name: number for number, shard in enumerate(shards.shards)}
    listings.sort(key=lambda listing: order[listing.shard.name])
    return assemble(shards, listings)
