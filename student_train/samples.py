"""The training set of a run: label stores (or an image source) opened, checked and flattened.

Everything a run refuses about its data is refused here, before the first epoch, with a message
that names the store: an incomplete store, a class count that differs from the student's (the
first store's), images missing under a store's recorded root, keys that point outside it, tar
shards missing or changed since the teacher pass indexed them.

Label arrays are loaded into RAM once (``LabelStore.load``); DataLoader workers are forked and
share those pages. Image keys are kept as one byte buffer plus offsets rather than a list of
Python strings, whose reference counts would make every worker copy the pages it touches.
Images are read through ``teacher_infer.ImageSource``, one per store (or source): a file below
its root, or — for rows of shard data — the exact byte range its store records.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

import labelstore
from labelstore import escapes_root
from teacher_infer import ImageSource, find_samples, labels_by_name
from teacher_infer.imaging.augment import check_store_records
from teacher_infer.images import root_problem

from . import distributed as D

# Rows whose teacher top-1 is compared with the ground truth per read (bounded memory).
_AGREEMENT_ROWS = 1 << 20


class PathTable:
    """A compact, fork-friendly list of strings (keys): ``table[i]`` is a str."""

    def __init__(self, paths: Sequence[str]):
        encoded = [p.encode("utf-8") for p in paths]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self._offsets[1:])
        self._buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self._buffer[self._offsets[i]:self._offsets[i + 1]].tobytes().decode("utf-8")


@dataclass
class SampleSet:
    """Samples of a run: sample i is the image ``keys[i]`` of ``images[image_of[i]]`` (at its
    shard location ``tar[i]`` when it lies in a tar shard) with ground truth ``labels[i]``
    (-1 = unknown) and, for store sets, row ``rows[i]`` of ``stores[store_of[i]]``."""

    keys: PathTable
    labels: np.ndarray                       # (n,) int64
    num_classes: int
    images: list                             # teacher_infer.ImageSource per store or source
    image_of: np.ndarray                     # (n,) int16
    tar: Optional[np.ndarray] = None         # (n, 4) int64, -1 for files; None: all files
    stores: Optional[list] = None            # loaded LabelStore readers
    store_of: Optional[np.ndarray] = None    # (n,) int16
    rows: Optional[np.ndarray] = None        # (n,) int64
    class_names: Optional[list] = None
    named_by: str = ""                       # where the classes come from, for messages
    # what the data is: per store its label digests, per image source its keys and labels
    # (checkpoints record it; --resume refuses data that changed since)
    identity: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)

    def path(self, i: int) -> str:
        """Where sample ``i``'s image is (failure lists and messages name it)."""
        return self.images[self.image_of[i]].path(self.keys[i])

    def read(self, i: int) -> bytes:
        """Sample ``i``'s image bytes: its file, or its exact byte range in its shard
        (``imaging.DecodeError`` with the reason when they cannot be read: a missing file,
        a shard that changed since it was indexed)."""
        from teacher_infer.imaging import image_bytes

        return image_bytes(self.images[self.image_of[i]], self.keys[i],
                           None if self.tar is None else self.tar[i])

    def subset(self, keep: np.ndarray) -> "SampleSet":
        pick = lambda a: None if a is None else a[keep]  # noqa: E731
        return SampleSet(PathTable([self.keys[i] for i in np.flatnonzero(keep)]),
                         self.labels[keep], self.num_classes, self.images,
                         self.image_of[keep], pick(self.tar), self.stores, pick(self.store_of),
                         pick(self.rows), self.class_names, self.named_by, self.identity)


def store_root(store) -> str:
    """The folder a store's keys are relative to (``attrs["dataset"]["root"]``)."""
    root = (store.attrs.get("dataset") or {}).get("root")
    if not root:
        raise ValueError(f"label store {store.path} records no dataset root "
                         "(attrs['dataset']['root']): give the folder its keys are relative "
                         "to (train-student --store-root, StoreDataset(roots=))")
    return str(root)


def open_stores(paths: Sequence[str], *, env: D.DistEnv,
                roots: str | Sequence[str] | None = None) -> SampleSet:
    """Open, check and concatenate label stores; only rows with ``valid=True`` are kept.

    The stores must be complete, distinct (a store given twice would train every row twice)
    and of one class space: the same class count and, where they record them, the same
    class names (``merge``'s rule; their k and views may differ). Their images are below
    each store's recorded root, or below ``roots`` (one for all, or one per store).
    """
    opened = labelstore.open_complete(list(paths))
    if roots is None or isinstance(roots, str) or hasattr(roots, "__fspath__"):
        roots = [roots] * len(opened)
    roots = list(roots)
    if len(roots) != len(opened):
        raise ValueError(f"{len(roots)} image roots for {len(opened)} label stores: give one "
                         "root, or one per store")
    for store in opened[1:]:
        if store.num_classes != opened[0].num_classes:
            raise ValueError(f"label store {store.path} has {store.num_classes} classes but the "
                             f"student has {opened[0].num_classes} (from {opened[0].path})")
    labelstore.check_compatible(opened, topk=False, views=False)
    stores = [store.load() for store in opened]
    keys, labels, store_of, rows, tars, images = [], [], [], [], [], []
    for number, store in enumerate(stores):
        valid = _valid_rows(store)
        root = store_root(store) if roots[number] is None else str(roots[number])
        if root_problem(root):
            if roots[number] is not None:
                raise FileNotFoundError(f"the image root {root} given for label store "
                                        f"{store.path} does not exist")
            raise FileNotFoundError(f"label store {store.path}: its image root {root} does not "
                                    "exist here; if its images moved, give their folder "
                                    "(train-student --store-root)")
        source = ImageSource(root)
        store_keys = store.keys
        _refuse_escaping_keys(store, store_keys[valid].tolist(), root)
        keys += [str(key) for key in store_keys[valid]]
        tars.append(store.read_tar(valid))
        require_images(source, store_keys[valid], tars[-1] if store.tar_fields else None,
                       f"label store {store.path} (root {root})", env)
        labels.append(store.labels[valid].astype(np.int64))
        store_of.append(np.full(len(valid), number, dtype=np.int16))
        rows.append(valid.astype(np.int64))
        images.append(source)
        if store.augment_dims:
            _check_records_and_partners(store, valid, source, env)
    if not keys:
        raise ValueError(f"the label stores {', '.join(paths)} have no valid rows")
    named = next((store for store in stores if store.class_names), stores[0])
    identity = [{"what": f"label store {store.path}", "path": _absolute(store.path),
                 "label_sha256": labelstore.label_sha256(store)} for store in stores]
    store_of = np.concatenate(store_of)
    tar = np.concatenate(tars) if any(store.tar_fields for store in stores) else None
    return SampleSet(PathTable(keys), np.concatenate(labels), stores[0].num_classes, images,
                     store_of, tar, stores, store_of, np.concatenate(rows),
                     named.class_names, f"label store {named.path}", identity)


def _absolute(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


def _check_records_and_partners(store, valid: np.ndarray, images, env: D.DistEnv) -> None:
    """A store with augmentation records: they can be replayed (settings, ops table, every
    record), and the images of the valid rows' mixing partners are there (files, or
    unchanged shards)."""
    problem = check_store_records(store)
    if problem:
        raise ValueError(f"{problem}; its views cannot be replayed")
    refs = np.unique(store.read_rows(valid, ("mix_partners",))["mix_partners"]) \
        if "mix_partners" in store.student_arrays else np.zeros(0, np.int64)
    refs = refs[refs != -1]
    if len(refs):
        found = store.partners(refs)
        keys = found["keys"].tolist()
        _refuse_escaping_keys(store, keys, images.root)
        require_images(images, keys, found.get("tar"), f"label store {store.path} (root "
                       f"{images.root}), mixing partners", env)


def _refuse_escaping_keys(store, keys: list[str], root: str) -> None:
    """Keys are paths below the store's root: an absolute key or one with ``..`` would make
    training open a file outside it."""
    row = next((row for row, key in enumerate(keys) if escapes_root(key)), None)
    if row is not None:
        raise ValueError(f"label store {store.path}: key {keys[row]!r} points outside its "
                         f"dataset root {root}; keys must be relative paths below the root")


def open_source(data: str, root: Optional[str], *, env: D.DistEnv, what: str,
                classes: Optional["Classes"] = None) -> SampleSet:
    """An image source (class folder, unlabeled folder, list file or tar shards) as a
    sample set; ``what`` (``--data`` or ``--val``) names it, and its root option, in errors.

    Without ``classes`` the source defines the class space (its folders, or its largest
    label); with them (a model's or a training set's classes) class folders are matched to
    those classes by name (``teacher_infer.labels_by_name``).
    """
    found = find_samples(data, root=root, option=what,
                         root_option="--val-root" if what == "--val" else "--root",
                         dist=env.dist)
    images = ImageSource(found.root)
    require_images(images, found.keys, found.tar, f"{what} {data} (root {found.root})", env)
    labels = found.labels
    if classes is not None:
        labels = labels_by_name(found, classes.count, classes.names, option=what,
                                named_by=classes.named_by)
    identity = [{"what": f"{what} {data}", "path": _absolute(data),
                 "label_sha256": {"keys": labelstore.fingerprint(found.keys),
                                  "labels": labelstore.fingerprint(map(str, labels))}}]
    table, image_of = PathTable(found.keys), np.zeros(len(found), dtype=np.int16)
    if classes is not None:
        return SampleSet(table, np.asarray(labels, dtype=np.int64), classes.count, [images],
                         image_of, found.tar, class_names=classes.names,
                         named_by=classes.named_by, identity=identity)
    num_classes = len(found.class_names) if found.class_names else int(found.labels.max()) + 1
    return SampleSet(table, np.asarray(found.labels, dtype=np.int64), max(num_classes, 0),
                     [images], image_of, found.tar, class_names=found.class_names,
                     named_by=f"{what} {data}", identity=identity)


@dataclass(frozen=True)
class Classes:
    """A class space that a data source's folders are matched into: ``count`` classes,
    their ``names`` where known, and what they belong to (for messages)."""

    count: int
    names: Optional[list]
    named_by: str

    @classmethod
    def of(cls, samples: SampleSet) -> "Classes":
        return cls(samples.num_classes, samples.class_names, samples.named_by)


def require_images(images, keys: Sequence[str], tar: Optional[np.ndarray], owner: str,
                   env: D.DistEnv) -> None:
    """Raise FileNotFoundError naming ``owner`` when any image of ``keys`` (in ``images``,
    with their ``tar`` rows) cannot be read: a missing file, or a shard missing or changed
    since it was indexed (``ImageSource.problems``).

    Each rank checks a disjoint share (files by threads, to hide file-system latency;
    shards once each), then the ranks agree on the result so that all of them refuse
    together.
    """
    mine = range(env.rank, len(keys), env.world_size)
    count, examples = images.problems(keys, tar, rows=mine)
    reports = D.all_gather((count, examples), env)
    count = sum(n for n, _ in reports)
    if count:
        examples = [p for _, some in reports for p in some][:3]
        raise FileNotFoundError(f"{owner}: {count} of {len(keys)} images are missing "
                                f"(e.g. {', '.join(examples)})")


def _valid_rows(store) -> np.ndarray:
    parts = [np.flatnonzero(store.read(slice(lo, lo + _AGREEMENT_ROWS)).valid) + lo
             for lo in range(0, len(store), _AGREEMENT_ROWS)]
    return np.concatenate(parts)


def store_top1(samples: SampleSet) -> Optional[float]:
    """How often the stored view-0 top-1 equals the ground truth, over labeled samples."""
    if samples.stores is None:
        return None
    hits = total = 0
    for number, store in enumerate(samples.stores):
        mine = samples.store_of == number
        rows, labels = samples.rows[mine], samples.labels[mine]
        labeled = labels >= 0
        rows, labels = rows[labeled], labels[labeled]
        for lo in range(0, len(rows), _AGREEMENT_ROWS):
            part = store.read(rows[lo:lo + _AGREEMENT_ROWS])
            hits += int((part.indices[:, 0, 0] == labels[lo:lo + _AGREEMENT_ROWS]).sum())
        total += len(rows)
    return hits / total if total else None
