"""Keys as text: what a key may contain, and reading and writing the text files that hold keys.

Keys travel one per line through text files -- ``failed.txt``, PaddleClas list files
(``select-topk --list-out``), exclude lists (``dedup`` output, ``select-topk --exclude``) -- whose
fields are tab-separated and whose lines are read with surrounding whitespace stripped. A key with
a line break, a tab or another control character, or with leading or trailing whitespace, cannot
make that round trip, so such keys are refused where they first appear (the data listing and
``labelstore.create``) rather than escaped in every file. So are keys that are not valid UTF-8.

:func:`read_text` (and :func:`read_lines` on top of it) is the one reader of text files: a
leading UTF-8 byte-order mark is dropped and invalid UTF-8 is an error naming file and line.
"""
from __future__ import annotations

import re
from typing import Sequence

# Control characters (C0, DEL, NEL) and the Unicode line/paragraph separators: str.splitlines
# breaks lines at several of them, and a tab separates fields.
_BAD_CHAR = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]")
_EDGE_SPACE = re.compile(r"^\s|\s$")
# The character check over all keys joined by "\n": a bare character class is one fast C
# pass over the text (alternatives anchored at line edges made the pass ~10x slower).
_BAD_JOINED = re.compile(r"[\x00-\x09\x0b-\x1f\x7f\x85\u2028\u2029]")
_SPACE = re.compile(r"[^\S\n]")
_CHAR_NAMES = {"\n": "a newline", "\t": "a tab", "\r": "a carriage return",
               "\x85": "a next-line character", "\u2028": "a line separator",
               "\u2029": "a paragraph separator"}
_NEWLINES = re.compile(r"\r\n|\r|\n")
_BOM = "\ufeff"  # what some editors put before the first line of a UTF-8 file

KEY_RULE = ("keys go one per line into failed.txt, list files and exclude lists, so names with "
            "line breaks, tabs or other control characters, or with leading or trailing "
            "whitespace, are refused: rename the file")


def key_problem(key: str) -> str | None:
    """What makes ``key`` unfit as a store key (``"contains a tab"``, ...), or None."""
    bad = _BAD_CHAR.search(key)
    if bad:
        return f"contains {_CHAR_NAMES.get(bad.group(), f'the control character {bad.group()!r}')}"
    if _EDGE_SPACE.search(key):
        return "starts or ends with whitespace"
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    return None


def first_bad_key(keys: Sequence[str]) -> tuple[int, str] | None:
    """(row, problem) of the first key :func:`key_problem` refuses; None when all are fine."""
    text = "\n".join(keys)
    try:
        text.encode("utf-8")
        clean = text.count("\n") == max(len(keys) - 1, 0) and not _BAD_JOINED.search(text)
    except UnicodeEncodeError:
        clean = False
    if clean and _SPACE.search(text):  # whitespace somewhere: is any of it at a key's edge?
        clean = all(key == key.strip() for key in keys)
    if clean:
        return None
    for row, key in enumerate(keys):
        problem = key_problem(key)
        if problem:
            return row, problem
    return None


def escapes_root(key: str) -> bool:
    """True for an absolute key or one with a ``..`` component: it names a file outside the
    dataset root it is supposed to be relative to."""
    # the substring test first: a store's millions of keys are checked, almost none has ".."
    return key.startswith("/") or (".." in key and ".." in key.replace("\\", "/").split("/"))


def read_lines(path: str, what: str) -> list[str]:
    """The lines of a UTF-8 text file (``\\n``, ``\\r\\n`` or ``\\r`` endings); see
    :func:`read_text`."""
    return _split_lines(read_text(path, what))


def read_text(path: str, what: str) -> str:
    """A UTF-8 text file as one string, a leading byte-order mark removed.

    Every text file ssld reads (list files, class names, exclude lists, failed.txt, its own
    JSON and CSV records) goes through here or :func:`decode_text`, so a file saved by an
    editor that writes a BOM reads the same as one without, and invalid UTF-8 is a
    ValueError naming ``what``, the file and the line, not a bare ``UnicodeDecodeError``.
    """
    if "://" in str(path):  # a file beside a store on object storage (failed.txt)
        import fsspec

        with fsspec.open(str(path), "rb") as handle:
            return decode_text(handle.read(), path, what)
    with open(path, "rb") as handle:
        return decode_text(handle.read(), path, what)


def decode_text(raw: bytes, path: str, what: str) -> str:
    """:func:`read_text` of bytes already read from ``path``."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = len(_NEWLINES.split(raw[:exc.start].decode("utf-8")))
        raise ValueError(f"{what} {path}:{line}: not valid UTF-8 (byte 0x{raw[exc.start]:02x}); "
                         "save the file as UTF-8") from None
    return text[1:] if text.startswith(_BOM) else text


def decode_lines(raw: bytes, path: str, what: str) -> list[str]:
    """:func:`read_lines` of bytes already read from ``path``."""
    return _split_lines(decode_text(raw, path, what))


def _split_lines(text: str) -> list[str]:
    """``text`` split at ``\\n``, ``\\r\\n`` or ``\\r``, without a final empty line."""
    lines = _NEWLINES.split(text)
    return lines[:-1] if lines and lines[-1] == "" else lines
