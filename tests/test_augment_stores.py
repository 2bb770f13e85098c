"""Stores with augmentation records through the store commands (no torch): select-topk and
merge carry the records and move every mixing partner to an output row or to the partner
table (checked against a brute-force resolution through the source stores), ensemble
requires and keeps the members' records, export and inspect show them; stored logits are
written, read, copied and turned into targets over the same support as a student's."""
from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
import zarr

import labelstore
from labelstore import _format as fmt
from teacher_infer.imaging.augment import AugmentSpec, ViewRecords, plan_records
from test_select import pool_rows

SPEC = AugmentSpec(augment="rand-m9-n2-mstd0.5", erase=0.5, mixup=0.8, cutmix=1.0,
                   mix_prob=0.7)
RECORDS = ("aug_ops", "aug_levels", "erase_boxes", "mix_views", "mix_lambdas", "mix_boxes")
CLASSES, VIEWS, K = 12, 3, 3


def write(path, keys, *, seed, root="/data/a", spec=SPEC, chunk_rows=16, logits=False,
          same_as=None):
    """A store with records planned as the teacher plans them (partners inside the chunk);
    ``same_as``: another store's data whose crops and records to reuse (ensemble members)."""
    data = pool_rows(len(keys), views=VIEWS, k=K, classes=CLASSES, seed=seed)
    data["probs"] = data["probs"] * 0.9  # leave a tail
    dims = spec.dims() if spec is not None else None
    records = None
    if spec is not None:
        records = ViewRecords.stack([plan_records(spec, seed=seed, key=key, row=row,
                                                  rows=len(keys), chunk_rows=chunk_rows,
                                                  views=VIEWS) for row, key in enumerate(keys)])
    if same_as is not None:
        for name in ("boxes", "flips", "valid"):
            data[name] = same_as[name]
        records = same_as["records"]
    extra = records.store_arrays(dims) if records is not None else {}
    if logits:
        data["logits"] = np.random.default_rng(seed).normal(size=(len(keys), VIEWS, K)) \
            .astype(np.float32)
        data["log_partition"] = np.random.default_rng(seed + 1).normal(
            size=(len(keys), VIEWS)).astype(np.float32)
        extra.update(logits=data["logits"], log_partition=data["log_partition"])
    attrs = {"dataset": {"root": root}, "teacher": {"model": "t"}}
    if spec is not None:
        attrs["augment"] = spec.attrs()
    with labelstore.create(path, keys=keys, num_classes=CLASSES, topk=K, views=VIEWS,
                           labels=data["labels"], chunk_rows=chunk_rows, attrs=attrs,
                           augment_dims=dims, logits=logits) as writer:
        writer.write(0, data["indices"], data["probs"], boxes=data["boxes"],
                     flips=data["flips"], valid=data["valid"], **extra)
    data["records"] = records
    return str(path), data


def replay_data(store, row: int, prefix: str = "") -> dict:
    """What replaying row ``row``'s views needs, resolved the slow way: per mixed view the
    partner's key (with ``prefix``), crop and own records, plus the row's own records."""
    own = store.read_rows(row)
    out = {"own": {name: own[name][0] for name in RECORDS}, "partners": {}}
    for view in np.flatnonzero(own["mix_partners"][0] != -1):
        ref = int(own["mix_partners"][0, view])
        if ref >= 0:
            found = store.read_rows(ref, ("boxes", "flips", "aug_ops", "aug_levels",
                                          "erase_boxes"))
            found = {name: value[0] for name, value in found.items()}
            found["keys"] = str(store.keys[ref])
        else:
            table = zarr.open_group(store.path, mode="r")["partners"]
            entry = -2 - ref
            found = {name: np.asarray(table[name][entry]) for name in
                     ("boxes", "flips", "aug_ops", "aug_levels", "erase_boxes")}
            found["keys"] = str(table["keys"][entry])
        found["keys"] = prefix + found["keys"]
        out["partners"][int(view)] = found
    return out


def assert_same_replay(a: dict, b: dict) -> None:
    for name in RECORDS:
        np.testing.assert_array_equal(a["own"][name], b["own"][name], err_msg=name)
    assert sorted(a["partners"]) == sorted(b["partners"])
    for view, partner in a["partners"].items():
        other = b["partners"][view]
        assert partner["keys"] == other["keys"], view
        for name in ("boxes", "flips", "aug_ops", "aug_levels", "erase_boxes"):
            np.testing.assert_array_equal(partner[name], other[name], err_msg=name)


@pytest.fixture(scope="module")
def pools(tmp_path_factory):
    base = tmp_path_factory.mktemp("aug_stores")
    a = write(base / "a.zarr", [f"p/{i:03d}.jpg" for i in range(70)], seed=1, root="/data/a")
    b = write(base / "b.zarr", [f"q/{i:03d}.jpg" for i in range(45)], seed=2, root="/data/b")
    return base, a, b


def by_key(store) -> dict[str, int]:
    return {str(key): row for row, key in enumerate(store.keys)}


def test_select_topk_keeps_the_records_and_resolves_every_partner(pools):
    base, (a, _), _ = pools
    out = base / "sel.zarr"
    result = labelstore.select_topk(a, 2, out)
    source, selected = labelstore.open(a), labelstore.open(out)
    assert selected.augment_dims == source.augment_dims
    assert selected.attrs["augment"] == source.attrs["augment"]
    rows = np.unique(result.selection.rows)
    np.testing.assert_array_equal([by_key(source)[k] for k in selected.keys], rows)
    mixes = selected.read_rows(slice(None))["mix_partners"]
    assert (mixes >= 0).any() and (mixes <= -2).any()  # both kinds occur: the test can fail
    # a partner is a row of the output exactly when the source row was selected
    kept = set(rows.tolist())
    source_mixes = source.read_rows(rows)["mix_partners"]
    np.testing.assert_array_equal(mixes >= 0, np.isin(source_mixes, list(kept)))
    np.testing.assert_array_equal(mixes == -1, source_mixes == -1)
    for out_row, row in enumerate(rows):
        assert_same_replay(replay_data(selected, out_row), replay_data(source, int(row)))
    # the table holds only unselected partners, each once, and costs little
    table = selected.partner_table()
    assert selected.partner_count == len(np.unique(mixes[mixes <= -2]))
    assert not set(table["keys"].tolist()) & set(selected.keys.tolist())
    # labels, boxes and the other records are the source's, bit for bit
    for name in ("probs", "indices", "boxes", "flips"):
        np.testing.assert_array_equal(selected.read(slice(None))[name],
                                      source.read(rows)[name])


def test_select_then_merge_then_select_carries_table_entries_on(pools):
    base, (a, _), (b, _) = pools
    labelstore.select_topk(a, 2, base / "sel_a.zarr")
    labelstore.merge([b, base / "sel_a.zarr"], base / "merged.zarr")
    merged = labelstore.open(base / "merged.zarr")
    assert merged.attrs["dataset"]["root"] == "/data"  # roots differ: keys prefixed
    sources = [(labelstore.open(b), "b/"), (labelstore.open(base / "sel_a.zarr"), "a/")]
    for row, key in enumerate(merged.keys):
        store, prefix = next((s, p) for s, p in sources if key.startswith(p))
        expected = replay_data(store, by_key(store)[key[len(prefix):]], prefix)
        assert_same_replay(replay_data(merged, row), expected)
    again = labelstore.select_topk(base / "merged.zarr", 1, base / "again.zarr")
    final = labelstore.open(base / "again.zarr")
    assert final.partner_count > 0
    for row, key in enumerate(final.keys):
        assert_same_replay(replay_data(final, row), replay_data(merged, by_key(merged)[key]))
    assert len(final) == len(np.unique(again.selection.rows))


def test_merge_moves_a_dropped_duplicate_partner_to_the_table(tmp_path):
    """A row dropped because its key repeats an earlier store's is not the same crop: rows
    of its own store that mix with it get it from the partner table."""
    keys = [f"k{i:02d}.jpg" for i in range(20)]
    a, _ = write(tmp_path / "a.zarr", keys[:10], seed=3, root="/data", chunk_rows=10)
    b, _ = write(tmp_path / "b.zarr", keys[5:], seed=4, root="/data", chunk_rows=15)
    labelstore.merge([a, b], tmp_path / "m.zarr")
    merged, source_b = labelstore.open(tmp_path / "m.zarr"), labelstore.open(b)
    assert len(merged) == 20 and merged.partner_count > 0
    refs_b = source_b.read_rows(slice(None))["mix_partners"]
    assert np.isin(refs_b, np.arange(5)).any()  # b's rows 0-4 are dropped duplicates
    for row in range(10, 20):
        key = str(merged.keys[row])
        assert_same_replay(replay_data(merged, row), replay_data(source_b, by_key(source_b)[key]))


def test_stores_augmented_otherwise_are_not_combined(pools, tmp_path):
    _, (a, _), _ = pools
    other, _ = write(tmp_path / "o.zarr", ["x.jpg", "y.jpg"], seed=5,
                     spec=AugmentSpec(augment="rand-m7-n2"))
    plain, _ = write(tmp_path / "c.zarr", ["z.jpg", "w.jpg"], seed=6, spec=None)
    for store in (other, plain):
        with pytest.raises(ValueError, match=r"^augmentation differs: .*a.zarr has --augment "
                                             "rand-m9|^augmentation differs"):
            labelstore.merge([a, store], tmp_path / "m.zarr")
    with pytest.raises(ValueError, match="crop only"):
        labelstore.merge([a, plain], tmp_path / "m.zarr")
    assert not (tmp_path / "m.zarr").exists()


def test_ensemble_keeps_the_shared_records_and_refuses_others(tmp_path):
    keys = [f"e{i:02d}.jpg" for i in range(40)]
    first, data = write(tmp_path / "t1.zarr", keys, seed=7)
    second, _ = write(tmp_path / "t2.zarr", keys, seed=8, same_as=data)
    labelstore.ensemble([first, second], tmp_path / "ens.zarr")
    ens = labelstore.open(tmp_path / "ens.zarr")
    assert ens.augment_dims == SPEC.dims() and ens.attrs["augment"] == SPEC.attrs()
    expected = labelstore.open(first).read_rows(slice(None))
    for name, value in ens.read_rows(slice(None)).items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)
    # a valid row whose partner row is invalid in the output is invalid too
    refs = expected["mix_partners"]
    valid = data["valid"]
    lost = valid & ((refs >= 0) & ~valid[np.maximum(refs, 0)]).any(-1)
    assert lost.any()  # the synthetic data has such rows: the rule is exercised
    np.testing.assert_array_equal(ens.valid, valid & ~lost)

    tampered = str(tmp_path / "t3.zarr")
    shutil.copytree(second, tampered)
    group = zarr.open_group(tampered, mode="r+")
    levels = group["aug_levels"][:]
    row, view, slot = np.argwhere(levels != 0)[0]
    levels[row, view, slot] = -levels[row, view, slot] if levels[row, view, slot] != -128 else 1
    group["aug_levels"][:] = levels
    with pytest.raises(ValueError, match=rf"^row {row} .* view {view}: aug_levels differs"):
        labelstore.ensemble([first, tampered], tmp_path / "ens2.zarr")
    crop_only, _ = write(tmp_path / "t4.zarr", keys, seed=9, spec=None, same_as={
        **data, "records": None})
    with pytest.raises(ValueError, match="augmentation differs"):
        labelstore.ensemble([first, crop_only], tmp_path / "ens3.zarr")


def test_export_and_inspect_show_the_records(pools, tmp_path):
    base, (a, _), _ = pools
    labelstore.select_topk(a, 2, tmp_path / "sel.zarr")
    store = labelstore.open(tmp_path / "sel.zarr")
    labelstore.export(store, str(tmp_path / "sel.h5"))
    table = store.partner_table()
    with h5py.File(tmp_path / "sel.h5", "r") as h5:
        assert list(h5["partners/keys"].asstr()[:]) == table["keys"].tolist()
        np.testing.assert_array_equal(h5["partners/aug_ops"][:], table["aug_ops"])
        np.testing.assert_allclose(h5["partners/boxes"][:],
                                   labelstore.dequantize_boxes(table["boxes"]))
        np.testing.assert_array_equal(h5["mix_partners"][:],
                                      store.read_rows(slice(None))["mix_partners"])
    report = labelstore.inspect_store(store)
    text = str(report)
    assert "--augment rand-m9-n2-mstd0.5 --erase 0.5" in text and "--mixup 0.8" in text
    assert f"Partner table        : {store.partner_count:,} entries" in text
    assert set(report.record_bytes_per_view) == {"aug_ops", "aug_levels", "erase_boxes",
                                                 "mix_partners", "mix_views", "mix_lambdas",
                                                 "mix_boxes"}
    assert all(v > 0 for v in report.record_bytes_per_view.values())
    assert {"aug_ops", "mix_partners", "partners"} <= set(report.label_sha256)
    json.dumps(report.to_dict())
    plain = labelstore.inspect_store(labelstore.open(write(tmp_path / "c.zarr", ["a", "b"],
                                                           seed=1, spec=None)[0]))
    assert plain.augmentation is None and "none (crop-only views)" in str(plain)


def test_the_partner_table_is_checked_on_open(pools, tmp_path):
    base, (a, _), _ = pools
    labelstore.select_topk(a, 2, tmp_path / "sel.zarr")
    for damage, message in ((("boxes", "c"), "chunk 0 of array 'partners/boxes' is missing"),
                            (("aug_ops",), "array 'partners/aug_ops' is missing")):
        damaged = tmp_path / f"damaged-{damage[0]}.zarr"
        shutil.copytree(tmp_path / "sel.zarr", damaged)
        shutil.rmtree(damaged.joinpath("partners", *damage))
        with pytest.raises(labelstore.DamagedStoreError, match=message):
            labelstore.open(damaged)
    with pytest.raises(ValueError, match=r"partners: boxes must be uint16 of shape \(1, 1, 4\)"):
        labelstore.create(tmp_path / "x.zarr", keys=["a"], num_classes=3, topk=2,
                          augment_dims={"mix": 1}, partners={
                              "keys": ["p.jpg"], "boxes": np.zeros((1, 4), np.uint16),
                              "flips": np.zeros((1, 1), bool)})
    with pytest.raises(ValueError, match="partner table needs mixing records"):
        labelstore.create(tmp_path / "x.zarr", keys=["a"], num_classes=3, topk=2,
                          partners={"keys": []})
    assert not (tmp_path / "x.zarr").exists()


# -- stored logits ----------------------------------------------------------------------------

def test_logits_are_stored_read_and_copied_when_every_source_has_them(tmp_path):
    keys = [f"l{i}.jpg" for i in range(30)]
    path, data = write(tmp_path / "l.zarr", keys, seed=11, logits=True, spec=None)
    store = labelstore.open(path)
    assert store.has_logits and store.student_arrays == ("logits", "log_partition")
    np.testing.assert_array_equal(store.read_rows([4, 2])["logits"], data["logits"][[4, 2]])
    np.testing.assert_array_equal(store.load().read_rows(slice(None))["log_partition"],
                                  data["log_partition"])
    result = labelstore.select_topk(path, 3, tmp_path / "s.zarr")
    selected = labelstore.open(tmp_path / "s.zarr")
    rows = np.unique(result.selection.rows)
    np.testing.assert_array_equal(selected.read_rows(slice(None))["logits"],
                                  data["logits"][rows])
    plain, _ = write(tmp_path / "p.zarr", [f"m{i}.jpg" for i in range(10)], seed=12, spec=None)
    merged = labelstore.merge([path, plain], tmp_path / "m.zarr")
    assert not labelstore.open(tmp_path / "m.zarr").has_logits
    assert any("stored logits not copied" in note for note in merged.notes)
    with pytest.raises(ValueError, match="has no row array 'logits'"):
        labelstore.open(plain).read_rows(0, ("logits",))
    with labelstore.create(tmp_path / "w.zarr", keys=["a"], num_classes=3, topk=2) as writer:
        with pytest.raises(ValueError, match=r"created without logits \(logits\)"):
            writer.write(0, np.array([[[0, 1]]]), np.array([[[.5, .2]]]),
                         logits=np.zeros((1, 1, 2)))


def test_densify_logits_keeps_the_tail_on_the_same_support_as_the_student():
    """The target of a stored row is a distribution over all C classes: its top-k from the
    float32 logits, the tail mass (exact through the log-partition) spread over the other
    C - k classes, as densify does with the stored residual. A student compared with it
    sees the same support; a teacher normalised over its top-k alone (MaxText#4056) would
    put the tail's mass on the top-k instead."""
    rng = np.random.default_rng(0)
    classes, k, temperature = 50, 5, 2.0
    full = rng.normal(0, 3, (4, classes))  # float64 teacher logits
    indices = np.argsort(-full, axis=1)[:, :k]
    top = np.take_along_axis(full, indices, 1).astype(np.float32)
    log_z = np.log(np.exp(full / temperature).sum(1))
    dense = labelstore.densify_logits(indices, top, log_z.astype(np.float32), classes,
                                      temperature)
    probs = np.exp(full / temperature - log_z[:, None])
    np.testing.assert_allclose(np.take_along_axis(dense, indices, 1),
                               np.take_along_axis(probs, indices, 1), rtol=2e-6)
    tail = 1 - np.take_along_axis(probs, indices, 1).sum(1)
    outside = np.ones_like(dense, dtype=bool)
    np.put_along_axis(outside, indices, False, 1)
    np.testing.assert_allclose(dense[outside].reshape(4, -1).sum(1), tail, rtol=1e-5)
    np.testing.assert_allclose(dense.sum(1), 1, atol=1e-6)
    # the same rule as densify on exact probabilities and residual
    np.testing.assert_allclose(dense, labelstore.densify(
        indices, np.take_along_axis(probs, indices, 1), tail, classes), rtol=1e-5)
    # and not the top-k-normalised teacher
    renormalised = np.exp(top / temperature) / np.exp(top / temperature).sum(1, keepdims=True)
    assert np.abs(np.take_along_axis(dense, indices, 1) - renormalised).max() > 0.01
