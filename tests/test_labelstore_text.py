"""``labelstore._text``: the one reader of text files (a UTF-8 BOM dropped, invalid UTF-8
named), and that every text file ssld reads goes through it."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

import labelstore
from teacher_infer.data import find_samples, read_class_names

REPO = Path(__file__).resolve().parents[1]
BOM = b"\xef\xbb\xbf"


def test_a_bom_is_dropped_and_nothing_else(tmp_path):
    path = tmp_path / "f.txt"
    path.write_bytes(BOM + "first\r\n\ufeffsecond\n".encode())
    # only the file's leading mark: one inside the text is the text's own
    assert labelstore.read_lines(str(path), "file") == ["first", "\ufeffsecond"]
    assert labelstore.read_text(str(path), "file") == "first\r\n\ufeffsecond\n"
    path.write_bytes(BOM)
    assert labelstore.read_lines(str(path), "file") == []
    path.write_bytes(BOM + b"ok\n\xff\n")
    with pytest.raises(ValueError, match=f"file {path}:2: not valid UTF-8"):
        labelstore.read_text(str(path), "file")


def test_files_saved_with_a_bom_read_as_without(tmp_path):
    """What users write with editors that add a BOM: list files, class names, exclude lists.
    Without the rule the first key or name would start with U+FEFF (an image reported missing,
    a class name that matches no folder, an exclude line that excludes nothing)."""
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "list.txt").write_bytes(BOM + b"a.png 3\n")
    samples = find_samples(str(tmp_path / "list.txt"))
    assert samples.keys == ["a.png"] and samples.labels.tolist() == [3]
    (tmp_path / "names.txt").write_bytes(BOM + b"tench\ngoldfish\n")
    assert read_class_names(str(tmp_path / "names.txt")) == ["tench", "goldfish"]


def test_select_topk_reads_an_exclude_list_saved_with_a_bom(tmp_path):
    from test_labelstore import make_store

    path = str(tmp_path / "s.zarr")
    make_store(path, n=6, classes=3, k=2)
    keys = list(labelstore.open(path).keys)
    (tmp_path / "ex.txt").write_bytes(BOM + f"{keys[0]}\n".encode())
    result = labelstore.select_topk(path, 6, str(tmp_path / "sel.zarr"),
                                    exclude=str(tmp_path / "ex.txt"))
    assert result.selection.rows_excluded == 1
    assert keys[0] not in set(labelstore.open(str(tmp_path / "sel.zarr")).keys)


def test_run_records_read_back_with_a_bom(tmp_path):
    """ssld's own records (metrics.csv on resume, the quickstart's and prepare's JSON) go
    through the same reader."""
    from student_train.metrics import COLUMNS, MetricsCSV

    (tmp_path / "metrics.csv").write_bytes(BOM + (",".join(COLUMNS) + "\n1,0.1\n2,0.1\n").encode())
    MetricsCSV(str(tmp_path / "metrics.csv"), keep_epochs=1)
    assert (tmp_path / "metrics.csv").read_text().splitlines()[1].startswith("1,0.1")
    from teacher_infer.prepare import PreparedDataset

    layout = {"root": "r", "labeled": "l", "pool": "p", "val": "v", "pool_labels": "pl",
              "class_names": "c", "num_labeled": 1, "num_pool": 2, "num_val": 3,
              "num_classes": 4}
    (tmp_path / "meta.json").write_bytes(BOM + json.dumps({"layout": layout}).encode())
    assert PreparedDataset.load(tmp_path).num_val == 3


# Text reads that need not go through the reader, each with the reason.
ALLOWED = {
    ("labelstore/_paths.py", "open"): "zarr.json is zarr's own metadata; zarr parses it too",
    ("labelstore/_paths.py", "json.load"): "the same zarr.json",
}


def _text_reads(path: Path) -> list[tuple[int, str]]:
    """Calls in ``path`` that read a file as text without ``labelstore.read_text``:
    ``open`` in a text read mode, ``Path.read_text``, ``json.load``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        owner = getattr(getattr(func, "value", None), "id", None)
        if isinstance(func, ast.Attribute) and func.attr == "read_text" and owner != "labelstore":
            found.append((node.lineno, "read_text"))
        elif isinstance(func, ast.Attribute) and func.attr == "load" and owner == "json":
            found.append((node.lineno, "json.load"))
        elif (isinstance(func, ast.Name) and func.id == "open") or (
                isinstance(func, ast.Attribute) and func.attr == "open"
                and owner in ("fs", "fsspec", "io", "gzip")):
            mode = node.args[1] if len(node.args) > 1 else next(
                (k.value for k in node.keywords if k.arg == "mode"), None)
            if mode is None or (isinstance(mode, ast.Constant) and isinstance(mode.value, str)
                                and not set(mode.value) & set("bwax+")):
                found.append((node.lineno, "open"))
    return found


def test_every_text_file_is_read_through_the_one_reader():
    """The general rule behind the BOM cases: a new text read elsewhere fails here."""
    files = [REPO / "cli.py"] + [path for package in ("labelstore", "teacher_infer",
                                                      "student_train")
                                 for path in sorted((REPO / package).rglob("*.py"))]
    offenders = []
    for path in files:
        name = path.relative_to(REPO).as_posix()
        offenders += [f"{name}:{line} {what}" for line, what in _text_reads(path)
                      if (name, what) not in ALLOWED]
    assert not offenders, offenders
    assert _text_reads(REPO / "labelstore" / "_paths.py")  # the scan sees what it must
