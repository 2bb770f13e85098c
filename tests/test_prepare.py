"""`ssld prepare`: IDX reading, split sizes and disjointness, pixels written losslessly."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli import main
from teacher_infer.prepare import (FASHION_MNIST_FILES, PreparedDataset, prepare_digits,
                                   prepare_fashion_mnist, read_idx)


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(str(path) + ".gz", "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fashion(tmp_path):
    """A 10-class IDX set shaped like Fashion-MNIST: 50 train and 20 test images per class."""
    rng = np.random.default_rng(0)
    src = tmp_path / "idx"
    src.mkdir()
    arrays = {"train_labels": np.repeat(np.arange(10), 50),
              "test_labels": np.repeat(np.arange(10), 20)}
    arrays["train_images"] = rng.integers(0, 256, (500, 28, 28))
    arrays["test_images"] = rng.integers(0, 256, (200, 28, 28))
    for name, file in FASHION_MNIST_FILES.items():
        write_idx(src / file, arrays[name])
    return src, arrays


def read_list(path):
    return [line.split() for line in Path(path).read_text().splitlines() if line]


def test_read_idx_round_trip_and_errors(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a-idx3-ubyte", array)
    np.testing.assert_array_equal(read_idx(tmp_path / "a-idx3-ubyte"), array)
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x02ab")
    with pytest.raises(ValueError, match="not an unsigned-byte IDX"):
        read_idx(tmp_path / "bad")
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "absent")


def test_fashion_mnist_layout(fake_fashion, tmp_path):
    src, arrays = fake_fashion
    layout = prepare_fashion_mnist(tmp_path / "out", src=str(src), labeled_per_class=5, seed=1)
    assert (layout.num_labeled, layout.num_pool, layout.num_val) == (50, 450, 200)
    labeled, pool, val = read_list(layout.labeled), read_list(layout.pool), read_list(layout.val)
    hidden = dict(read_list(layout.pool_labels))
    assert all(len(line) == 1 for line in pool)            # the pool list carries no labels
    assert np.bincount([int(l) for _, l in labeled]).tolist() == [5] * 10
    train_rows = [int(Path(k).stem.split("_")[1]) for k, *_ in labeled + pool]
    assert sorted(train_rows) == list(range(500))          # L and U partition the train set
    for key, label in labeled[:5] + [(k, hidden[k]) for k, in pool[:5]]:
        row = int(Path(key).stem.split("_")[1])
        assert int(label) == arrays["train_labels"][row]
        pixels = np.asarray(Image.open(Path(layout.root) / key))
        np.testing.assert_array_equal(pixels, arrays["train_images"][row])
    for key, label in val[:5]:
        row = int(Path(key).stem.split("_")[1])
        assert Path(key).parent.name == f"{label}_{Path(key).parent.name.split('_', 1)[1]}"
        np.testing.assert_array_equal(np.asarray(Image.open(Path(layout.root) / key)),
                                      arrays["test_images"][row])
    folders = sorted(p.name for p in (Path(layout.root) / "labeled").iterdir())
    assert [int(f.split("_")[0]) for f in folders] == list(range(10))  # sorted = label order
    assert PreparedDataset.load(tmp_path / "out") == layout
    # a second call finds the finished layout and does not rewrite it
    assert prepare_fashion_mnist(tmp_path / "out", src=str(src), labeled_per_class=5) == layout


def test_digits_split(tmp_path):
    layout = prepare_digits(tmp_path / "digits", labeled_per_class=3, val_per_class=10)
    assert (layout.num_labeled, layout.num_val, layout.num_classes) == (30, 100, 10)
    assert layout.num_labeled + layout.num_pool + layout.num_val == 1797
    keys = [k for k, *_ in (read_list(layout.labeled) + read_list(layout.pool)
                            + read_list(layout.val))]
    assert len(set(keys)) == 1797
    image = Image.open(Path(layout.root) / keys[0])
    assert image.size == (8, 8) and image.mode == "L"


def test_cli_prepare_errors(tmp_path, capsys):
    code = main(["prepare", "fashion-mnist", "--src", str(tmp_path / "none"), "--out",
                 str(tmp_path / "o")])
    assert code == 2
    assert "no IDX file" in capsys.readouterr().err


def test_describe_is_what_ssld_prepare_prints():
    layout = PreparedDataset(root="/d/images", labeled="/d/labeled.txt", pool="/d/pool.txt",
                             val="/d/val.txt", pool_labels="/d/pool_labels.txt",
                             class_names="/d/classes.txt", num_labeled=6000, num_pool=54000,
                             num_val=10000, num_classes=10)
    assert layout.describe("fashion-mnist") == (
        "fashion-mnist: 6,000 labeled, 54,000 pool (labels hidden), 10,000 val images, "
        "10 classes\n"
        "  images under /d/images\n"
        "  lists: /d/labeled.txt, /d/pool.txt, /d/val.txt (use --root /d/images)")
