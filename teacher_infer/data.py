"""Data sources: which images to run, their keys and (where known) their labels.

Three kinds of ``--data`` (design.md §5):

- ``folder``: ImageNet layout, ``ROOT/<class>/**/<image>``; label = index of the class
  folder in sorted order (torchvision's ``ImageFolder`` rule), class names recorded;
- ``unlabeled``: a folder of images searched recursively, every label -1;
- ``list``: a PaddleClas list file of ``relative/path [label]`` lines resolved against
  ``--root`` (default: the list file's folder).

Keys are POSIX paths relative to the root; they identify rows in the store and seed
the view boxes, so the same image gets the same key (and boxes) on every machine.
Nothing here imports torch.
"""
from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass

import numpy as np

# Common image extensions, matched case-insensitively (.JPG, .Jpeg ...).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".tif", ".tiff", ".webp",
                    ".gif", ".ppm", ".pgm", ".pbm", ".pnm")


@dataclass(frozen=True)
class Samples:
    """The rows of a store-to-be, in store order."""

    root: str                        # absolute folder the keys are relative to
    source: str                      # folder | unlabeled | list
    keys: list[str]                  # POSIX paths relative to root, unique
    labels: np.ndarray               # (N,) int64, -1 where unknown
    class_names: list[str] | None    # folder names (folder source)

    def __len__(self) -> int:
        return len(self.keys)

    def path(self, row: int) -> str:
        return os.path.join(self.root, *self.keys[row].split("/"))


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _walk_images(top: str, root: str) -> list[str]:
    """Image keys under ``top`` (recursive, symlinks followed, hidden entries skipped)."""
    keys = []
    for folder, dirs, files in os.walk(top, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = os.path.relpath(folder, root)
        for name in sorted(files):
            if not name.startswith(".") and is_image_file(name):
                key = name if rel == "." else posixpath.join(rel.replace(os.sep, "/"), name)
                keys.append(key)
    return keys


def _class_dirs(root: str) -> list[str]:
    with os.scandir(root) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def _has_top_level_images(root: str) -> bool:
    with os.scandir(root) as entries:
        return any(e.is_file() and is_image_file(e.name) for e in entries)


def detect_source(data: str) -> str:
    """``list`` for a file; for a folder ``folder`` when its images all sit in
    sub-folders, ``unlabeled`` when some lie at the top level."""
    if os.path.isfile(data):
        return "list"
    if not os.path.isdir(data):
        raise FileNotFoundError(f"--data {data} does not exist")
    if _has_top_level_images(data) or not _class_dirs(data):
        return "unlabeled"
    return "folder"


def find_samples(data: str, *, root: str | None = None, source: str = "auto") -> Samples:
    """List the images of ``data`` (see the module docstring for the three kinds).

    >>> find_samples("imagenet/val").source        # doctest: +SKIP
    'folder'
    """
    data = os.fspath(data)
    if not os.path.exists(data):
        raise FileNotFoundError(f"--data {data} does not exist")
    kind = detect_source(data) if source == "auto" else source
    if kind == "list":
        if not os.path.isfile(data):
            raise ValueError(f"--data {data} is a folder, not a list file")
        return _from_list(data, root)
    if not os.path.isdir(data):
        raise ValueError(f"--data {data} is a file; --source {kind} needs a folder")
    if root is not None:
        raise ValueError("--root is only for list files (folder keys are relative to --data)")
    top = os.path.abspath(data)
    if kind == "folder":
        return _from_class_folders(top)
    keys = _walk_images(top, top)
    if not keys:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS[:5])}, ...) under {data}")
    return Samples(top, "unlabeled", keys, np.full(len(keys), -1, dtype=np.int64), None)


def _from_class_folders(top: str) -> Samples:
    classes = _class_dirs(top)
    if not classes:
        raise ValueError(f"{top} has no class sub-folders")
    keys: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        found = _walk_images(os.path.join(top, name), top)
        keys += found
        labels += [label] * len(found)
    if not keys:
        raise ValueError(f"no images in the class folders of {top}")
    return Samples(top, "folder", keys, np.asarray(labels, dtype=np.int64), classes)


def _parse_list_line(line: str, where: str) -> tuple[str, int]:
    """``path [label]``; the path may contain spaces when a label follows it."""
    parts = line.rsplit(maxsplit=1)
    if len(parts) == 2:
        try:
            label = int(parts[1])
        except ValueError:
            return line, -1  # no label: the whole line is the path
        if label < -1:
            raise ValueError(f"{where}: label {label} must be >= 0 (or -1 for unknown)")
        return parts[0], label
    return parts[0], -1


def _from_list(list_file: str, root: str | None) -> Samples:
    base = os.path.abspath(root if root is not None else os.path.dirname(list_file) or ".")
    if not os.path.isdir(base):
        raise FileNotFoundError(f"--root {base} is not a folder")
    keys: list[str] = []
    labels: list[int] = []
    seen: dict[str, int] = {}
    with open(list_file, encoding="utf-8") as handle:
        for number, raw in enumerate(handle, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            where = f"{list_file}:{number}"
            path, label = _parse_list_line(line, where)
            key = _relative_key(path, base, where)
            if key in seen:
                raise ValueError(f"{where}: {key!r} is listed twice (first at line {seen[key]})")
            seen[key] = number
            keys.append(key)
            labels.append(label)
    if not keys:
        raise ValueError(f"list file {list_file} has no entries")
    return Samples(base, "list", keys, np.asarray(labels, dtype=np.int64), None)


def _relative_key(path: str, base: str, where: str) -> str:
    path = path.replace("\\", "/")
    if os.path.isabs(path):
        rel = os.path.relpath(path, base)
        if rel.startswith(".."):
            raise ValueError(f"{where}: {path} is not under --root {base}")
        path = rel.replace(os.sep, "/")
    key = posixpath.normpath(path)
    if key.startswith("../") or key in (".", ".."):
        raise ValueError(f"{where}: {path} points outside --root {base}")
    return key


def read_class_names(path: str) -> list[str]:
    """One class name per non-empty line (PaddleClas label lists ``id name`` are accepted)."""
    names = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            first, _, rest = line.partition(" ")
            names.append(rest.strip() if first.isdigit() and rest.strip() else line)
    if not names:
        raise ValueError(f"class-names file {path} is empty")
    return names
