"""teacher_infer.data: the three data-source kinds, keys, labels and their errors."""
from __future__ import annotations

import numpy as np
import pytest

from teacher_infer.data import detect_source, find_samples, read_class_names


def test_class_folders(image_folder):
    samples = find_samples(str(image_folder.data))
    assert samples.source == "folder"
    assert samples.keys == image_folder.keys
    assert samples.labels.tolist() == image_folder.labels
    assert samples.class_names == image_folder.class_names
    assert samples.root == str(image_folder.root)
    assert all(samples.path(i).endswith(key) for i, key in enumerate(samples.keys))


def test_unlabeled_folder_is_recursive_and_skips_non_images(unlabeled_folder):
    samples = find_samples(str(unlabeled_folder.data))
    assert samples.source == "unlabeled"
    assert samples.keys == unlabeled_folder.keys  # no readme.txt, no hidden entries
    assert (samples.labels == -1).all()
    assert samples.class_names is None


def test_list_file_keeps_file_order_and_optional_labels(list_file):
    samples = find_samples(str(list_file.data), root=str(list_file.root))
    assert samples.source == "list"
    assert samples.keys == list_file.keys
    assert samples.labels.tolist() == list_file.labels
    # --root defaults to the list file's folder
    with pytest.raises(ValueError):
        find_samples(str(list_file.data), source="folder")


def test_list_file_root_defaults_to_its_folder(tmp_path):
    (tmp_path / "img dir").mkdir()
    (tmp_path / "list.txt").write_text("img dir/a b.jpg 3\n./img dir/c.jpg\n")
    samples = find_samples(str(tmp_path / "list.txt"))
    assert samples.root == str(tmp_path)
    assert samples.keys == ["img dir/a b.jpg", "img dir/c.jpg"]
    assert samples.labels.tolist() == [3, -1]


@pytest.mark.parametrize("text,match", [
    ("a.jpg 1\na.jpg 2\n", "listed twice"),
    ("../outside.jpg 1\n", "outside --root"),
    ("a.jpg -4\n", "label -4"),
    ("# only a comment\n\n", "no entries"),
])
def test_list_file_errors(tmp_path, text, match):
    (tmp_path / "list.txt").write_text(text)
    with pytest.raises(ValueError, match=match):
        find_samples(str(tmp_path / "list.txt"))


def test_forced_source_and_detection(image_folder, tmp_path):
    assert detect_source(str(image_folder.data)) == "folder"
    forced = find_samples(str(image_folder.data), source="unlabeled")
    assert forced.source == "unlabeled" and sorted(forced.keys) == sorted(image_folder.keys)
    assert (forced.labels == -1).all()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_samples(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        find_samples(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="--root is only for list files"):
        find_samples(str(image_folder.data), root=str(tmp_path))


def test_class_names_file(tmp_path):
    (tmp_path / "names.txt").write_text("0 tench\n1 goldfish\n\nwhite shark\n")
    assert read_class_names(str(tmp_path / "names.txt")) == ["tench", "goldfish", "white shark"]
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        read_class_names(str(tmp_path / "empty.txt"))


def test_keys_are_unique_and_labels_int(image_folder):
    samples = find_samples(str(image_folder.data))
    assert len(set(samples.keys)) == len(samples.keys)
    assert samples.labels.dtype == np.int64
