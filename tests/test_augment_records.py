"""Augmentation records (``teacher_infer.imaging.augment``): the policy grammar and option
checks, the versioned ops table, the draws (deterministic in (seed, key, view), timm's
distributions, partners inside the chunk), and the records' store arrays."""
from __future__ import annotations

import json
import re
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import zarr
from hypothesis import given, settings, strategies as st

import labelstore
from labelstore import _format as fmt
from teacher_infer.imaging.augment import (AugmentSpec, ViewRecords, parse_policy,
                                           partner_window, partner_views, plan_records,
                                           resolve_table, table_attrs)
from teacher_infer.imaging.augment.records import draw_partner
from teacher_infer.imaging.augment.table import (LEVEL_SCALE, OPS_V1, RAND_INCREASING_OPS,
                                                 RAND_OPS)
from teacher_infer.imaging.views import view_rng

FULL = AugmentSpec(augment="rand-m9-n2-mstd0.5", erase=0.25, mixup=0.8, cutmix=1.0)
NAMES = [op.name for op in OPS_V1]


def plan(spec: AugmentSpec, key: str, row: int = 3, rows: int = 40, chunk_rows: int = 16,
         views: int = 4, seed: int = 0) -> ViewRecords:
    return plan_records(spec, seed=seed, key=key, row=row, rows=rows, chunk_rows=chunk_rows,
                        views=views)


def assert_same(a: ViewRecords, b: ViewRecords) -> None:
    for name in ("ops", "levels", "erase_boxes", "mix_partners", "mix_views", "mix_lambdas",
                 "mix_boxes"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


# -- grammar and options ---------------------------------------------------------------------

def test_policy_grammar_and_timm_defaults():
    policy = parse_policy("rand-m9-n3-mstd0.5-mmax12-inc1-p0.7")
    assert (policy.magnitude, policy.num_ops, policy.magnitude_std, policy.magnitude_max,
            policy.increasing, policy.prob) == (9, 3, 0.5, 12, True, 0.7)
    assert policy.op_names == RAND_INCREASING_OPS
    default = parse_policy("rand")
    assert (default.magnitude, default.num_ops, default.prob, default.magnitude_std,
            default.magnitude_max, default.increasing) == (10, 2, 0.5, 0.0, 10, False)
    assert default.op_names == RAND_OPS
    assert math.isinf(parse_policy("rand-m9-mstd101").magnitude_std)  # timm: uniform [0, m]
    # tokens in any order
    assert parse_policy("rand-inc1-m7") == parse_policy("rand-m7-inc1").__class__(
        text="rand-inc1-m7", magnitude=7, increasing=True)


@pytest.mark.parametrize("text,token", [
    ("rand-m9-x3", "'x3'"), ("rand-m9x", "'m9x'"), ("rand-m9-m8", "'m'"), ("rand-", "''"),
    ("rand-tweights", "'tweights'"), ("rand-m", "'m'"), ("rand-mstd.5", "'mstd.5'"),
    ("augmix-m5", "'augmix'"), ("original-mstd0.5", "'original'"), ("rand-mmax20", "mmax"),
    ("rand-n0", "n must"), ("rand-p1.5", "p must"), ("rand-inc2", "inc must"), ("", "''"),
])
def test_bad_policies_are_refused_naming_the_token(text, token):
    with pytest.raises(ValueError) as error:
        AugmentSpec(augment=text)
    message = str(error.value)
    assert message.startswith("--augment") and token in message and "\n" not in message


@pytest.mark.parametrize("kwargs,option", [
    ({"mixup": 0.0}, "--mixup 0.0"), ({"mixup": -1.0}, "--mixup -1.0"),
    ({"cutmix": 0.0}, "--cutmix 0.0"), ({"cutmix": float("nan")}, "--cutmix nan"),
    ({"mixup": float("inf")}, "--mixup inf"), ({"erase": 1.5}, "--erase 1.5"),
    ({"erase": -0.1}, "--erase -0.1"), ({"mix_prob": 1.01}, "--mix-prob 1.01"),
    ({"mix_prob": float("nan")}, "--mix-prob nan"),
    ({"switch_prob": -1.0}, "--mixup-switch-prob -1.0"), ({"erase_count": 0}, "--erase-count 0"),
    ({"erase_scale": (0.5, 0.2)}, "erase_scale"), ({"fill": (0, 0, 256)}, "fill"),
])
def test_bad_options_are_refused_naming_the_option(kwargs, option):
    with pytest.raises(ValueError) as error:
        AugmentSpec(**kwargs)
    assert str(error.value).startswith(option) and "\n" not in str(error.value)


def test_store_shape_checks():
    FULL.check_store(rows=2, views=2, chunk_rows=2)
    AugmentSpec(augment="rand").check_store(rows=1, views=2, chunk_rows=1)  # no mixing: fine
    with pytest.raises(ValueError, match=r"^--mixup/--cutmix: a store of 1 row has no other"):
        FULL.check_store(rows=1, views=4, chunk_rows=16)
    with pytest.raises(ValueError, match=r"^--cutmix: partners are drawn within a chunk"):
        AugmentSpec(cutmix=1.0).check_store(rows=10, views=4, chunk_rows=1)
    with pytest.raises(ValueError, match="--views 1 has none"):
        AugmentSpec(erase=0.5).check_store(rows=10, views=1, chunk_rows=16)
    with pytest.raises(ValueError, match=r"^--mixup: the partner's view is stored as uint8"):
        AugmentSpec(mixup=0.2).check_store(rows=10, views=256, chunk_rows=16)
    AugmentSpec().check_store(rows=1, views=1, chunk_rows=1)  # nothing to augment: nothing to check
    with pytest.raises(ValueError, match="store of 2 rows or more"):
        partner_window(0, 1, 16)


# -- the ops table ---------------------------------------------------------------------------

def test_attrs_round_trip_through_json():
    text = json.dumps(FULL.attrs())
    assert AugmentSpec.from_attrs(json.loads(text)) == FULL
    assert AugmentSpec.from_attrs(None) is None
    table = json.loads(text)["ops_table"]
    assert table["version"] == 1 and [op["name"] for op in table["ops"]] == NAMES


def test_unknown_table_version_or_op_is_refused():
    attrs = FULL.attrs()
    attrs["ops_table"]["version"] = 2
    with pytest.raises(ValueError, match=r"^s.zarr was written with augmentation ops table "
                                         r"version 2; this ssld replays versions 1$"):
        AugmentSpec.from_attrs(attrs, where="s.zarr")
    table = table_attrs()
    table["ops"][5]["name"] = "Cutout"
    with pytest.raises(ValueError, match=r"op 'Cutout' \(id 5\) is not in ops table version 1"):
        resolve_table(table)
    table = table_attrs()
    table["resample"] = "bicubic"
    with pytest.raises(ValueError, match="resample 'bicubic'"):
        resolve_table(table)
    with pytest.raises(ValueError, match="no readable ops table"):
        resolve_table(None)
    attrs = FULL.attrs()
    attrs["version"] = 7
    with pytest.raises(ValueError, match="augmentation attributes version 7"):
        AugmentSpec.from_attrs(attrs)


def test_stored_ids_are_resolved_by_name():
    """A table written with other ids (a later version's order) replays by name."""
    table = table_attrs()
    table["ops"] = table["ops"][::-1]
    assert [op.name for op in resolve_table(table)] == NAMES[::-1]


def test_levels_are_timm_arguments_after_quantisation():
    """A stored level is the magnitude in tenths: the argument is timm's formula at it."""
    by_name = dict(zip(NAMES, OPS_V1))
    assert by_name["Rotate"].argument(-90) == -(9.0 / 10) * 30.0
    assert by_name["Rotate"].argument(57) == (5.7 / 10) * 30.0
    assert by_name["SolarizeIncreasing"].argument(100) == 0
    assert by_name["PosterizeIncreasing"].argument(25) == 3
    assert by_name["ColorIncreasing"].argument(-120) == 0.1  # max(0.1, 1 - 1.08)
    assert by_name["TranslateYRel"].argument(-30) == -(3.0 / 10) * 0.45
    for stored in range(-127, 128):  # int8 tenths round-trip exactly
        assert round(stored / LEVEL_SCALE * LEVEL_SCALE) == stored


# -- draws -----------------------------------------------------------------------------------

def test_records_depend_on_seed_key_view_only():
    keys = [f"n01/{i}.JPEG" for i in range(12)]
    forward = [plan(FULL, key) for key in keys]
    backward = [plan(FULL, key) for key in reversed(keys)][::-1]
    for a, b in zip(forward, backward):
        assert_same(a, b)
    assert not np.array_equal(plan(FULL, keys[0]).ops, plan(FULL, keys[0], seed=1).ops)
    # a view's draws do not depend on how many views the row has
    four, six = plan(FULL, keys[1], views=4), plan(FULL, keys[1], views=6)
    np.testing.assert_array_equal(four.ops, six.ops[:4])
    np.testing.assert_array_equal(four.erase_boxes, six.erase_boxes[:4])


def test_records_are_the_same_in_another_process():
    """No process state (hash seeds, global RNGs) enters a draw."""
    code = ("import json; from teacher_infer.imaging.augment import AugmentSpec, plan_records; "
            "s = AugmentSpec(augment='rand-m9-n2-mstd0.5', erase=0.25, mixup=0.8, cutmix=1.0); "
            "r = plan_records(s, seed=0, key='n01/5.JPEG', row=3, rows=40, chunk_rows=16, "
            "views=4); print(json.dumps({k: v.tolist() for k, v in vars(r).items()}))")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True).stdout
    here = plan(FULL, "n01/5.JPEG")
    for name, values in json.loads(out).items():
        np.testing.assert_array_equal(np.asarray(values), getattr(here, name), err_msg=name)


def test_parts_have_independent_streams():
    """Adding erasing or mixing leaves the ops drawn with the same seed unchanged, and the
    augmentation draws are not the view's crop draws."""
    key = "n02/7.JPEG"
    alone = plan(AugmentSpec(augment="rand-m9-n2-mstd0.5"), key)
    np.testing.assert_array_equal(alone.ops, plan(FULL, key).ops)
    np.testing.assert_array_equal(alone.levels, plan(FULL, key).levels)
    erase_only = plan(AugmentSpec(erase=0.25), key)
    np.testing.assert_array_equal(erase_only.erase_boxes, plan(FULL, key).erase_boxes)
    crop = view_rng(0, key, 1).random(4)
    ra = view_rng(0, key, 1)
    ra.bit_generator.advance(1 << 96)
    assert not np.allclose(crop, ra.random(4))


def test_view_zero_is_never_augmented():
    for i in range(50):
        records = plan(FULL, f"k/{i}")
        assert_same(records.map(lambda a: a[:1]),
                    ViewRecords.empty((1,), FULL.dims()))


def draws(spec: AugmentSpec, count: int, views: int = 5) -> ViewRecords:
    return ViewRecords.stack([plan(spec, f"img/{i}.jpg", row=i % 40, views=views)
                              for i in range(count)]).map(lambda a: a[:, 1:])


def test_randaugment_draws_follow_timm():
    """Ops uniform over timm's set, applied with probability p, magnitudes N(m, mstd)
    clipped to [0, mmax], signs half negative where timm negates."""
    spec = AugmentSpec(augment="rand-m7-n3-mstd1-p0.6")
    records = draws(spec, 1500)
    ops, levels = records.ops.ravel(), records.levels.ravel()
    applied = ops > 0
    assert abs(applied.mean() - 0.6) < 0.02  # 18,000 ops: 0.6 ± 0.004 (1 sd)
    counts = np.bincount(ops[applied], minlength=len(OPS_V1))
    chosen = [NAMES.index(name) for name in RAND_OPS]
    assert set(np.flatnonzero(counts)) == set(chosen)
    assert counts[chosen].min() > 0.8 * applied.sum() / len(chosen)
    with_level = np.array([OPS_V1[i].arg is not None for i in ops]) & applied
    magnitude = np.abs(levels[with_level]) / LEVEL_SCALE
    assert abs(magnitude.mean() - 7.0) < 0.05 and abs(magnitude.std() - 1.0) < 0.05
    signed = np.array([OPS_V1[i].signed for i in ops]) & with_level
    assert abs((levels[signed] < 0).mean() - 0.5) < 0.03
    assert (levels[~signed] >= 0).all() and (levels[~with_level] == 0).all()
    # clipping at mmax (default 10) and at 0
    high = draws(AugmentSpec(augment="rand-m10-n2-mstd2-p1"), 300).levels
    assert np.abs(high).max() == 100 and (np.abs(high) == 100).mean() > 0.3
    uniform = draws(AugmentSpec(augment="rand-m8-n2-mstd101-p1"), 400)
    mags = np.abs(uniform.levels[uniform.ops > 3]) / LEVEL_SCALE
    assert abs(mags.mean() - 4.0) < 0.2 and mags.max() <= 8.0


def test_erasing_draws_follow_timm():
    spec = AugmentSpec(erase=0.3, erase_count=2)
    boxes = draws(spec, 1500).erase_boxes.reshape(-1, 2, 4).astype(np.int64)
    present = (boxes[..., 2] > 0) & (boxes[..., 3] > 0)
    assert abs(present[:, 0].mean() - 0.3) < 0.02
    assert abs(present[:, 1].mean() / present[:, 0].mean() - 0.5) < 0.05  # count 1 or 2
    assert ((boxes[..., 0] + boxes[..., 2]) <= 255).all()
    assert ((boxes[..., 1] + boxes[..., 3]) <= 255).all()
    single = present[:, 0] & ~present[:, 1]
    area = boxes[single, 0, 2] * boxes[single, 0, 3] / 255 ** 2
    assert area.min() > 0.015 and area.max() < 0.36 and abs(area.mean() - 0.176) < 0.01


def test_mixing_draws_follow_timm():
    spec = AugmentSpec(mixup=0.8, cutmix=1.0, mix_prob=0.7, switch_prob=0.4)
    records = draws(spec, 1500)
    mixed = records.mixed
    assert abs(mixed.mean() - 0.7) < 0.02
    boxes = records.mix_boxes[mixed].astype(np.int64)
    cut = (boxes[:, 2] > 0) & (boxes[:, 3] > 0)
    assert abs(cut.mean() - 0.4) < 0.02
    lam = records.mix_lambdas[mixed] / 255
    assert abs(lam[~cut].mean() - 0.5) < 0.02  # Beta(α, α) is symmetric
    assert abs(lam[~cut].var() - 1 / (4 * (2 * 0.8 + 1))) < 0.01
    area = boxes[cut, 2] * boxes[cut, 3] / 255 ** 2
    np.testing.assert_allclose(lam[cut], 1 - area, atol=0.5 / 255)  # correct_lam
    assert ((boxes[:, 0] + boxes[:, 2]) <= 255).all() and ((boxes[:, 1] + boxes[:, 3]) <= 255).all()
    assert (records.mix_views[mixed] < 5).all() and len(np.unique(records.mix_views[mixed])) == 5
    assert (records.mix_partners[~mixed] == -1).all()
    only_cut = draws(AugmentSpec(cutmix=1.0), 100)
    assert (only_cut.mix_boxes[..., 2] > 0).all()


def test_partner_is_one_other_row_of_the_chunk():
    for rows, chunk_rows in ((50, 16), (49, 16)):
        for row in range(rows):
            records = plan(FULL, f"p/{row}", row=row, rows=rows, chunk_rows=chunk_rows)
            partners = set(records.mix_partners[records.mixed].tolist())
            assert len(partners) == 1  # one partner per row: one extra decode
            partner = partners.pop()
            assert partner != row
            if rows == 49 and row == 48:  # a last chunk of one row reaches the row before
                assert partner == 47
            else:
                assert partner // chunk_rows == row // chunk_rows
    assert partner_window(49, 50, 16) == (48, 50)
    assert partner_window(48, 49, 16) == (47, 49)
    mixed = records.mixed
    assert partner_views(records) == {int(records.mix_partners[mixed][0]):
                                      sorted(set(records.mix_views[mixed].tolist()))}


@settings(max_examples=300, deadline=None)
@given(rows=st.integers(2, 200), chunk_rows=st.integers(2, 64), seed=st.integers(0, 2**31),
       data=st.data())
def test_partner_draw_properties(rows, chunk_rows, seed, data):
    row = data.draw(st.integers(0, rows - 1))
    partner = draw_partner(np.random.default_rng(seed), row, rows, chunk_rows)
    lo, hi = partner_window(row, rows, chunk_rows)
    assert partner != row and lo <= partner < hi and lo <= row < hi
    assert hi - lo >= 2 and (hi - lo == 2 or lo == row // chunk_rows * chunk_rows)


@settings(max_examples=200, deadline=None)
@given(key=st.text(st.characters(min_codepoint=33, max_codepoint=0x2FFF), min_size=1,
                   max_size=30),
       seed=st.integers(0, 2**32), inc=st.booleans(), mstd=st.sampled_from([0, 0.5, 3, 101]))
def test_record_invariants(key, seed, inc, mstd):
    spec = AugmentSpec(augment=f"rand-m9-n3-mstd{mstd}-mmax12-inc{int(inc)}", erase=0.5,
                       erase_count=3, mixup=0.2, cutmix=1.0, mix_prob=0.5)
    records = plan(spec, key, seed=seed, views=3)
    allowed = {0} | set(spec.policy.op_ids)
    assert set(records.ops.ravel().tolist()) <= allowed
    assert np.abs(records.levels.astype(int)).max() <= 120
    for op, level in zip(records.ops.ravel(), records.levels.ravel()):
        assert level >= 0 or OPS_V1[op].signed
        assert level == 0 or OPS_V1[op].arg is not None
    boxes = records.erase_boxes.astype(int)
    assert ((boxes[..., 0] + boxes[..., 2]) <= 255).all()
    assert ((boxes[..., 2] == 0) == (boxes[..., 3] == 0)).all()


# -- the store ---------------------------------------------------------------------------------

def write_store(path, spec: AugmentSpec | None, rows: int = 37, views: int = 3,
                chunk_rows: int = 16) -> tuple[ViewRecords, dict]:
    rng = np.random.default_rng(0)
    keys = [f"c/{i}.png" for i in range(rows)]
    indices = np.stack([rng.permutation(10)[:2] for _ in range(rows * views)])
    indices = indices.reshape(rows, views, 2)
    probs = np.full((rows, views, 2), 0.25)
    dims = spec.dims() if spec is not None else None
    records = ViewRecords.stack([plan_records(spec, seed=0, key=key, row=row, rows=rows,
                                              chunk_rows=chunk_rows, views=views)
                                 for row, key in enumerate(keys)]) if spec else None
    with labelstore.create(path, keys=keys, num_classes=10, topk=2, views=views,
                           chunk_rows=chunk_rows, augment_dims=dims,
                           attrs={"augment": spec.attrs()} if spec else None) as writer:
        extra = records.store_arrays(dims) if spec else {}
        writer.write(0, indices[:20], probs[:20], **{k: v[:20] for k, v in extra.items()})
        writer.write(20, indices[20:], probs[20:], **{k: v[20:] for k, v in extra.items()})
    return records, dims


def test_records_round_trip_through_a_store(tmp_path):
    path = tmp_path / "aug.zarr"
    records, dims = write_store(path, FULL)
    group = zarr.open_group(str(path), mode="r")
    expected = {"aug_ops": ((37, 3, 2), np.uint8, 0), "aug_levels": ((37, 3, 2), np.int8, 0),
                "erase_boxes": ((37, 3, 1, 4), np.uint8, 0),
                "mix_partners": ((37, 3), np.int32, -1), "mix_views": ((37, 3), np.uint8, 0),
                "mix_lambdas": ((37, 3), np.uint8, 255), "mix_boxes": ((37, 3, 4), np.uint8, 0)}
    for name, (shape, dtype, fill) in expected.items():
        array = group[name]
        assert array.shape == shape and array.dtype == dtype and array.fill_value == fill
        assert array.chunks == (16,) + shape[1:]
        assert tuple(array.metadata.dimension_names) == fmt.array_spec(name).dims
        assert "Crc32cCodec" in str(array.metadata.codecs)
    stored = {name: np.asarray(group[name][:]) for name in expected}
    assert_same(ViewRecords.from_store(stored, dims, (37, 3)), records)
    store = labelstore.open(path)
    assert store.augment_dims == {"op": 2, "erase": 1, "mix": 1}
    assert AugmentSpec.from_attrs(store.attrs["augment"], str(path)) == FULL


def test_only_the_configured_records_are_stored(tmp_path):
    write_store(tmp_path / "crop.zarr", None)
    write_store(tmp_path / "ra.zarr", AugmentSpec(augment="rand-n3"))
    crop = zarr.open_group(str(tmp_path / "crop.zarr"), mode="r")
    ra = zarr.open_group(str(tmp_path / "ra.zarr"), mode="r")
    names = {"aug_ops", "aug_levels", "erase_boxes", "mix_partners", "mix_views", "mix_lambdas",
             "mix_boxes"}
    assert not names & set(crop.array_keys())
    assert names & set(ra.array_keys()) == {"aug_ops", "aug_levels"}
    assert ra["aug_ops"].shape == (37, 3, 3)
    assert labelstore.open(tmp_path / "crop.zarr").augment_dims is None
    assert "augment_dims" not in labelstore.open(tmp_path / "crop.zarr").attrs


def test_writes_must_match_the_store_records(tmp_path):
    indices, probs = np.array([[[0, 1]], [[1, 2]]]), np.full((2, 1, 2), 0.25)
    with labelstore.create(tmp_path / "a.zarr", keys=["x", "y"], num_classes=3, topk=2,
                           augment_dims={"op": 2}) as writer:
        with pytest.raises(ValueError, match=r"this store has aug_ops: pass aug_ops=\(n, V, L\)"):
            writer.write(0, indices, probs, aug_levels=np.zeros((2, 1, 2)))
        with pytest.raises(ValueError, match="this store was created without mix_partners"):
            writer.write(0, indices, probs, aug_ops=np.zeros((2, 1, 2), np.uint8),
                         aug_levels=np.zeros((2, 1, 2), np.int8),
                         mix_partners=np.zeros((2, 1), np.int32))
        writer.write(0, indices, probs, aug_ops=np.zeros((2, 1, 2), np.uint8),
                     aug_levels=np.zeros((2, 1, 2), np.int8))
    with pytest.raises(ValueError, match="augment_dims: unknown dimension 'ops'"):
        labelstore.create(tmp_path / "b.zarr", keys=["x"], num_classes=3, topk=2,
                          augment_dims={"ops": 2})
    with pytest.raises(ValueError, match="mix 0 or 1"):
        labelstore.create(tmp_path / "b.zarr", keys=["x"], num_classes=3, topk=2,
                          augment_dims={"mix": 2})


def test_a_store_missing_a_record_array_is_damaged(tmp_path):
    import shutil
    path = tmp_path / "aug.zarr"
    write_store(path, FULL)
    shutil.rmtree(path / "mix_boxes")
    with pytest.raises(labelstore.DamagedStoreError, match="array 'mix_boxes' is missing"):
        labelstore.open(path)


def test_export_writes_the_records_as_stored(tmp_path):
    import h5py

    from labelstore._export import export_hdf5

    path = tmp_path / "aug.zarr"
    write_store(path, FULL)
    export_hdf5(labelstore.open(path), str(tmp_path / "aug.h5"), slice(5, 30))
    group = zarr.open_group(str(path), mode="r")
    with h5py.File(tmp_path / "aug.h5", "r") as h5:
        for name in ("aug_ops", "aug_levels", "erase_boxes", "mix_partners", "mix_views",
                     "mix_lambdas", "mix_boxes"):
            assert h5[name].dtype == group[name].dtype
            np.testing.assert_array_equal(h5[name][:], group[name][5:30])


def test_fill_is_timm_img_mean():
    from teacher_infer.imaging.augment import fill_from_mean

    assert fill_from_mean((0.485, 0.456, 0.406)) == (124, 116, 104)  # ImageNet, timm's img_mean
    assert fill_from_mean((0.5, 0.5, 0.5)) == (128, 128, 128)
    assert AugmentSpec().fill == fill_from_mean((0.485, 0.456, 0.406))


def test_check_records_reports_what_cannot_be_replayed():
    from teacher_infer.imaging.augment import check_records

    rows = np.arange(10, 16)
    records = ViewRecords.stack([plan(FULL, f"r/{row}", row=int(row), rows=40, chunk_rows=16)
                                 for row in rows])
    assert check_records(records, rows=rows, store_rows=40, ops=OPS_V1) is None
    damages = [
        ("ops", (2, 1, 0), 200, r"^row 12 view 1: op id 200 is not in the store's ops table"),
        ("ops", (3, 2, 1), NAMES.index("Equalize"), r"^row 13 view 2: levels .* do not fit"),
        ("erase_boxes", (1, 3, 0, 0), 250, r"^row 11 view 3: erasing box is not inside"),
        ("mix_boxes", (0, 2, 2), 0, r"^row 10 view 2: CutMix box is not inside"),
        ("mix_partners", (4, 1), 14, r"^row 14 view 1: mixing partner 14 \(store of 40"),
        ("mix_partners", (4, 1), 40, r"^row 14 view 1: mixing partner 40 "),
        ("mix_views", (5, 3), 4, r"^row 15 view 3: partner view 4 of 4"),
    ]
    for name, where, value, message in damages:
        damaged = records.map(np.copy)
        if name == "ops":  # a level on an op that takes none, or an unknown id
            damaged.levels[where[:2]] = 50
        if name == "mix_boxes":
            damaged.mix_boxes[where[:2]] = (10, 10, 20, 30)
        if name == "erase_boxes":
            damaged.erase_boxes[where[:3]] = (0, 0, 10, 10)
        getattr(damaged, name)[where] = value
        assert re.match(message, check_records(damaged, rows=rows, store_rows=40, ops=OPS_V1))
