"""The index files shards come with, read and checked.

- **timm's ``_info.json``** (``timm/data/readers/reader_wds.py``): ``{"splits": {NAME:
  {"num_samples", "filenames", "shard_lengths"}}}``, file names relative to the JSON's
  folder. Read: a split's shards in order and each shard's sample count. Verified: the
  counts add up to ``num_samples`` (here) and each shard holds as many samples as its
  ``shard_lengths`` entry says (when it is listed).
- **wids shard index** (``wids-shard-index-v1``, ``wids_version`` 1): ``{"shardlist":
  [{"url", "nsamples", "filesize"?, "md5sum"?}]}``, relative URLs against the JSON's
  folder. Read: the shards in order and their counts. Verified: each ``filesize`` against
  the file (when the source is resolved), each count when the shard is listed.
  ``md5sum`` is not checked (it would read every shard whole). Sub-dataset references
  (``datasets``) are refused.
- **DALI's ``.idx``** beside a shard (``NAME.tar`` → ``NAME.idx``; DALI's ``wds2idx.py``,
  format ``v1.2 N`` then one line per sample of ``ext data_offset size filename`` groups):
  read as the shard's member list, so the shard itself is not scanned (on object storage
  that saves reading it whole). Verified: the count line, block-aligned, increasing,
  non-overlapping ranges inside the file, the tar headers in front of the first and the
  last member and the end-of-archive block after it; every later read checks its own
  member's header. ``v1.1`` files carry no file names: the shard is scanned instead.
"""
from __future__ import annotations

import json
from typing import Any

from ._tar import BLOCK, Member

DALI_INDEX_VERSION = "v1.2"


def dali_index_name(shard: str) -> str:
    """The ``.idx`` file DALI's wds2idx writes for ``shard`` (``a-0001.tar`` → ``a-0001.idx``)."""
    return (shard[:-len(".tar")] if shard.endswith(".tar") else shard) + ".idx"


def parse_dali_index(text: str, where: str) -> list[Member] | None:
    """The members a DALI index lists, in file order; None for a ``v1.1`` index (no file
    names). ValueError naming the file and line for anything else it cannot be."""
    lines = text.splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] not in ("v1.1", DALI_INDEX_VERSION):
        raise ValueError(f"{where}: not a DALI webdataset index (first line {lines[:1]!r}; "
                         f"expected '{DALI_INDEX_VERSION} <samples>')")
    if head[0] == "v1.1":
        return None
    try:
        count = int(head[1])
    except ValueError:
        raise ValueError(f"{where}: sample count {head[1]!r} is not an integer") from None
    body = [line for line in lines[1:] if line.strip()]
    if len(body) != count:
        raise ValueError(f"{where}: the first line says {count:,} samples, the file lists "
                         f"{len(body):,}")
    members = []
    for number, line in enumerate(body, start=2):
        fields = line.split()
        if not fields or len(fields) % 4:
            raise ValueError(f"{where}:{number}: expected groups of 'ext offset size filename' "
                             "(a file name with a space?)")
        for at in range(0, len(fields), 4):
            _, offset, size, name = fields[at:at + 4]
            try:
                members.append(Member(name, int(offset), int(size)))
            except ValueError:
                raise ValueError(f"{where}:{number}: offset {offset!r} or size {size!r} is not "
                                 "an integer") from None
    return members


def dali_range_problem(members: list[Member], file_size: int) -> str | None:
    """What makes these ranges impossible in a tar file of ``file_size`` bytes, or None."""
    end = 0
    for member in members:
        if member.offset % BLOCK or member.offset < end + BLOCK or member.size < 0:
            return (f"member {member.name!r} at byte {member.offset:,} is not a block-aligned "
                    "range after the previous one")
        end = member.offset + (member.size + BLOCK - 1) // BLOCK * BLOCK
        if member.offset + member.size > file_size:
            return f"member {member.name!r} ends past the end of the shard ({file_size:,} bytes)"
    if end + BLOCK > file_size:
        return "no room for the end-of-archive block after the last member"
    return None


def load_json(raw: bytes, where: str) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{where}: not a JSON file ({exc})") from None


def timm_split(info: dict, split: str | None, where: str) -> tuple[list[str], list[int]]:
    """A split's shard file names and sample counts from timm's ``_info.json``."""
    splits = info.get("splits")
    if not isinstance(splits, dict) or not splits:
        raise ValueError(f"{where}: no 'splits' in this _info.json")
    if split is None:
        if len(splits) > 1:
            raise ValueError(f"{where} has the splits {', '.join(sorted(splits))}: name one as "
                             f"{where}#SPLIT")
        split = next(iter(splits))
    if split not in splits:
        raise ValueError(f"{where} has no split {split!r} (it has {', '.join(sorted(splits))})")
    entry = splits[split]
    try:
        names = [str(name) for name in entry["filenames"]]
        counts = [int(count) for count in entry["shard_lengths"]]
        total = int(entry["num_samples"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{where}: split {split!r} lacks filenames, shard_lengths or "
                         f"num_samples ({exc})") from None
    if len(names) != len(counts):
        raise ValueError(f"{where}: split {split!r} lists {len(names)} filenames but "
                         f"{len(counts)} shard_lengths")
    if sum(counts) != total:
        raise ValueError(f"{where}: split {split!r} says num_samples {total:,}, its "
                         f"shard_lengths add up to {sum(counts):,}")
    return names, counts


def timm_split_of(info: dict) -> dict[str, str]:
    """Shard file name → split name, over every split of an ``_info.json``."""
    out = {}
    for split, entry in (info.get("splits") or {}).items():
        for name in (entry or {}).get("filenames") or ():
            out[str(name)] = split
    return out


def wids_shards(index: dict, where: str) -> list[dict]:
    """The ``shardlist`` entries of a wids shard index (url, nsamples, filesize?)."""
    if index.get("wids_version") != 1 and index.get("__kind__") != "wids-shard-index-v1":
        raise ValueError(f"{where}: not a wids shard index (no wids_version 1)")
    if index.get("datasets"):
        raise ValueError(f"{where}: wids sub-datasets ('datasets') are not supported; list the "
                         "shards in 'shardlist'")
    shards = index.get("shardlist")
    if not isinstance(shards, list) or not shards:
        raise ValueError(f"{where}: empty or missing 'shardlist'")
    for number, entry in enumerate(shards):
        if not isinstance(entry, dict) or "url" not in entry or "nsamples" not in entry:
            raise ValueError(f"{where}: shardlist entry {number} needs 'url' and 'nsamples'")
    return shards
