"""Data sources: which images to run, their keys and (where known) their labels.

Four kinds of ``--data`` (docs/commands.md, "ssld infer-teacher": the data sources table):

- ``folder``: ImageNet layout, ``ROOT/<class>/**/<image>``; label = index of the class
  folder in sorted order (torchvision's ``ImageFolder`` rule), class names recorded;
- ``unlabeled``: a folder of images searched recursively, every label -1;
- ``list``: a PaddleClas list file of ``relative/path [label]`` lines resolved against
  ``--root`` (default: the list file's folder);
- ``shards``: WebDataset tar shards (a brace pattern or glob, a folder of ``.tar`` files, an
  ``s3://`` prefix, timm's ``_info.json``, a wids index, an ``ssld index``), listed by
  ``teacher_infer.shards``: keys ``SHARD/KEY``, labels from ``cls`` members (``--source
  unlabeled``: every label -1, for a pool whose classes are not the model's, e.g.
  ImageNet-22k's), and per row the image's location in its shard (``tar``), which
  ``teacher_infer.images`` reads.

Keys are POSIX paths relative to the root; they identify rows in the store and seed
the view boxes, so the same image gets the same key (and boxes) on every machine.
Nothing here imports torch.
"""
from __future__ import annotations

import dataclasses
import os
import posixpath
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from labelstore import KEY_RULE, escapes_root, first_bad_key, key_problem, read_lines

if TYPE_CHECKING:  # pragma: no cover
    from .shards import ShardSamples

_INTEGER = re.compile(r"[+-]?[0-9]+")
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
    # where each image lies in a tar shard (labelstore.TAR_FIELDS; -1: a file); None when
    # every row is a file (shard sources are ``shards.ShardSamples``, which always have it)
    tar: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def path(self, row: int) -> str:
        return os.path.join(self.root, *self.keys[row].split("/"))


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _walk_images(top: str, root: str, seen: set[str]) -> list[str]:
    """Image keys under ``top``, recursively, in ``os.walk`` top-down order (sorted names,
    hidden entries skipped).

    Directory links are followed, but each real folder is listed at most once (``seen``
    holds the real paths listed so far): a link back into the data root is skipped (its
    images are listed under their own path), and a second link to the same outside folder
    too, so a ``loop -> ..`` neither multiplies the keys nor hangs the listing.
    """
    real_root = os.path.realpath(root)
    keys = []
    stack = [top]
    while stack:
        folder = stack.pop()
        real = os.path.realpath(folder)
        if real in seen:
            continue
        seen.add(real)
        with os.scandir(folder) as listing:
            entries = sorted(listing, key=lambda e: e.name)
        rel = os.path.relpath(folder, root)
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                if not (entry.is_symlink() and _inside(os.path.realpath(entry.path), real_root)):
                    subfolders.append(entry.path)
            elif is_image_file(entry.name):
                keys.append(entry.name if rel == "." else
                            posixpath.join(rel.replace(os.sep, "/"), entry.name))
        stack.extend(reversed(subfolders))
    return keys


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _check_keys(samples: "Samples") -> "Samples":
    """Refuse file names that cannot be keys (see ``labelstore._text``), naming the file."""
    bad = first_bad_key(samples.keys)
    if bad is not None:
        row, problem = bad
        raise ValueError(f"{samples.path(row)!r}: the file name {problem}; {KEY_RULE}")
    return samples


def _class_dirs(root: str) -> list[str]:
    with os.scandir(root) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def _has_top_level_images(root: str) -> bool:
    with os.scandir(root) as entries:
        return any(e.is_file() and is_image_file(e.name) for e in entries)


def detect_source(data: str, option: str = "--data") -> str:
    """``list`` for a file; for a folder ``folder`` when its images all sit in
    sub-folders, ``unlabeled`` when some lie at the top level."""
    if os.path.isfile(data):
        return "list"
    if not os.path.isdir(data):
        raise FileNotFoundError(f"{option} {data} does not exist")
    if _has_top_level_images(data) or not _class_dirs(data):
        return "unlabeled"
    return "folder"


def find_samples(data: str, *, root: str | None = None, source: str = "auto",
                 option: str = "--data", root_option: str = "--root",
                 dist: Any = None, progress: bool = False) -> "Samples | ShardSamples":
    """List the images of ``data`` (see the module docstring for the kinds): a
    :class:`Samples`, or for shards a ``shards.ShardSamples`` (the same attributes).

    ``option`` and ``root_option`` are the names errors give ``data`` and ``root``
    (``--val`` / ``--val-root`` for a validation set). Under ``torchrun`` pass the ranks'
    ``Dist`` on every rank: image files are listed by rank 0, shards by all ranks in shares
    (``shards.find_shard_samples``; ``progress``: a bar of the shards listed on rank 0);
    every rank gets every row.

    >>> find_samples("imagenet/val").source        # doctest: +SKIP
    'folder'
    """
    from .shards import find_shard_samples, is_shard_source

    data = os.fspath(data)
    if source == "shards" or (source in ("auto", "unlabeled") and is_shard_source(data)):
        if root is not None:
            raise ValueError(f"{root_option} is only for list files (shard keys are relative "
                             f"to the shards' folder: {option} names it)")
        found = find_shard_samples(data, dist=dist, option=option, progress=progress)
        if source == "unlabeled":  # the cls members are another class space (IN-22k's)
            found = dataclasses.replace(found, labels=np.full(len(found), -1, np.int64))
        return found
    if dist is not None and dist.enabled:
        return dist.on_main(lambda: find_samples(data, root=root, source=source,
                                                 option=option, root_option=root_option))
    if not os.path.exists(data):
        raise FileNotFoundError(f"{option} {data} does not exist")
    kind = detect_source(data, option) if source == "auto" else source
    if kind == "list":
        if not os.path.isfile(data):
            raise ValueError(f"{option} {data} is a folder, not a list file")
        if is_image_file(data):   # its bytes would be read as lines of paths
            raise ValueError(f"{option} {data} is an image, not a list file: pass the folder "
                             "of the images, or a list file of 'relative/path [label]' lines")
        return _from_list(data, root, root_option)
    if not os.path.isdir(data):
        raise ValueError(f"{option} {data} is a file; --source {kind} needs a folder")
    if root is not None:
        raise ValueError(f"{root_option} is only for list files (folder keys are relative to "
                         f"{option})")
    top = os.path.abspath(data)
    if kind == "folder":
        return _check_keys(_from_class_folders(top))
    keys = _walk_images(top, top, set())
    if not keys:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS[:5])}, ...) under {data}")
    return _check_keys(Samples(top, "unlabeled", keys, np.full(len(keys), -1, dtype=np.int64),
                               None))


def _from_class_folders(top: str) -> Samples:
    classes = _class_dirs(top)
    if not classes:
        raise ValueError(f"{top} has no class sub-folders")
    keys: list[str] = []
    labels: list[int] = []
    seen = {os.path.realpath(top)}  # a class folder linked to the root itself is a loop
    for label, name in enumerate(classes):
        found = _walk_images(os.path.join(top, name), top, seen)
        keys += found
        labels += [label] * len(found)
    if not keys:
        raise ValueError(f"no images in the class folders of {top}")
    return Samples(top, "folder", keys, np.asarray(labels, dtype=np.int64), classes)


_INT64_MAX = np.iinfo(np.int64).max
LIST_RULE = ("list lines are PATH or PATH LABEL with LABEL an integer class id (-1: unknown); a "
             "path with spaces needs a tab before its label (PATH<TAB>LABEL, -1 when unknown)")


def _parse_list_line(line: str, where: str) -> tuple[str, int]:
    """``path`` or ``path label`` (see :data:`LIST_RULE`); ValueError naming ``where``.

    Fields are split at a tab when the line has one, else at whitespace: a line means one
    thing whatever files exist, so ``a.png 0 extra`` or ``a.png 1.0`` is an error here rather
    than an image name that is later reported missing.
    """
    fields = [f.strip() for f in line.split("\t")] if "\t" in line else line.split()
    if len(fields) == 1:
        return fields[0], -1
    if len(fields) != 2 or not fields[0]:
        raise ValueError(f"{where}: {len(fields)} fields in {line!r}; {LIST_RULE}")
    path, text = fields
    if not _INTEGER.fullmatch(text):
        raise ValueError(f"{where}: the label {text!r} is not an integer; {LIST_RULE}")
    label = int(text)
    if not -1 <= label <= _INT64_MAX:
        raise ValueError(f"{where}: label {text} must be a class id >= 0 (or -1 for unknown)")
    return path, label


def _from_list(list_file: str, root: str | None, root_option: str = "--root") -> Samples:
    base = os.path.abspath(root if root is not None else os.path.dirname(list_file) or ".")
    if not os.path.isdir(base):
        raise FileNotFoundError(f"{root_option} {base} is not a folder")
    keys: list[str] = []
    labels: list[int] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(read_lines(list_file, "list file"), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{list_file}:{number}"
        path, label = _parse_list_line(line, where)
        key = _relative_key(path, base, where, root_option)
        problem = key_problem(key)
        if problem:
            raise ValueError(f"{where}: {key!r} {problem}; {KEY_RULE}")
        if key in seen:
            raise ValueError(f"{where}: {key!r} is listed twice (first at line {seen[key]})")
        seen[key] = number
        keys.append(key)
        labels.append(label)
    if not keys:
        raise ValueError(f"list file {list_file} has no entries")
    return Samples(base, "list", keys, np.asarray(labels, dtype=np.int64), None)


def _relative_key(path: str, base: str, where: str, root_option: str = "--root") -> str:
    path = path.replace("\\", "/")
    if os.path.isabs(path):
        rel = os.path.relpath(path, base)
        if escapes_root(rel.replace(os.sep, "/")):
            raise ValueError(f"{where}: {path} is not under {root_option} {base}")
        path = rel.replace(os.sep, "/")
    key = posixpath.normpath(path)
    if escapes_root(key) or key == ".":
        raise ValueError(f"{where}: {path} points outside {root_option} {base}")
    return key


def read_class_names(path: str) -> list[str]:
    """One class name per non-empty line (PaddleClas label lists ``id name`` are accepted).

    Classes are found by name, so a name given twice is an error naming both lines.
    """
    names: list[str] = []
    lines: dict[str, int] = {}
    for number, line in enumerate(read_lines(path, "class-names file"), start=1):
        line = line.strip()
        if not line:
            continue
        first, _, rest = line.partition(" ")
        name = rest.strip() if first.isdigit() and rest.strip() else line
        if name in lines:
            raise ValueError(f"class-names file {path}:{number}: {name!r} is listed twice "
                             f"(first at line {lines[name]})")
        lines[name] = number
        names.append(name)
    if not names:
        raise ValueError(f"class-names file {path} is empty")
    return names


def labels_by_name(samples: Samples, num_classes: int, names: list[str] | None, *,
                   option: str, named_by: str) -> np.ndarray:
    """The labels of ``samples`` as class ids of a model with ``num_classes`` classes.

    Class folders are matched to the model's class ``names`` (the ones ``named_by``
    records: a store, a checkpoint, a --class-names file), so a data set that lacks a class,
    or holds them in another order, keeps each image's own class. Without names, sorted
    folder order (``ImageFolder``'s rule) is only meaningful when there are as many folders
    as classes. Anything else is refused naming the folders: scoring or training against
    shifted labels would give wrong numbers with no error. Other sources carry class ids
    already; they are returned as they are.
    """
    if samples.source != "folder":
        return samples.labels
    folders = list(samples.class_names or [])
    if names is not None:
        index = {name: i for i, name in enumerate(names)}
        unknown = [folder for folder in folders if folder not in index]
        if unknown:
            more = f" (and {len(unknown) - 3} more)" if len(unknown) > 3 else ""
            raise ValueError(f"{option} {samples.root}: class folder(s) "
                             f"{', '.join(map(repr, unknown[:3]))}{more} are not among the "
                             f"{len(names)} class names of {named_by}; folders are matched "
                             "to classes by name")
        lookup = np.asarray([index[folder] for folder in folders], dtype=np.int64)
        return lookup[samples.labels]
    if len(folders) != num_classes:
        raise ValueError(f"{option} {samples.root} has {len(folders)} class folders but "
                         f"{named_by} has {num_classes} classes and records no class names, "
                         "so the folders cannot be matched to its classes; give the images as "
                         "a list file of 'path label' lines with the class ids")
    return samples.labels
