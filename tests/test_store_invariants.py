"""One set of store invariants, checked by every reader and by ``verify`` alike
(docs/format.md, "Invariants"): the attributes against each other when a store is opened
(class names, every recorded teacher's class count), the values of each chunk as it is read
(class ids and labels < num_classes, probabilities finite and >= 0, embeddings finite).
A store that breaks one is damaged: every command says so in one line (exit 2), ``verify``
fails, and nothing is computed from it (no IndexError, no silently skipped rows)."""
from __future__ import annotations

import numpy as np
import pytest
import zarr

import labelstore
from cli import main
from test_labelstore import make_store
from test_labelstore_paths import refused

N, CHUNK, CLASSES = 10, 4, 6


def edit_attrs(path, **changes):
    """Change group attributes behind the library's back (as a hand edit or another tool)."""
    zarr.open_group(str(path), mode="r+").attrs.update(changes)


def verify_fails(capsys, path, *fragments):
    assert main(["verify", str(path), "--structure-only"]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out, out
    for fragment in fragments:
        assert fragment in out, out


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "s.zarr"
    make_store(str(path), n=N, views=1, k=3, classes=CLASSES, chunk_rows=CHUNK)
    return path


def test_a_fresh_store_keeps_every_invariant(store, capsys):
    assert main(["verify", str(store), "--structure-only"]) == 0, capsys.readouterr().out


@pytest.mark.parametrize("changes,message", [
    # raised: every dense target would change, the stored rows stay plausible
    (dict(num_classes=CLASSES + 2, teacher={"model": "resnet10t", "num_classes": CLASSES}),
     f"num_classes is {CLASSES + 2} but the teacher has {CLASSES} classes"),
    (dict(class_names=["a", "b"]), f"class_names has 2 names for num_classes {CLASSES}"),
    (dict(teacher={"model": "ensemble(a+b)", "members": [
        {"teacher": {"model": "a", "num_classes": CLASSES}},
        {"teacher": {"model": "b", "num_classes": CLASSES + 1}}]}),
     f"teacher member 1 has {CLASSES + 1} classes"),
])
def test_attributes_that_contradict_each_other_are_damage(store, capsys, changes, message):
    edit_attrs(store, **changes)
    with pytest.raises(labelstore.DamagedStoreError, match=message):
        labelstore.open(str(store))
    verify_fails(capsys, store, message)
    refused(capsys, ["select-topk", "--store", store, "--k", 1, "--out",
                     store.parent / "o.zarr"], "is damaged", message)


def test_class_ids_beyond_num_classes_are_damage_not_an_index_error(store, capsys):
    """num_classes lowered below the stored ids (no teacher record says otherwise)."""
    data = labelstore.open(str(store)).read(slice(None))
    top = int(data.indices.max())
    row = int(np.argwhere(data.indices == top)[0][0])
    edit_attrs(store, num_classes=top, teacher={"model": "resnet10t"})
    store_open = labelstore.open(str(store))        # the attributes alone are consistent
    chunk = row // CHUNK
    rows = f"rows {chunk * CHUNK}:{min(N, (chunk + 1) * CHUNK)}"
    with pytest.raises(labelstore.DamagedStoreError,
                       match=rf"chunk {chunk} of array 'indices' \({rows}\) holds class id "
                             rf"{top} outside \[0, num_classes={top}\) at row {row}"):
        store_open.dense(slice(None))
    out = store.parent / "o.zarr"
    refused(capsys, ["select-topk", "--store", store, "--k", 1, "--out", out],
            f"chunk {chunk} of array 'indices'", f"class id {top}")
    assert not out.exists()
    verify_fails(capsys, store, "damaged", f"class id {top}")


def test_labels_beyond_num_classes_are_damage(tmp_path, capsys):
    path = tmp_path / "l.zarr"
    with labelstore.create(str(path), keys=["a", "b", "c"], num_classes=5, topk=1,
                           labels=[0, 4, 1]) as writer:
        writer.write(0, np.zeros((3, 1, 1), int), np.full((3, 1, 1), 0.5))
    edit_attrs(path, num_classes=4)
    with pytest.raises(labelstore.DamagedStoreError, match="label 4 outside"):
        labelstore.open(str(path)).labels
    verify_fails(capsys, path, "label 4 outside [-1, num_classes=4) at row 1")


def test_train_student_refuses_a_store_with_ids_beyond_its_classes(tmp_path, capsys):
    """Before: an IndexError traceback from the dense targets, after the run folder was made."""
    from train_data import make_images, make_store as make_train_store

    keys, labels = make_images(str(tmp_path / "images"), n=12, classes=3)
    path = tmp_path / "t.zarr"
    make_train_store(str(path), str(tmp_path / "images"), keys, labels, classes=3, topk=2)
    edit_attrs(path, num_classes=2)
    out = tmp_path / "runs" / "student"
    refused(capsys, ["train-student", "--student", "test_resnet", "--store", path, "--out", out,
                     "--epochs", 1, "--batch-size", 4, "--input-size", 32, "--num-workers", 0,
                     "--device", "cpu", "--threads", 1], "is damaged", "outside [")
    assert not (tmp_path / "runs").exists()      # a refused run writes nothing


# -- embeddings -----------------------------------------------------------------------------
def embedded(path, embeddings, valid=None):
    n = len(embeddings)
    with labelstore.create(str(path), keys=[f"k{i}" for i in range(n)], num_classes=3, topk=1,
                           embedding_dim=embeddings.shape[1], chunk_rows=CHUNK) as writer:
        writer.write(0, np.zeros((n, 1, 1), int), np.full((n, 1, 1), 0.5), valid=valid,
                     embeddings=embeddings)
    return path


def test_the_writer_refuses_embeddings_that_are_not_finite_as_stored(tmp_path):
    rows = np.ones((N, 4), np.float32)
    rows[3, 1] = 1e5        # beyond float16: stored as inf, dedup could not compare it
    with pytest.raises(ValueError, match=r"embeddings of row 3 are not finite as float16 "
                                         r"\(largest magnitude 100000, beyond"):
        embedded(tmp_path / "a.zarr", rows)
    rows[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"embeddings of row 3 are not finite as float16 "
                                         r"\(NaN or inf\)"):
        embedded(tmp_path / "b.zarr", rows, valid=np.arange(N) != 3)   # invalid rows too


def test_non_finite_embeddings_are_damage(tmp_path, capsys):
    """A store whose embeddings hold inf (written before the writer refused them): dedup
    stops with one line naming the chunk instead of leaving the row out in silence."""
    rng = np.random.default_rng(0)
    query = embedded(tmp_path / "q.zarr", rng.normal(size=(N, 4)))
    pool = embedded(tmp_path / "p.zarr", rng.normal(size=(N, 4)))
    group = zarr.open_group(str(pool), mode="r+")
    values = group["embeddings"][:]
    values[6, 2] = np.inf
    group["embeddings"].with_config({"write_empty_chunks": True})[:] = values
    refused(capsys, ["dedup", "--query", query, "--pool", pool, "--verify", "none",
                     "--threads", 1], "chunk 1 of array 'embeddings' (rows 4:8) holds "
                                      "embedding value inf (NaN or inf) at row 6")
    verify_fails(capsys, pool, "embedding value inf")


def test_dedup_reports_rows_whose_embedding_is_all_zero(tmp_path, capsys):
    """A valid row with an all-zero embedding cannot be compared: said, never skipped
    silently (its duplicates cannot be found)."""
    rng = np.random.default_rng(1)
    queries = rng.normal(size=(N, 4))
    queries[[2, 5]] = 0
    pool = rng.normal(size=(N + 2, 4))
    pool[7] = 0
    pool[9] = 0
    valid = np.ones(N + 2, dtype=bool)
    valid[9] = False            # an invalid row takes no part anyway: not reported
    out = tmp_path / "d.tsv"
    code = main(["dedup", "--query", embedded(tmp_path / "q.zarr", queries), "--pool",
                 embedded(tmp_path / "p.zarr", pool, valid), "--verify", "none", "--out", out,
                 "--threads", 1])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert ("2 query rows and 1 pool row have an all-zero embedding and were not compared "
            "(first: query k2, pool k7)") in captured.out
    text = out.read_text()
    assert "# not compared (all-zero embedding): query\tk2" in text
    assert "# not compared (all-zero embedding): pool\tk7" in text
    assert "k9" not in text
