"""Tar headers read directly: the members of a shard, where their bytes lie, and the samples
they form under WebDataset's naming convention.

Only 512-byte headers are parsed (ustar, GNU and pax), so a listing reads a few hundred bytes
per member instead of the members themselves, and a reader can check the header in front
of any byte range it is about to hand out (:func:`member_problem`). ``tarfile`` cannot do
either without reading the archive from its start; it is what the tests compare against.

WebDataset's convention (``webdataset.tariterators``), followed exactly:

- only regular files count (links, folders and devices are skipped);
- names matching ``__[^/]*__($|/)`` at their start are metadata and skipped;
- a name splits into ``__key__`` and extension at the **first dot of its last path
  component**: ``dir/n01440764_10026.jpg`` is key ``dir/n01440764_10026``, extension ``jpg``;
  ``a.seg.png`` is key ``a``, extension ``seg.png`` (so it is not a ``png`` image); the
  extension is lower-cased; a last component without a dot, or starting with one, is no
  sample's member and is skipped;
- consecutive members with the same key form one sample; a sample with the same
  extension twice is an error (webdataset raises too). A key that comes back after other
  keys would be a second sample with the same ``__key__`` in webdataset; here it is an error.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

BLOCK = 512
# The image of a sample: the first of these extensions it has, in this order (timm's and
# webdataset's ``jpg;jpeg;png;webp``).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
LABEL_EXTENSION = "cls"
_IMAGE_SUFFIXES = {ext.encode() for ext in IMAGE_EXTENSIONS}
_LONGEST_EXTENSION = max(map(len, IMAGE_EXTENSIONS))
_MAX_CLS_BYTES = 32          # "123\n": anything longer is not a class index
_MAX_META_BYTES = 1 << 20    # a pax record or GNU long name larger than this is damage

_REGULAR = (b"0", b"\0", b"7")           # file, old-style file, contiguous file
_NAME_RECORDS = (b"L", b"x")             # GNU long name, pax extended header (next member)
_SKIPPED_RECORDS = (b"K", b"g")          # GNU long link name, pax global header
_UNSUPPORTED = {b"S": "a GNU sparse file", b"M": "a multi-volume continuation"}
_POSIX_MAGIC = b"ustar\x0000"

_META = re.compile(r"__[^/]*__($|/)")
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


@dataclass(frozen=True)
class Member:
    """A regular file in a tar archive: its name and its data's byte range."""

    name: str
    offset: int      # first byte of the data (its header is the 512 bytes before)
    size: int        # data bytes


@dataclass(frozen=True)
class Sample:
    """The members sharing one ``__key__``: the image chosen and the label read."""

    key: str
    image: Member
    label: int       # from the ``cls`` member, -1 without one


class Header:
    """One parsed 512-byte header block."""

    __slots__ = ("block", "type", "size", "name")

    def __init__(self, block: bytes):
        self.block = block
        self.type = block[156:157]
        self.size = _number(block[124:136])
        name = block[0:100].split(b"\0", 1)[0]
        if block[257:265] == _POSIX_MAGIC:  # POSIX ustar: long names split into prefix/name
            prefix = block[345:500].split(b"\0", 1)[0]
            if prefix:
                name = prefix + b"/" + name
        self.name = name

    @property
    def checksum_ok(self) -> bool:
        return _checksum_ok(self.block)


def _number(field: bytes) -> int:
    """A numeric header field: octal text, or GNU base-256 for large values."""
    if field[:1] == b"\x80":
        return int.from_bytes(field[1:], "big")
    if field[:1] == b"\xff":
        raise ValueError("negative number")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _checksum_ok(block: bytes) -> bool:
    """The stored sum equals the sum of the block with its checksum field as spaces
    (unsigned bytes, as POSIX says; signed too, as some old writers did)."""
    try:
        stored = _number(block[148:156])
    except ValueError:
        return False
    rest = block[:148] + b" " * 8 + block[156:]
    unsigned = sum(rest)
    if stored == unsigned:
        return True
    return stored == unsigned - 256 * sum(1 for byte in rest if byte > 127)


def padded(size: int) -> int:
    """Bytes a member's data occupies in the archive (whole blocks)."""
    return (size + BLOCK - 1) // BLOCK * BLOCK


def split_name(name: str) -> tuple[str, str] | None:
    """(key, lower-case extension) of a member name under WebDataset's rule, or None for a
    name that belongs to no sample (metadata ``__x__``, no extension, hidden)."""
    if _META.match(name):
        return None
    match = _KEY_EXT.match(name)
    if match is None:
        return None
    return match.group(1), match.group(2).lower()


def _pax_path(data: bytes, where: str) -> bytes | None:
    """The ``path`` record of a pax extended header ("LEN key=value\\n" records)."""
    pos, path = 0, None
    while pos < len(data) and data[pos:pos + 1] not in (b"", b"\0"):
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
        except ValueError:
            raise ValueError(f"{where}: damaged pax header") from None
        record = data[space + 1:pos + length]
        if length <= 0 or not record.endswith(b"\n"):
            raise ValueError(f"{where}: damaged pax header")
        key, _, value = record[:-1].partition(b"=")
        if key == b"path":
            path = value
        elif key == b"size":  # pax sizes beyond 8 GiB: no image member is that large
            raise ValueError(f"{where}: a member larger than 8 GiB (pax size record)")
        pos += length
    return path


def _decode(name: bytes, where: str) -> str:
    try:
        return name.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{where}: member name {name!r} is not UTF-8") from None


def iter_members(read_at: Callable[[int, int], bytes], file_size: int,
                 shard: str) -> Iterator[Member]:
    """The regular files of a tar archive in order, from its headers alone.

    ``read_at(offset, n)`` returns up to ``n`` bytes of the archive from ``offset``.
    ValueError (naming ``shard``) for a damaged header, a member that runs past the end of
    the file, and an archive without its end-of-archive block (a truncated copy).
    """
    pos, long_name = 0, None
    while True:
        block = read_at(pos, BLOCK) if pos + BLOCK <= file_size else b""
        if len(block) < BLOCK:
            where = ("without the tar end-of-archive block" if pos >= file_size
                     else "inside a tar header")
            raise ValueError(f"shard {shard} is truncated: it ends at byte {file_size:,} {where}")
        if block.count(0) == BLOCK:  # end-of-archive
            return
        where = f"shard {shard}: tar header at byte {pos:,}"
        if not _checksum_ok(block):
            raise ValueError(f"{where} is damaged (bad checksum)")
        header = Header(block)
        data = pos + BLOCK
        if data + header.size > file_size:
            raise ValueError(f"shard {shard} is truncated: member at byte {pos:,} needs "
                             f"{header.size:,} bytes, the file ends at byte {file_size:,}")
        kind = header.type
        if kind in _NAME_RECORDS:
            if header.size > _MAX_META_BYTES:
                raise ValueError(f"{where}: a {header.size:,}-byte name record")
            record = read_at(data, header.size)
            long_name = (record.split(b"\0", 1)[0] if kind == b"L"
                         else _pax_path(record, where)) or long_name
        elif kind in _UNSUPPORTED:
            raise ValueError(f"{where}: {_UNSUPPORTED[kind]} cannot be read by byte range")
        elif kind not in _SKIPPED_RECORDS:
            if kind in _REGULAR:
                yield Member(_decode(long_name or header.name, where), data, header.size)
            long_name = None
        pos = data + padded(header.size)


def member_problem(block: bytes, key: str, size: int) -> str | None:
    """What is wrong with ``block`` as the header of sample ``key``'s image of ``size``
    bytes, or None. Checked: a regular file of that size named ``KEY.EXT`` with an image
    extension — the header the listing found in front of these bytes. A name a header
    cannot hold whole (non-ASCII, or longer than 100 bytes: it lives in a pax or GNU record
    before the header) cannot be compared; the header's checksum is checked instead."""
    kind = block[156:157]
    if kind not in _REGULAR:
        return f"the header in front of the indexed bytes is not a file's (type {kind!r})"
    try:
        found = _number(block[124:136])
    except ValueError:
        found = -1
    if found != size:
        return (f"the member in front of the indexed bytes has {found:,} bytes, the index "
                f"says {size:,}")
    stem = (key + ".").encode("utf-8")
    if not stem.isascii() or len(stem) + _LONGEST_EXTENSION > 100:
        return None if _checksum_ok(block) else "no tar header in front of the indexed bytes"
    name = block[:100].split(b"\0", 1)[0]
    if block[257:265] == _POSIX_MAGIC and block[345:346] != b"\0":
        name = Header(block).name
    if not (name.startswith(stem) and name[len(stem):].lower() in _IMAGE_SUFFIXES):
        return (f"the member at the indexed bytes is {name.decode('utf-8', 'replace')!r}, "
                f"not {key}'s image")
    return None


def group_samples(members: Iterator[Member], read_at: Callable[[int, int], bytes],
                  shard: str) -> tuple[list[Sample], int]:
    """The samples of a shard's members (see the module docstring) and the number of
    members that belong to no sample. ValueError naming the shard and the key for a
    sample without an image, a ``cls`` that is not an integer, an extension twice in a
    sample, and a key that comes back after other keys."""
    samples: list[Sample] = []
    seen: set[str] = set()
    skipped = 0
    key, parts = None, {}

    def finish() -> None:
        if key is None:
            return
        image = next((parts[ext] for ext in IMAGE_EXTENSIONS if ext in parts), None)
        if image is None:
            raise ValueError(f"shard {shard}: sample {key!r} has no image (members: "
                             f"{', '.join(sorted(parts))}; an image is "
                             f"{'/'.join(IMAGE_EXTENSIONS)})")
        label = _label(parts[LABEL_EXTENSION], read_at, shard, key) \
            if LABEL_EXTENSION in parts else -1
        samples.append(Sample(key, image, label))

    for member in members:
        split = split_name(member.name)
        if split is None:
            skipped += 1
            continue
        name_key, ext = split
        if name_key != key:
            finish()
            if name_key in seen:
                raise ValueError(f"shard {shard}: __key__ {name_key!r} appears again at byte "
                                 f"{member.offset - BLOCK:,} after other keys (two samples with "
                                 "one key)")
            seen.add(name_key)
            key, parts = name_key, {}
        if ext in parts:
            raise ValueError(f"shard {shard}: sample {key!r} has two {ext!r} members")
        parts[ext] = member
    finish()
    return samples, skipped


def _label(member: Member, read_at: Callable[[int, int], bytes], shard: str, key: str) -> int:
    """The class index a ``cls`` member holds as text (-1: unknown)."""
    raw = read_at(member.offset, member.size) if member.size <= _MAX_CLS_BYTES else b""
    text = raw.decode("ascii", "replace").strip()
    try:
        label = int(text)
    except ValueError:
        shown = repr(text) if member.size <= _MAX_CLS_BYTES else f"{member.size:,} bytes"
        raise ValueError(f"shard {shard}: sample {key!r}: cls {shown} is not an integer "
                         "class index") from None
    if label < -1:
        raise ValueError(f"shard {shard}: sample {key!r}: cls {label} must be >= 0 (or -1 for "
                         "unknown)")
    return label


def sample_arrays(samples: list[Sample]) -> dict[str, np.ndarray]:
    """Column arrays of a shard's samples: labels, image offsets and sizes (int64)."""
    n = len(samples)
    return {"labels": np.fromiter((s.label for s in samples), np.int64, n),
            "offsets": np.fromiter((s.image.offset for s in samples), np.int64, n),
            "sizes": np.fromiter((s.image.size for s in samples), np.int64, n)}
