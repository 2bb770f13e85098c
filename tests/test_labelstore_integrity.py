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
