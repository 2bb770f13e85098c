"""teacher_infer.data: the three data-source kinds, keys, labels and their errors."""
from __future__ import annotations

import os
import re

import numpy as np
import pytest

from cli import main
from conftest import make_image
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
    (tmp_path / "list.txt").write_text("img dir/a b.jpg\t3\n./img dir/c.jpg\t-1\n")
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


@pytest.mark.parametrize("line,problem", [
    ("a.png 1.0", "the label '1.0' is not an integer"),
    ("a.png abc", "the label 'abc' is not an integer"),
    ("a.png 0 extra", "3 fields in 'a.png 0 extra'"),
    ("a.png 0 1", "3 fields in 'a.png 0 1'"),
    ("a.png\t0\textra", "3 fields"),
    ("my photo.png 3", "3 fields"),
    ("a.png 99999999999999999999", "label 99999999999999999999 must be a class id"),
    ("a.png \u0663", "the label '\u0663' is not an integer"),  # int() would take this digit
])
def test_list_lines_that_are_no_path_and_label_are_refused(tmp_path, capsys, line, problem):
    """Each used to become part of the image name (a 'missing file', exit 0) or, for a label
    beyond int64, a traceback: now ``file:line: ...``, exit 2, nothing written."""
    listing = tmp_path / "list.txt"
    listing.write_text(f"ok.png 0\n{line}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{listing}:2: {problem}")):
        find_samples(str(listing))
    code = main(["infer-teacher", "--model", "resnet18", "--random-weights", "--data",
                 str(listing), "--out", str(tmp_path / "x.zarr")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"ssld: error: {listing}:2: {problem}"), err
    assert not (tmp_path / "x.zarr").exists()


def test_list_paths_with_spaces_take_a_tab_before_the_label(tmp_path):
    """The rule for paths with spaces: a tab separates the label (any number of spaces
    otherwise), so every line means one thing whatever files exist."""
    (tmp_path / "list.txt").write_text("my photo.png\t3\nplain.png   -1\nnb sp.png\t-1\n"
                                       "no_label.png\n\tleading_tab.png\t2\n")
    samples = find_samples(str(tmp_path / "list.txt"))
    assert samples.keys == ["my photo.png", "plain.png", "nb sp.png", "no_label.png",
                            "leading_tab.png"]
    assert samples.labels.tolist() == [3, -1, -1, -1, 2]


def test_select_topk_list_out_reads_back_for_keys_with_spaces(tmp_path):
    """select-topk --list-out writes a tab before the label of a key with whitespace."""
    import labelstore

    keys = ["a b/x y.png", "c.png", "nb\u00a0sp.png"]
    with labelstore.create(str(tmp_path / "s.zarr"), keys=keys, num_classes=2, topk=1, views=1,
                           attrs={"dataset": {"root": str(tmp_path)}}) as writer:
        writer.write(0, np.array([[[1]], [[0]], [[1]]]), np.full((3, 1, 1), 0.9))
    labelstore.select_topk(str(tmp_path / "s.zarr"), 3, str(tmp_path / "sel.zarr"),
                           list_out=str(tmp_path / "sel.txt"))
    listed = find_samples(str(tmp_path / "sel.txt"))
    assert dict(zip(listed.keys, listed.labels.tolist())) == {"a b/x y.png": 1, "c.png": 0,
                                                              "nb\u00a0sp.png": 1}
    assert "c.png 0\n" in (tmp_path / "sel.txt").read_text()  # PaddleClas's space otherwise


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


def _list_within(seconds, *args, **kwargs):
    """find_samples in a thread: a listing that loops forever fails the test instead of hanging."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(find_samples, *args, **kwargs).result(timeout=seconds)
    finally:
        pool.shutdown(wait=False)


def test_symlink_loops_are_followed_once_by_real_path(tmp_path):
    root, outside = tmp_path / "data", tmp_path / "outside"
    for key in ("a.jpg", "sub/b.jpg"):
        make_image(root / key)
    make_image(outside / "c.jpg")
    os.symlink("..", root / "sub" / "loop")            # back to the root
    os.symlink("../sub", root / "sub" / "loop2")       # a second loop
    os.symlink(outside, root / "ext1")                 # a folder outside: listed once
    os.symlink(outside, root / "ext2")                 # ... not twice
    os.symlink(".", outside / "self")                  # a loop outside the root
    samples = _list_within(30, str(root))
    assert samples.keys == ["a.jpg", "ext1/c.jpg", "sub/b.jpg"]
    # class folders: a class linked into another class, and one linked to the root
    classes = tmp_path / "classes"
    make_image(classes / "c0" / "x.jpg")
    make_image(classes / "c1" / "y.jpg")
    os.symlink("../c0", classes / "c1" / "alias")
    os.symlink("..", classes / "c0" / "loop")
    samples = _list_within(30, str(classes))
    assert samples.source == "folder" and samples.keys == ["c0/x.jpg", "c1/y.jpg"]
    assert samples.labels.tolist() == [0, 1]


@pytest.mark.parametrize("name, problem", [
    ("new\nline.jpg", "contains a newline"), ("a\tb.jpg", "contains a tab"),
    ("cr\r.jpg", "contains a carriage return"), (" lead.jpg", "starts or ends with whitespace"),
    ("sub\x1bdir/x.jpg", "contains the control character '\\x1b'"),
])
def test_file_names_that_cannot_be_keys_are_refused_naming_the_file(tmp_path, capsys, name,
                                                                    problem):
    make_image(tmp_path / "data" / "good.jpg")
    make_image(tmp_path / "data" / name)
    with pytest.raises(ValueError, match=re.escape(f"{str(tmp_path / 'data' / name)!r}: the "
                                                   f"file name {problem}; keys go one per line")):
        find_samples(str(tmp_path / "data"))
    code = main(["infer-teacher", "--model", "test_convnext", "--random-weights", "--data",
                 str(tmp_path / "data"), "--out", str(tmp_path / "x.zarr")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and problem in err, err
    assert not (tmp_path / "x.zarr").exists()


def test_list_file_line_that_cannot_be_a_key_is_refused(tmp_path):
    (tmp_path / "list.txt").write_text("a.jpg 1\nb\x07c.jpg 2\n")
    with pytest.raises(ValueError, match=f"{tmp_path / 'list.txt'}:2: 'b\\\\x07c.jpg' contains "
                                         "the control character"):
        find_samples(str(tmp_path / "list.txt"))
    # a tab separates fields: a key cannot hold one, and a path after it is no label
    (tmp_path / "list.txt").write_text("a.jpg 1\nb\tc.jpg 2\n")
    with pytest.raises(ValueError, match=f"{tmp_path / 'list.txt'}:2: the label 'c.jpg 2' is "
                                         "not an integer"):
        find_samples(str(tmp_path / "list.txt"))


def test_list_file_with_invalid_utf8_names_the_file_and_line(tmp_path):
    (tmp_path / "list.txt").write_bytes(b"a.jpg 1\r\n# caf\xc3\xa9\r\n\xff.jpg 2\r\n")
    with pytest.raises(ValueError, match=f"list file {tmp_path / 'list.txt'}:3: not valid UTF-8"):
        find_samples(str(tmp_path / "list.txt"))
    (tmp_path / "names.txt").write_bytes(b"tench\n\xe9\n")
    with pytest.raises(ValueError, match=f"class-names file {tmp_path / 'names.txt'}:2: not "
                                         "valid UTF-8"):
        read_class_names(str(tmp_path / "names.txt"))


def test_list_file_paths_outside_the_root_are_refused(tmp_path):
    for line in ("sub/../../x.jpg 1", f"{tmp_path.parent}/x.jpg 1", "../../etc/x.png"):
        (tmp_path / "list.txt").write_text(line + "\n")
        with pytest.raises(ValueError, match="(outside|not under) --root"):
            find_samples(str(tmp_path / "list.txt"))
    (tmp_path / "list.txt").write_text("..a/x.jpg 1\n")  # a folder named "..a" is inside
    assert find_samples(str(tmp_path / "list.txt")).keys == ["..a/x.jpg"]


def test_error_messages_name_the_option(tmp_path):
    with pytest.raises(FileNotFoundError, match="--val .*nope does not exist"):
        find_samples(str(tmp_path / "nope"), option="--val")
    (tmp_path / "list.txt").write_text("a.jpg\n")
    with pytest.raises(FileNotFoundError, match="--val-root .* is not a folder"):
        find_samples(str(tmp_path / "list.txt"), root=str(tmp_path / "none"), option="--val",
                     root_option="--val-root")
