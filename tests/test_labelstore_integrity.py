"""A damaged store is reported, never read as data: missing, truncated or altered chunks,
removed or reshaped arrays; every command that reads says so in one line (exit 2)."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

import labelstore
from test_labelstore import make_store
from test_labelstore_paths import refused

N, CHUNK = 10, 4          # chunks of rows 0:4, 4:8, 8:10


@pytest.fixture
def finished(tmp_path):
    path = tmp_path / "store.zarr"
    make_store(str(path), n=N, views=1, k=3, classes=6, chunk_rows=CHUNK)
    return path


def chunk_file(store, array: str, chunk: int):
    """The file of row-chunk ``chunk`` of ``array`` (nested 'c/i/0/0' keys)."""
    folder = store / array / "c" / str(chunk)
    while folder.is_dir():
        folder = folder / "0"
    assert folder.is_file(), folder
    return folder


def test_every_array_chunk_is_written_even_when_it_holds_fill_values(finished):
    # labels are all unknown (-1 = fill) and flips all False here: written all the same
    make_store(str(finished), n=N, views=1, k=3, classes=6, chunk_rows=CHUNK, labels=False,
               overwrite=True)
    for array in ("labels", "flips", "valid", "probs", "keys", "residual", "boxes", "indices"):
        for chunk in range(3):
            chunk_file(finished, array, chunk)
    assert labelstore.open(str(finished)).attrs["integrity"] == {"every_chunk_written": True,
                                                                 "checksum": "crc32c"}


@pytest.mark.parametrize("array", ["probs", "valid", "labels", "keys"])
def test_missing_chunk_of_a_done_chunk_is_an_error_naming_it(finished, capsys, array):
    chunk_file(finished, array, 1).unlink()
    with pytest.raises(labelstore.DamagedStoreError,
                       match=rf"chunk 1 of array '{array}' \(rows 4:8\) is missing"):
        labelstore.open(str(finished))
    out = str(finished.parent / "sel.zarr")
    for argv in (["inspect", str(finished)], ["select-topk", "--store", str(finished), "--k", "2",
                                              "--out", out],
                 ["export", str(finished), "--out", str(finished.parent / "x.h5")]):
        refused(capsys, argv, f"chunk 1 of array '{array}'", "damaged")
    assert not os.path.exists(out)


@pytest.mark.parametrize("damage", ["truncate", "flip-byte", "garbage"])
def test_truncated_or_altered_chunk_fails_its_checksum(finished, capsys, damage):
    target = chunk_file(finished, "probs", 2)
    raw = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip-byte":
        target.write_bytes(raw[:8] + bytes([raw[8] ^ 0x40]) + raw[9:])
    else:
        target.write_bytes(os.urandom(len(raw)))
    st = labelstore.open(str(finished))  # structure is intact: reading finds the damage
    st.read(slice(0, 8))                 # chunks 0 and 1 are fine
    with pytest.raises(labelstore.DamagedStoreError,
                       match=r"chunk 2 of array 'probs' \(rows 8:10\) cannot be read"):
        st.read(slice(0, N))
    with pytest.raises(labelstore.DamagedStoreError, match="chunk 2 of array 'probs'"):
        st.load()
    refused(capsys, ["inspect", str(finished)], "chunk 2 of array 'probs'")


def test_removed_array_and_edited_shape_are_one_line_errors(finished, capsys):
    broken = finished.parent / "broken.zarr"
    shutil.copytree(finished, broken)
    shutil.rmtree(broken / "residual")
    refused(capsys, ["inspect", str(broken)], "array 'residual' is missing")

    meta_path = finished / "probs" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["shape"] = [N + 3] + meta["shape"][1:]
    meta_path.write_text(json.dumps(meta))
    refused(capsys, ["inspect", str(finished)], "array 'probs' has shape (13,")


def test_stores_without_the_integrity_promise_still_open(finished):
    """Stores written before every chunk was written: a chunk of fill values may be absent
    there, so presence is not checked (documented in docs/format.md)."""
    meta_path = finished / "zarr.json"
    meta = json.loads(meta_path.read_text())
    del meta["attributes"]["integrity"]
    meta_path.write_text(json.dumps(meta))
    chunk_file(finished, "flips", 0).unlink()   # as an old writer skipped an all-False chunk
    st = labelstore.open(str(finished))
    assert not st.read(slice(0, 4)).flips.any()


# -- a creation that stopped half-way ----------------------------------------------------------
# The store's attributes are written first, marked `creating`; the mark goes once every array
# is there. A creation that fails (a full disk) removes what it made; one that is killed
# leaves a store that is recognisably ssld's, holds no row, and is replaced by the next run.

def _full_disk(*args, **kwargs):
    import errno

    raise OSError(errno.ENOSPC, "No space left on device", "keys/c/0")


def test_a_full_disk_while_creating_is_one_line_and_the_same_command_works_again(
        finished, tmp_path, capsys, monkeypatch):
    from labelstore import _writer

    out = tmp_path / "sel.zarr"
    argv = ["select-topk", "--store", str(finished), "--k", "2", "--out", str(out),
            "--no-progress"]
    monkeypatch.setattr(_writer, "_write_columns", _full_disk)
    from cli import main

    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("ssld: failed: No space left on device (errno 28)") and \
        err.count("\n") == 1, err
    assert not out.exists()      # nothing of it was a row: removed
    monkeypatch.undo()
    assert main(argv) == 0, capsys.readouterr().err
    assert labelstore.open(str(out)).is_complete


KILLED_CREATE = """
import os, signal, sys
import numpy as np
import labelstore
from labelstore import _writer

real = _writer._write_columns
def killed(*args, **kwargs):      # the arrays exist, the keys are not written: kill -9
    os.kill(os.getpid(), signal.SIGKILL)
_writer._write_columns = killed
labelstore.create(sys.argv[1], keys=["a", "b"], num_classes=3, topk=1)
"""


def test_a_creation_killed_half_way_leaves_a_store_the_next_run_replaces(finished, tmp_path,
                                                                         capsys):
    import subprocess
    import sys

    from cli import main

    out = tmp_path / "sel.zarr"
    assert subprocess.run([sys.executable, "-c", KILLED_CREATE, str(out)]).returncode == -9
    assert labelstore.is_store_dir(str(out))       # recognisably ssld's
    with pytest.raises(labelstore.UnfinishedStoreError,
                       match="was never finished being created .* run the command that "
                             "writes it again"):
        labelstore.open(str(out))
    refused(capsys, ["inspect", str(out)], "never finished being created")
    for extra in ([], ["--overwrite"]):            # the same command, with or without
        assert main(["select-topk", "--store", str(finished), "--k", "2", "--out", str(out),
                     "--no-progress", *extra]) == 0, capsys.readouterr().err
        assert labelstore.open(str(out)).is_complete
        if not extra:   # make it half-made again for the --overwrite round
            shutil.rmtree(out)
            assert subprocess.run([sys.executable, "-c", KILLED_CREATE, str(out)]).returncode == -9


def test_infer_teacher_recreates_a_store_whose_creation_was_killed(image_folder, tmp_path,
                                                                    capsys):
    import subprocess
    import sys

    from cli import main
    from conftest import TINY_INPUT, TINY_MODEL

    out = tmp_path / "t.zarr"
    assert subprocess.run([sys.executable, "-c", KILLED_CREATE, str(out)]).returncode == -9
    assert main(["infer-teacher", "--model", TINY_MODEL, "--random-weights", "--data",
                 str(image_folder.data), "--out", str(out), "--input-size", str(TINY_INPUT),
                 "--num-workers", "0", "--threads", "1", "--no-progress"]) == 0, \
        capsys.readouterr().err
    store = labelstore.open(str(out))
    assert store.is_complete and len(store) == len(image_folder)


def test_a_removal_that_stops_half_way_leaves_a_replaceable_store(finished, tmp_path,
                                                                   monkeypatch):
    """--overwrite deletes zarr.json last: stopped in between, the folder is still ours."""
    from labelstore import _paths

    class Interrupted(Exception):
        pass

    real, removed = _paths.shutil.rmtree, []

    def interrupted(path, *args, **kwargs):
        if os.path.dirname(str(path)) == str(finished):   # an array of the store
            removed.append(path)
            if len(removed) == 2:
                raise Interrupted
        return real(path, *args, **kwargs)

    monkeypatch.setattr(_paths.shutil, "rmtree", interrupted)
    with pytest.raises(Interrupted):
        make_store(str(finished), n=N, views=1, k=3, classes=6, chunk_rows=CHUNK,
                   overwrite=True)
    monkeypatch.undo()
    assert labelstore.is_store_dir(str(finished))
    make_store(str(finished), n=N, views=1, k=3, classes=6, chunk_rows=CHUNK, overwrite=True)
    assert labelstore.open(str(finished)).is_complete
