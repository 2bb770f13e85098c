"""Replayed augmentation end to end: infer-teacher with RandAugment, erasing, MixUp and CutMix
on the PIL and the DALI (CPU) paths, then the teacher on the views training replays (ViewReplay,
the PIL workers, the DALI "bytes" path) reproduces the stored top-k; records survive
select-topk and merge (partners resolved) into training; --views-from labels the identical
augmented views for ensemble; verify recomputes them and catches a tampered record; a killed
run resumes to the same store; bad input is one line, exit 2, nothing written."""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import labelstore
import teacher_infer
from cli import main as cli_main
from conftest import TINY_INPUT, TINY_MODEL, make_image
from student_train import TrainConfig, train
from student_train.data import build_data
from student_train.distributed import setup
from student_train.sampling import replay_view
from teacher_infer import InferConfig, run
from teacher_infer.imaging import pixels_to_input
from teacher_infer.imaging.augment import ViewRecords, ViewReplay

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TOPK, VIEWS = 5, 3
AUGMENT = dict(augment="rand-m9-n2-mstd0.5", erase=0.5, mixup=0.8, cutmix=1.0, mix_prob=0.8)
SIZES = [(72, 56), (56, 72), (80, 64), (64, 64), (90, 50), (50, 90)]  # (width, height)


def infer(data, out, checkpoint, **options):
    settings = dict(model=TINY_MODEL, data=data and str(data), out=str(out),
                    checkpoint=str(checkpoint), input_size=TINY_INPUT, topk=TOPK, views=VIEWS,
                    num_workers=0, progress=False, batch_size=8, threads=1, chunk_rows=6,
                    store_logits=True, **AUGMENT)
    settings.update(options)
    return run(InferConfig(**settings))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """17 JPEGs in two class folders and one GIF (a format DALI cannot read: PIL renders it
    in the worker, the records still applied on the device)."""
    root = tmp_path_factory.mktemp("aug_images")
    for i in range(17):
        make_image(root / f"c{i % 2}" / f"img{i:02d}.jpg", size=SIZES[i % len(SIZES)],
                   seed=300 + i)
    make_image(root / "c1" / "img17.gif", size=(60, 70), mode="P", seed=399)
    return root


@pytest.fixture(scope="module")
def stores(images, make_checkpoint, tmp_path_factory):
    base = tmp_path_factory.mktemp("aug_stores")
    checkpoint = make_checkpoint()
    infer(images, base / "pil.zarr", checkpoint, decoder="pil")
    infer(images, base / "dali.zarr", checkpoint, decoder="dali")
    return {"base": base, "checkpoint": checkpoint, "pil": str(base / "pil.zarr"),
            "dali": str(base / "dali.zarr"), "root": str(images)}


def teacher(checkpoint):
    from teacher_infer.model import load_teacher

    config = InferConfig(model=TINY_MODEL, data="-", out="-", checkpoint=str(checkpoint),
                         input_size=TINY_INPUT)
    return load_teacher(config, torch.device("cpu"))


def top_k_of(model, pixels: torch.Tensor, normalised: bool = False):
    """The teacher's top-k (indices, probs, logits) of uint8 views (n, 3, H, W) (or of
    normalised model input)."""
    config = model.data_config
    x = pixels if normalised else pixels_to_input(pixels, torch.tensor(config["mean"]),
                                                  torch.tensor(config["std"]))
    with torch.no_grad():
        logits = model.model(x).float()
    probs, indices = torch.softmax(logits, -1).topk(TOPK, -1)
    return indices.numpy(), probs.numpy(), logits.numpy()


def assert_reproduces(stored, row, view, indices, probs):
    np.testing.assert_array_equal(indices, stored.indices[row, view], err_msg=f"{row} {view}")
    np.testing.assert_allclose(probs, stored.probs[row, view], atol=1e-3, rtol=0)


def records_of(path) -> ViewRecords:
    store = labelstore.open(path)
    return ViewRecords.from_store(store.read_rows(slice(None)), store.augment_dims,
                                  (len(store), store.num_views))


# -- the teacher pass and its replay ------------------------------------------------------------

def test_the_teacher_on_replayed_views_reproduces_the_stored_top_k(stores):
    store = labelstore.open(stores["pil"]).load()
    stored = store.read(slice(None))
    records = records_of(stores["pil"])
    # every kind of record occurs (the test exercises ops, erasing, MixUp and CutMix)
    cut = records.mix_boxes[..., 2] > 0
    assert (records.ops > 0).any() and (records.erase_boxes[..., 2] > 0).any()
    assert (records.mixed & cut).any() and (records.mixed & ~cut).any()
    assert not records.mixed[:, 0].any() and not records.ops[:, 0].any()
    assert stored.valid.all() and store.attrs["augment"]["augment"] == AUGMENT["augment"]

    model, replay = teacher(stores["checkpoint"]), ViewReplay(store)
    pixels = torch.stack([replay(row, view) for row in range(len(store))
                          for view in range(VIEWS)])
    indices, probs, logits = top_k_of(model, pixels)
    for i, (row, view) in enumerate(np.ndindex(len(store), VIEWS)):
        assert_reproduces(stored, row, view, indices[i], probs[i])
    # stored logits: the top-k of the same forward, and the log-partition over all classes
    kept = store.read_rows(slice(None))
    np.testing.assert_allclose(kept["logits"].reshape(-1, TOPK),
                               np.take_along_axis(logits, indices, 1), atol=1e-4)
    np.testing.assert_allclose(kept["log_partition"].ravel(),
                               torch.logsumexp(torch.from_numpy(logits), -1).numpy(), atol=1e-4)

    # the records matter: the same crops without them are labeled differently
    plain = ViewReplay(store)
    plain.augment = None
    bare = torch.stack([plain(row, view) for row in range(len(store)) for view in range(VIEWS)])
    changed = (pixels != bare).flatten(1).any(1).numpy().reshape(len(store), VIEWS)
    touched = (records.ops > 0).any(-1) | (records.erase_boxes[..., 2] > 0).any(-1) \
        | records.mixed
    np.testing.assert_array_equal(changed, touched)


def test_a_cutmix_view_holds_its_partners_view_inside_the_box(stores):
    """The assembly, against the pieces: outside the cut box the row's own view (its ops and
    erasing), inside it the partner's view (its ops and erasing, not its mixing)."""
    store = labelstore.open(stores["pil"]).load()
    records = records_of(stores["pil"])
    replay = ViewReplay(store)
    row, view = (int(v) for v in np.argwhere(records.mixed & (records.mix_boxes[..., 2] > 0))[0])
    mixed = replay(row, view)
    own_only = ViewReplay(store)
    unmixed = records.map(lambda a: a[row]).unmixed(np.ones(VIEWS, bool))
    own_only.records = lambda r, v: unmixed.map(lambda a: a[[v]])
    partner_row, partner_view = int(records.mix_partners[row, view]), \
        int(records.mix_views[row, view])
    lent = records.map(lambda a: a[partner_row]).unmixed(np.ones(VIEWS, bool))
    partner_only = ViewReplay(store)
    partner_only.records = lambda r, v: lent.map(lambda a: a[[v]])
    own, theirs = own_only(row, view), partner_only(partner_row, partner_view)
    y0, x0, h, w = (int(v) for v in records.mix_boxes[row, view])
    size = TINY_INPUT
    top, bottom = int(y0 * size / 255 + 0.5), int((y0 + h) * size / 255 + 0.5)
    left, right = int(x0 * size / 255 + 0.5), int((x0 + w) * size / 255 + 0.5)
    inside = torch.zeros(size, size, dtype=torch.bool)
    inside[top:bottom, left:right] = True
    assert inside.any() and (~inside).any()
    assert torch.equal(mixed[:, inside], theirs[:, inside])
    assert torch.equal(mixed[:, ~inside], own[:, ~inside])


def test_pil_and_dali_draw_the_same_records_and_agree(stores):
    pil, dali = records_of(stores["pil"]), records_of(stores["dali"])
    for field in dataclasses.fields(ViewRecords):
        np.testing.assert_array_equal(getattr(pil, field.name), getattr(dali, field.name))
    a = labelstore.open(stores["pil"]).read(slice(None))
    b = labelstore.open(stores["dali"]).read(slice(None))
    assert (a.indices[..., 0] == b.indices[..., 0]).mean() >= 0.9
    assert b.valid.all()


@pytest.mark.parametrize("decoder", ["pil", "dali"])
def test_training_replays_the_labeled_views(stores, decoder, tmp_path):
    """train-student's own batches (PIL workers, or DALI's "bytes" path with the records
    applied on the device after decoding) are the views the teacher labeled: the teacher
    on them reproduces the stored top-k of each sample's view."""
    path = stores[decoder]
    store = labelstore.open(path)
    cfg = TrainConfig(student=TINY_MODEL, out=str(tmp_path / "run"), stores=(path,),
                      input_size=TINY_INPUT, batch_size=len(store), num_workers=0,
                      device="cpu", threads=1, decoder=decoder, seed=5)
    from student_train.models import data_config_for

    data_config = data_config_for(TINY_MODEL, TINY_INPUT)
    data = build_data(cfg, setup("cpu"), data_config, log=logging.getLogger("test"))
    model = teacher(stores["checkpoint"])
    stored = store.read(slice(None))
    for epoch in (0, 1):
        data.set_epoch(epoch)
        images, targets, _ = next(iter(data.train))
        indices, probs, _ = top_k_of(model, images, normalised=True)
        for position, index in enumerate(data.sampler.indices()[:len(images)]):
            view = replay_view(5, epoch, int(index), VIEWS)
            assert_reproduces(stored, int(index), view, indices[position], probs[position])


def test_autoaugment_on_a_record_store_is_refused_in_one_line(stores, tmp_path, capsys):
    code = cli_main(["train-student", "--student", "test_resnet", "--store", stores["pil"],
                     "--out", str(tmp_path / "run"), "--autoaugment", "rand-m9-mstd0.5",
                     "--device", "cpu", "--threads", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--autoaugment" in err
    assert "break that consistency" in err and not (tmp_path / "run").exists()


# -- through the store commands -----------------------------------------------------------------

def test_records_survive_select_and_merge_into_training(stores, tmp_path):
    """Every view of the merged store replays to the same pixels as the same key's view in
    the store the teacher wrote, partners resolved through rows and the partner table."""
    source = labelstore.open(stores["pil"]).load()
    for half in (0, 1):  # each selection leaves out the other half's rows
        excluded = tmp_path / f"exclude{half}.txt"
        excluded.write_text("".join(f"{key}\n" for row, key in enumerate(source.keys)
                                    if row % 2 == half))
        labelstore.select_topk(stores["pil"], 1, tmp_path / f"sel{half}.zarr",
                               exclude=str(excluded))
    selected = [labelstore.open(tmp_path / f"sel{half}.zarr") for half in (0, 1)]
    assert all(store.partner_count > 0 for store in selected)  # unselected partners
    labelstore.merge([tmp_path / "sel1.zarr", tmp_path / "sel0.zarr"], tmp_path / "merged.zarr")
    merged = labelstore.open(tmp_path / "merged.zarr").load()
    assert len(merged) == len(source) and merged.partner_count > 0
    keys = {str(key): row for row, key in enumerate(source.keys)}
    replay, original = ViewReplay(merged), ViewReplay(source)
    for row, key in enumerate(merged.keys):
        for view in range(VIEWS):
            assert torch.equal(replay(row, view), original(keys[str(key)], view)), (key, view)
    result = train(TrainConfig(student="test_resnet", out=str(tmp_path / "run"),
                               stores=(str(tmp_path / "merged.zarr"),), epochs=1,
                               batch_size=len(merged) // 2, input_size=32, num_workers=0,
                               device="cpu", threads=1))
    assert np.isfinite(result.last["train_loss"])


def test_views_from_labels_the_same_augmented_views_for_an_ensemble(stores, make_checkpoint,
                                                                     tmp_path):
    second = make_checkpoint(seed=1)
    out = tmp_path / "second.zarr"
    infer(None, out, second, views_from=stores["pil"], **{name: None for name in (
        "augment", "mixup", "cutmix")}, erase=0.0, mix_prob=1.0, views=1, chunk_rows=None)
    reference, labeled = labelstore.open(stores["pil"]).load(), labelstore.open(out).load()
    assert labeled.attrs["augment"] == reference.attrs["augment"]
    for field in dataclasses.fields(ViewRecords):
        np.testing.assert_array_equal(getattr(records_of(out), field.name),
                                      getattr(records_of(stores["pil"]), field.name))
    model, replay = teacher(second), ViewReplay(reference)
    stored = labeled.read(slice(None))
    pixels = torch.stack([replay(row, view) for row in range(len(reference))
                          for view in range(VIEWS)])
    indices, probs, _ = top_k_of(model, pixels)
    for i, (row, view) in enumerate(np.ndindex(len(reference), VIEWS)):
        assert_reproduces(stored, row, view, indices[i], probs[i])
    assert (stored.indices[..., 0] != reference.read(slice(None)).indices[..., 0]).any()
    labelstore.ensemble([stores["pil"], str(out)], tmp_path / "ens.zarr")
    ensemble = labelstore.open(tmp_path / "ens.zarr")
    assert ensemble.attrs["augment"] == reference.attrs["augment"]
    assert teacher_infer.verify(str(out), sample=6, threads=1).ok


def test_verify_recomputes_the_augmented_views_and_catches_a_tampered_record(stores, tmp_path):
    assert teacher_infer.verify(stores["pil"], sample=18, threads=1).ok
    records = records_of(stores["pil"])
    # an op with a level (its strength): much weaker, or much stronger
    row, view, slot = (int(v) for v in np.argwhere(records.levels != 0)[0])
    tampered = tmp_path / "tampered.zarr"
    shutil.copytree(stores["pil"], tampered)
    group = zarr.open_group(str(tampered), mode="r+")
    levels = group["aug_levels"][:]
    levels[row, view, slot] = 10 if abs(int(levels[row, view, slot])) > 50 else 120
    group["aug_levels"][:] = levels
    result = teacher_infer.verify(str(tampered), sample=18, threads=1)
    assert not result.ok and f"row {row} " in str(result)
    ops = group["aug_ops"][:]
    ops[row, view, slot] = 200
    group["aug_ops"][:] = ops
    result = teacher_infer.verify(str(tampered), sample=2, threads=1)
    assert not result.ok
    assert any(f"row {row} view {view}: op id 200" in p for p in result.problems), result


def test_a_killed_run_resumes_to_the_same_store(stores, images, tmp_path):
    """Records are drawn from (seed, key, view) and partners inside the chunk: a chunk
    computed again gives the same records and labels."""
    out = tmp_path / "resumed.zarr"
    shutil.copytree(stores["pil"], out)
    group = zarr.open_group(str(out), mode="r+")
    group["done"][1] = False
    for name in ("probs", "aug_ops", "mix_partners", "logits"):
        array = group[name]
        array[6:12] = np.zeros_like(array[6:12])
    summary = infer(images, out, stores["checkpoint"], decoder="pil")
    assert summary.images == 6 and summary.skipped == 12
    a, b = zarr.open_group(stores["pil"], mode="r"), zarr.open_group(str(out), mode="r")
    for name in ("indices", "probs", "boxes", "aug_ops", "aug_levels", "erase_boxes",
                 "mix_partners", "mix_views", "mix_lambdas", "mix_boxes", "logits"):
        np.testing.assert_array_equal(a[name][:], b[name][:], err_msg=name)


# -- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("extra,message", [
    (["--augment", "auto-m9"], "--augment 'auto-m9': only RandAugment policies"),
    (["--augment", "rand-m9-x3"], "unknown token 'x3'"),
    (["--mixup", "0"], "--mixup 0.0: the Beta"),
    (["--cutmix", "-1"], "--cutmix -1.0"),
    (["--erase", "1.5"], "--erase 1.5: a probability must be in [0, 1]"),
    (["--mix-prob", "-0.1", "--mixup", "1"], "--mix-prob -0.1"),
    (["--augment", "rand", "--views", "1"], "--views 1 has none to change"),
])
def test_bad_augmentation_options_are_one_line_and_write_nothing(images, tmp_path, capsys,
                                                                 extra, message):
    out = tmp_path / "bad.zarr"
    code = cli_main(["infer-teacher", "--model", TINY_MODEL, "--random-weights", "--data",
                     str(images), "--out", str(out), "--views", "3", "--threads", "1", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not out.exists() and not Path(f"{out}.lock").exists()


def test_mixing_a_store_of_one_row_is_refused(images, tmp_path, capsys):
    listing = tmp_path / "one.txt"
    listing.write_text("c0/img00.jpg\n")
    out = tmp_path / "one.zarr"
    code = cli_main(["infer-teacher", "--model", TINY_MODEL, "--random-weights", "--data",
                     str(listing), "--root", str(images), "--out", str(out), "--views", "2",
                     "--mixup", "0.2", "--threads", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "a store of 1 row has no other row to mix with" in err
    assert len(err.splitlines()) == 1 and not out.exists()


def test_views_from_with_augmentation_options_is_refused(stores, tmp_path, capsys):
    code = cli_main(["infer-teacher", "--model", TINY_MODEL, "--random-weights",
                     "--views-from", stores["pil"], "--out", str(tmp_path / "x.zarr"),
                     "--augment", "rand-m9"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--views-from replays the reference store's views" in err


def test_a_store_whose_ops_table_is_unknown_is_refused_everywhere(stores, tmp_path, capsys):
    path = tmp_path / "future.zarr"
    shutil.copytree(stores["pil"], path)
    group = zarr.open_group(str(path), mode="r+")
    augment = dict(group.attrs["augment"])
    augment["ops_table"] = {**augment["ops_table"], "version": 99}
    group.attrs["augment"] = augment
    commands = [
        ["train-student", "--student", "test_resnet", "--store", str(path), "--out",
         str(tmp_path / "run"), "--device", "cpu", "--threads", "1"],
        ["infer-teacher", "--model", TINY_MODEL, "--random-weights", "--views-from", str(path),
         "--out", str(tmp_path / "again.zarr"), "--threads", "1"],
    ]
    for command in commands:
        code = cli_main(command)
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        assert "ops table version 99; this ssld replays versions 1" in err, err
    assert not (tmp_path / "run").exists() and not (tmp_path / "again.zarr").exists()
    result = teacher_infer.verify(str(path), sample=2, threads=1)
    assert not result.ok and "ops table version 99" in str(result)


def test_stored_logits_give_the_targets_and_retemper_without_fp16_rounding(stores, tmp_path):
    """With stored logits a target's top-k are exp(logits / T - log_partition) in float32:
    re-tempered by --loss kl --temperature (softmax(log p / T)), the top-k log-ratios are the
    logit differences / T; from the float16 probabilities they are off by their rounding."""
    from student_train.losses import _masked_log  # the loss's own log of the targets
    from student_train.models import data_config_for

    path = stores["pil"]
    cfg = TrainConfig(student=TINY_MODEL, out=str(tmp_path / "run"), stores=(path,),
                      input_size=TINY_INPUT, batch_size=18, num_workers=0, device="cpu",
                      threads=1, loss="kl", temperature=4.0, seed=5)
    data = build_data(cfg, setup("cpu"), data_config_for(TINY_MODEL, TINY_INPUT),
                      log=logging.getLogger("test"))
    data.set_epoch(0)
    _, targets, _ = next(iter(data.train))
    targets = targets.dense()  # the batches carry them sparse
    store = labelstore.open(path).load()
    stored, kept = store.read(slice(None)), store.read_rows(slice(None))
    logit_error = probs_error = 0.0
    for position, index in enumerate(data.sampler.indices()[:len(targets)]):
        row, view = int(index), replay_view(5, 0, int(index), VIEWS)
        indices = stored.indices[row, view]
        expected = labelstore.densify_logits(indices[None], kept["logits"][row, view][None],
                                             kept["log_partition"][row, view][None], 1000)[0]
        np.testing.assert_allclose(targets[position].numpy(), expected, rtol=1e-6)
        assert abs(float(targets[position].sum()) - 1) < 1e-5  # over all C classes
        tempered = torch.log_softmax(_masked_log(targets[position].double()) / 4.0, -1)
        ratios = (tempered[indices[1:]] - tempered[indices[0]]).numpy()
        exact = (kept["logits"][row, view, 1:].astype(np.float64)
                 - kept["logits"][row, view, 0]) / 4.0
        logit_error = max(logit_error, np.abs(ratios - exact).max())
        rounded = np.log(stored.probs[row, view].astype(np.float64)) / 4.0
        probs_error = max(probs_error, np.abs(rounded[1:] - rounded[0] - exact).max())
    assert logit_error < 1e-6 and probs_error > 100 * logit_error, (logit_error, probs_error)


def test_structure_verify_checks_the_stored_logits_against_the_probabilities(stores, tmp_path):
    assert labelstore.verify(stores["pil"]).ok
    tampered = tmp_path / "logits.zarr"
    shutil.copytree(stores["pil"], tampered)
    group = zarr.open_group(str(tampered), mode="r+")
    logits = group["logits"][:]
    logits[4, 1, 0] -= 0.5  # the top class 0.5 lower: its probability off by ~40 %
    group["logits"][:] = logits
    result = labelstore.verify(str(tampered))
    assert not result.ok
    assert any(p.startswith("stored logits do not give the stored probabilities: 1, first row "
                            "4 view 1") for p in result.problems), result.problems


@pytest.mark.parametrize("decoder", ["pil", "dali"])
def test_a_partner_that_cannot_be_decoded(images, make_checkpoint, tmp_path, decoder):
    """First pass (drawn records): the views that needed a broken partner are stored unmixed
    and the row stays valid, the same on both decoders. Replay (--views-from, the records
    fixed): a row whose partner is gone fails, its reason naming the partner."""
    root = tmp_path / "images"
    shutil.copytree(images, root)
    keys = sorted(str(p.relative_to(root)) for p in root.rglob("*.jpg"))
    broken = keys[3]
    data = (root / broken).read_bytes()
    (root / broken).write_bytes(data[:len(data) // 3])  # truncated JPEG
    checkpoint = make_checkpoint()
    out = tmp_path / f"first-{decoder}.zarr"
    infer(root, out, checkpoint, decoder=decoder, mix_prob=1.0)
    store = labelstore.open(out)
    records, valid = records_of(out), store.valid
    row = list(store.keys).index(broken)
    assert not valid[row] and valid.sum() == len(store) - 1
    assert not (records.mix_partners == row).any()
    # without the failure these rows would have mixed with it: the draws say so
    from teacher_infer.imaging.augment import AugmentSpec, plan_records

    spec = AugmentSpec(**{**AUGMENT, "mix_prob": 1.0})
    drawn = [plan_records(spec, seed=0, key=str(store.keys[r]), row=r, rows=len(store),
                          chunk_rows=6, views=VIEWS) for r in range(len(store))]
    lost = [r for r, rec in enumerate(drawn) if (rec.mix_partners == row).any()]
    assert lost and all(valid[r] for r in lost)
    for r in lost:
        gone = drawn[r].mix_partners == row
        assert (records.mix_partners[r][gone] == -1).all()
        kept = ~gone
        np.testing.assert_array_equal(records.mix_partners[r][kept], drawn[r].mix_partners[kept])
    if decoder == "dali":
        return
    # replay: another row's partner disappears after the first pass
    partner = int(records.mix_partners[valid[:, None] & (records.mix_partners >= 0)][0])
    mixing = [r for r in range(len(store)) if valid[r] and (records.mix_partners[r] == partner)
              .any()]
    (root / str(store.keys[partner])).unlink()
    again = tmp_path / "again.zarr"
    infer(None, again, checkpoint, views_from=str(out), augment=None, erase=0.0, mixup=None,
          cutmix=None, views=1, chunk_rows=None)
    replayed = labelstore.open(again)
    failed = (again / "failed.txt").read_text()
    for r in mixing:
        assert not replayed.valid[r]
        assert f"{store.keys[r]}\tmixing partner {store.keys[partner]}: missing file" in failed
    np.testing.assert_array_equal(replayed.read_rows(slice(None))["aug_ops"],
                                  store.read_rows(slice(None))["aug_ops"])


@pytest.mark.parametrize("decoder", ["pil", "dali"])
def test_training_skips_a_view_whose_mixing_partner_is_gone(images, make_checkpoint, tmp_path,
                                                            decoder):
    """A partner's image damaged after the teacher pass: the rows whose replayed view needs
    it are left out and listed in failed.txt like unreadable images (--bad-images skip), on
    both decoders; --bad-images stop ends with one line."""
    root = tmp_path / "images"
    shutil.copytree(images, root)
    out = tmp_path / "mixed.zarr"
    infer(root, out, make_checkpoint(), decoder="pil", mix_prob=1.0)
    store = labelstore.open(out)
    mixing = records_of(out).mix_partners
    gone = int(np.bincount(mixing[mixing >= 0]).argmax())   # the most used partner
    damaged = root / str(store.keys[gone])
    damaged.write_bytes(damaged.read_bytes()[:40])   # a truncated JPEG: no image
    cfg = dict(student=TINY_MODEL, stores=(str(out),), input_size=TINY_INPUT, batch_size=6,
               epochs=1, num_workers=0, device="cpu", threads=1, decoder=decoder, seed=5)
    run_dir = tmp_path / "run"
    train(TrainConfig(out=str(run_dir), **cfg))
    views = [replay_view(5, 0, row, VIEWS) for row in range(len(store))]
    needs = {row for row in range(len(store)) if mixing[row, views[row]] == gone}
    assert needs, "the test needs a row whose epoch-0 view mixes with the damaged image"
    listed = dict(line.split("\t", 1) for line in (run_dir / "failed.txt").read_text()
                  .splitlines())
    expected = {str(root / str(store.keys[row])) for row in needs | {gone}}
    assert set(listed) == expected, listed
    stopped = tmp_path / "stopped"
    with pytest.raises(ValueError, match="cannot decode|cannot replay"):
        train(TrainConfig(out=str(stopped), bad_images="stop", **cfg))
    assert not (stopped / "last.pt").exists()
