"""Write small real data sets as image files in the layouts ``--data`` accepts.

Two sources that install from package registries: scikit-learn's bundled digits
(1,797 8×8 images, used by ``ssld quickstart``) and Fashion-MNIST from Debian's
``dataset-fashion-mnist`` (IDX files). Both are split into a labeled set L, an
unlabeled pool U whose labels are hidden from every ssld step, and a validation
set V, and written as PNG files::

    OUT/images/labeled/<k_name>/<split>_<index>.png     ImageNet-style class folders
    OUT/images/pool/<split>_<index>.png                 unlabeled: no class folders
    OUT/images/val/<k_name>/<split>_<index>.png
    OUT/labeled.txt  OUT/pool.txt  OUT/val.txt          PaddleClas lists, relative to OUT/images
    OUT/pool_labels.txt                                 the hidden pool labels, for final
                                                        reports only
    OUT/classes.txt  OUT/meta.json

Class folders are named ``<label>_<name>`` so that their sorted order is the label order
(the folder source numbers classes by sorted name).
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from labelstore import read_text

FASHION_MNIST_SRC = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal",
                         "shirt", "sneaker", "bag", "ankle_boot")
FASHION_MNIST_FILES = {"train_images": "train-images-idx3-ubyte", "train_labels":
                       "train-labels-idx1-ubyte", "test_images": "t10k-images-idx3-ubyte",
                       "test_labels": "t10k-labels-idx1-ubyte"}


@dataclass(frozen=True)
class PreparedDataset:
    """Where a prepared data set lies; every path is absolute."""

    root: str            # images/ — the --root for the list files
    labeled: str         # labeled.txt
    pool: str            # pool.txt (no labels)
    val: str             # val.txt
    pool_labels: str     # hidden labels of the pool
    class_names: str     # classes.txt
    num_labeled: int
    num_pool: int
    num_val: int
    num_classes: int

    @classmethod
    def load(cls, out: str | os.PathLike) -> "PreparedDataset":
        meta = Path(out) / "meta.json"
        if not meta.is_file():
            raise FileNotFoundError(f"{out} is not a prepared data set (no meta.json)")
        return cls(**json.loads(read_text(str(meta), "prepared data set record"))["layout"])

    def describe(self, name: str) -> str:
        """What ``ssld prepare`` prints: the split sizes, and where the images and lists are."""
        return (f"{name}: {self.num_labeled:,} labeled, {self.num_pool:,} pool (labels hidden), "
                f"{self.num_val:,} val images, {self.num_classes} classes\n"
                f"  images under {self.root}\n"
                f"  lists: {self.labeled}, {self.pool}, {self.val} (use --root {self.root})")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (plain or .gz): the MNIST family's array format."""
    path = str(path)
    if not os.path.exists(path) and os.path.exists(path + ".gz"):
        path += ".gz"
    if not os.path.exists(path):
        raise FileNotFoundError(f"no IDX file at {path}[.gz]")
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: {body.size} bytes for shape {shape}")
    return body.reshape(shape)


def stratified_pick(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of ``per_class`` random rows of every class."""
    picked = []
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        if len(rows) < per_class:
            raise ValueError(f"class {label} has {len(rows)} images, fewer than {per_class}")
        picked.append(rng.choice(rows, per_class, replace=False))
    return np.sort(np.concatenate(picked))


def _save_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode="L").save(path, optimize=False, compress_level=1)


# What a prepared folder holds (see the module doc); --overwrite deletes nothing else.
PREPARED = frozenset({"images", "labeled.txt", "pool.txt", "val.txt", "pool_labels.txt",
                      "classes.txt", "meta.json"})


def write_layout(out: str | os.PathLike, *, class_names: list[str], train_images: np.ndarray,
                 train_labels: np.ndarray, labeled_rows: np.ndarray, val_images: np.ndarray,
                 val_labels: np.ndarray, train_prefix: str = "train", val_prefix: str = "test",
                 source: str = "", overwrite: bool = False,
                 progress: bool = True) -> PreparedDataset:
    """Write L (``labeled_rows`` of the training arrays), U (the other training rows) and V
    (a bar while the PNGs are written, when ``progress`` and on a terminal)."""
    from labelstore import progress_bar

    if "://" in str(out):   # the images are read by path by every later step
        raise ValueError(f"--out {out}: a prepared data set is a local folder (the store "
                         "commands' --out may be URLs, the images they label are files)")
    out = Path(out).resolve()
    if (out / "meta.json").exists() and not overwrite:
        return PreparedDataset.load(out)
    if out.exists():
        if not overwrite and any(out.iterdir()):
            raise FileExistsError(f"{out} exists and is not a finished prepared data set "
                                  "(use --overwrite)")
        foreign = sorted(entry.name for entry in out.iterdir() if entry.name not in PREPARED)
        if (out / "images").is_dir():
            foreign += sorted(f"images/{entry.name}" for entry in (out / "images").iterdir()
                              if entry.name not in ("labeled", "pool", "val"))
        if foreign:  # --overwrite replaces a prepared data set, never anything else
            raise ValueError(f"{out} holds {foreign[0]!r}, which prepare did not write; "
                             "refusing to delete it (choose another --out)")
        shutil.rmtree(out)
    images = out / "images"
    folders = [f"{label}_{name}" for label, name in enumerate(class_names)]
    is_labeled = np.zeros(len(train_labels), dtype=bool)
    is_labeled[labeled_rows] = True
    width = len(str(max(len(train_labels), len(val_labels))))
    lines: dict[str, list[str]] = {"labeled": [], "pool": [], "val": [], "pool_labels": []}
    total = len(train_labels) + len(val_labels)
    with progress_bar(progress, total, "writing PNGs", unit="img", mininterval=1.0) as bar:
        for row, (image, label) in enumerate(zip(train_images, train_labels)):
            name = f"{train_prefix}_{row:0{width}d}.png"
            if is_labeled[row]:
                key = f"labeled/{folders[label]}/{name}"
                lines["labeled"].append(f"{key} {label}")
            else:
                key = f"pool/{name}"
                lines["pool"].append(key)
                lines["pool_labels"].append(f"{key} {label}")
            _save_png(image, images / key)
            bar.update()
        for row, (image, label) in enumerate(zip(val_images, val_labels)):
            key = f"val/{folders[label]}/{val_prefix}_{row:0{width}d}.png"
            lines["val"].append(f"{key} {label}")
            _save_png(image, images / key)
            bar.update()
    for name, content in lines.items():
        (out / f"{name}.txt").write_text("\n".join(content) + "\n")
    (out / "classes.txt").write_text("\n".join(folders) + "\n")
    layout = PreparedDataset(
        root=str(images), labeled=str(out / "labeled.txt"), pool=str(out / "pool.txt"),
        val=str(out / "val.txt"), pool_labels=str(out / "pool_labels.txt"),
        class_names=str(out / "classes.txt"), num_labeled=len(lines["labeled"]),
        num_pool=len(lines["pool"]), num_val=len(lines["val"]), num_classes=len(class_names))
    # meta.json last: its presence marks a finished preparation
    (out / "meta.json").write_text(json.dumps({"source": source, "layout": asdict(layout)},
                                              indent=2))
    return layout


def prepare_fashion_mnist(out: str | os.PathLike, *, src: str = FASHION_MNIST_SRC,
                          labeled_per_class: int = 600, seed: int = 0,
                          overwrite: bool = False, progress: bool = True) -> PreparedDataset:
    """Fashion-MNIST: L = ``labeled_per_class`` × 10 training images (seeded, stratified),
    U = the other training images, V = the 10,000 test images."""
    arrays = {name: read_idx(Path(src) / file) for name, file in FASHION_MNIST_FILES.items()}
    rng = np.random.default_rng(seed)
    labeled = stratified_pick(arrays["train_labels"], labeled_per_class, rng)
    return write_layout(out, class_names=list(FASHION_MNIST_CLASSES),
                        train_images=arrays["train_images"], train_labels=arrays["train_labels"],
                        labeled_rows=labeled, val_images=arrays["test_images"],
                        val_labels=arrays["test_labels"],
                        source=f"fashion-mnist from {src}, {labeled_per_class}/class labeled, "
                               f"seed {seed}", overwrite=overwrite, progress=progress)


def prepare_digits(out: str | os.PathLike, *, labeled_per_class: int = 20,
                   val_per_class: int = 36, seed: int = 0,
                   overwrite: bool = False, progress: bool = True) -> PreparedDataset:
    """scikit-learn's digits (8×8, 16 grey levels scaled to 0–255): V = ``val_per_class`` per
    class, L = ``labeled_per_class`` per class of the rest, U = everything else."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    val_rows = stratified_pick(labels, val_per_class, rng)
    train_rows = np.setdiff1d(np.arange(len(labels)), val_rows)
    labeled = stratified_pick(labels[train_rows], labeled_per_class, rng)
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    return write_layout(out, class_names=names,
                        train_images=images[train_rows], train_labels=labels[train_rows],
                        labeled_rows=labeled, val_images=images[val_rows],
                        val_labels=labels[val_rows], train_prefix="digit",
                        val_prefix="digitval",
                        source=f"sklearn digits, {labeled_per_class}/class labeled, "
                               f"{val_per_class}/class val, seed {seed}", overwrite=overwrite,
                        progress=progress)
