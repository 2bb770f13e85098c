"""The fast paths of the writer: the ``keys`` chunks built with numpy and the label arrays
written chunks at a time are byte for byte what zarr itself writes."""
from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import zarr

import labelstore
from labelstore import _format as fmt
from labelstore import _keys
from test_labelstore import make_store

KEYS = ([f"n{i % 7:08d}/ü{i}_é.JPEG" * (1 + i % 3) for i in range(300)]
        + ["with space/x.jpg", "日本/猫.png", "a"])


def files_below(folder: str) -> dict[str, bytes]:
    """Every file below ``folder``, by its path relative to it."""
    files = {}
    for where, _, names in os.walk(folder):
        for entry in names:
            full = os.path.join(where, entry)
            with open(full, "rb") as handle:
                files[os.path.relpath(full, folder)] = handle.read()
    return files


def chunk_files(path: str, name: str) -> dict[str, bytes]:
    """Every chunk file of array ``name`` (keys nested like ``c/3/0/0``), by its key."""
    files = files_below(os.path.join(path, name, "c"))
    assert files
    return files


def keys_array(path: str, n: int, rows: int, compressors=None) -> zarr.Array:
    group = zarr.open_group(path, mode="w")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)
        return group.create_array("keys", shape=(n,), chunks=(rows,), dtype=str, fill_value="",
                                  compressors=compressors or fmt.compressors(),
                                  config={"write_empty_chunks": True})


@pytest.mark.parametrize("n,rows", [(303, 64), (303, 303), (5, 2), (1, 1)])
def test_key_chunks_are_the_bytes_zarr_writes(tmp_path, n, rows):
    keys = KEYS[:n]
    by_zarr, fast = str(tmp_path / "zarr.zarr"), str(tmp_path / "fast.zarr")
    keys_array(by_zarr, n, rows)[:] = np.array(keys, dtype=object)
    _keys.write(keys_array(fast, n, rows), _keys.JoinedKeys.of(keys))
    assert chunk_files(fast, "keys") == chunk_files(by_zarr, "keys")
    array = zarr.open_group(fast, mode="r")["keys"]
    assert array[:].tolist() == keys                      # plain zarr reads them
    assert _keys.read(array, 0, n).tolist() == keys
    assert _keys.read(array, 1, n - 1).tolist() == keys[1:n - 1]
    assert _keys.JoinedKeys.of(keys).fingerprint() == fmt.fingerprint(keys)


def test_other_key_codecs_go_through_zarr(tmp_path):
    from zarr.codecs import ZstdCodec

    path = str(tmp_path / "zstd.zarr")
    array = keys_array(path, 303, 64, compressors=(ZstdCodec(level=1),))
    assert _keys._fast_codecs(array) is None
    _keys.write(array, _keys.JoinedKeys.of(KEYS))
    assert zarr.open_group(path, mode="r")["keys"][:].tolist() == KEYS
    assert _keys.read(array, 10, 20).tolist() == KEYS[10:20]


def test_a_damaged_key_chunk_is_named(tmp_path):
    path = str(tmp_path / "s.zarr")
    make_store(path)
    chunk = os.path.join(path, "keys", "c", "2")
    with open(chunk, "rb") as handle:
        data = bytearray(handle.read())
    data[len(data) // 2] ^= 0xFF
    with open(chunk, "wb") as handle:
        handle.write(bytes(data))
    with pytest.raises(labelstore.DamagedStoreError, match=r"chunk 2 of array 'keys'"):
        labelstore.open(path).keys


def test_label_chunks_are_the_bytes_zarr_writes(tmp_path):
    path = str(tmp_path / "s.zarr")
    make_store(path, n=300, chunk_rows=64)   # one write call: whole chunks batched + a tail
    source = zarr.open_group(path, mode="r")
    again = zarr.open_group(str(tmp_path / "again.zarr"), mode="w")
    for spec in fmt.SCHEMA:
        if spec.optional:
            continue
        original = source[spec.name]
        copy = again.create_array(spec.name, shape=original.shape, chunks=original.chunks,
                                  dtype=original.dtype, fill_value=original.fill_value,
                                  compressors=original.compressors,
                                  dimension_names=original.metadata.dimension_names,
                                  config={"write_empty_chunks": True})
        rows = original.chunks[0]
        for lo in range(0, original.shape[0], rows):   # chunk by chunk, as zarr writes them
            copy[lo:lo + rows] = original[lo:lo + rows]
        assert chunk_files(str(tmp_path / "again.zarr"), spec.name) == \
            chunk_files(path, spec.name), spec.name


@pytest.mark.parametrize("keys,match", [
    (["b", "a", "c", "a"], "duplicate key 'a' at rows 1 and 3"),      # unsorted: the set
    (["a", "b", "b"], "duplicate key 'b' at rows 1 and 2"),          # sorted but not strictly
    (["ä", "\u3000x"], "at row 1 starts or ends with whitespace"),   # non-ASCII: key by key
    (["a", "b\x7f"], "at row 1 contains the control character"),     # ASCII: on the bytes
    (["a", "b", "c "], "at row 2 starts or ends with whitespace"),
])
def test_key_checks_on_joined_bytes_and_key_by_key_agree(keys, match):
    with pytest.raises(ValueError, match=match):
        fmt.check_keys(keys)


def test_checked_keys_are_joined_as_stored():
    keys = ["a/1.jpg", "a/2.jpg", "b/ü.jpg"]
    joined = fmt.check_keys(np.array(keys, dtype=object))
    assert joined.raw == b"a/1.jpg\na/2.jpg\nb/\xc3\xbc.jpg\n" and not joined.ascii
    assert joined.fingerprint() == fmt.fingerprint(keys) and len(joined) == 3


def test_write_stored_takes_only_stored_values_of_every_array(tmp_path):
    source = str(tmp_path / "a.zarr")
    make_store(source, n=100, chunk_rows=32)
    raw = {name: np.asarray(zarr.open_group(source, mode="r")[name][:])
           for name in fmt.label_arrays()}
    keys = labelstore.open(source).keys.tolist()
    with labelstore.create(tmp_path / "b.zarr", keys=keys, num_classes=20, topk=4, views=2,
                           chunk_rows=32) as writer:
        with pytest.raises(ValueError, match="probs must be stored values of shape"):
            writer.write_stored(0, {**raw, "probs": raw["probs"].astype(np.float32)})
        with pytest.raises(ValueError, match="needs exactly the arrays"):
            writer.write_stored(0, {name: raw[name] for name in raw if name != "flips"})
        writer.write_stored(0, {name: value[:50] for name, value in raw.items()})
        writer.write_stored(50, {name: value[50:] for name, value in raw.items()})
    copy = zarr.open_group(str(tmp_path / "b.zarr"), mode="r")
    for name, value in raw.items():
        np.testing.assert_array_equal(copy[name][:], value, err_msg=name)


# -- the zarr releases the fast path is tested with ------------------------------------------

def _store_files(path: str) -> dict[str, bytes]:
    """Every file of a store by its relative path, the group's attributes without the
    creation time and the software versions (which differ between any two writes)."""
    import json

    files = files_below(path)
    group = json.loads(files.pop("zarr.json"))
    for entry in group["attributes"].get("provenance", []):
        entry.pop("time", None)
        entry.pop("software", None)
    for key in ("created", "software"):
        group["attributes"].pop(key, None)
    files["zarr.json"] = json.dumps(group, sort_keys=True).encode()
    return files


def test_the_installed_zarr_is_one_the_fast_path_is_tested_with():
    """A new zarr release turns the fast path off (writes stay correct, through zarr, but
    slower): this test says so, so that the release is tested and added to TESTED_ZARR."""
    from labelstore import _chunks

    assert _chunks.FAST_PATH, (f"zarr {zarr.__version__} is not in labelstore._chunks."
                               f"TESTED_ZARR {_chunks.TESTED_ZARR}: run the suite on it, then "
                               "add it")


def test_without_the_fast_path_zarr_writes_the_same_store(tmp_path, monkeypatch):
    """On a zarr release the fast path is not tested with, writes and reads go through zarr's
    public API: the same bytes in every file, the same values read, the same damage found."""
    from labelstore import _chunks

    fast = str(tmp_path / "fast.zarr")
    data = make_store(fast, n=300, chunk_rows=64)   # whole chunks and a fill-padded tail
    monkeypatch.setattr(_chunks, "FAST_PATH", False)

    def fail(*args, **kwargs):
        raise AssertionError("the fast path ran on an untested zarr")

    monkeypatch.setattr(_chunks, "put", fail)           # every fast write and read puts/gets
    monkeypatch.setattr(_keys, "put", fail)
    monkeypatch.setattr(_chunks, "chunk_keys", fail)
    monkeypatch.setattr(_keys, "chunk_keys", fail)
    plain = str(tmp_path / "plain.zarr")
    make_store(plain, n=300, chunk_rows=64)
    assert _store_files(plain) == _store_files(fast)

    read = labelstore.open(plain)
    np.testing.assert_array_equal(read.keys, data["keys"])
    part = read.read(slice(None))
    np.testing.assert_array_equal(part.indices, data["indices"])
    np.testing.assert_array_equal(part.valid, data["valid"])
    os.remove(os.path.join(plain, "probs", "c", "2", "0", "0"))   # a done chunk goes missing
    with pytest.raises(labelstore.DamagedStoreError, match="chunk 2 of array 'probs'"):
        labelstore.open(plain)
