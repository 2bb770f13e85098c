"""The public replay API of ``student_train`` (docs/own-loop.md): ``StoreDataset``, ``collate``,
``SparseTargets``, ``ShardedSampler``, the losses on sparse targets, ``dali_batches``; and that
``train-student`` runs on exactly these pieces.

References are independent: dense rows built by hand in float64, ``labelstore.densify`` (the
store library's numpy reconstruction), ``ViewReplay`` (the teacher side's replay of a view).
"""
from __future__ import annotations

import doctest
import logging
import os
import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import labelstore
import student_train
from student_train import (DistillationLoss, ShardedSampler, SparseTargets, StoreDataset,
                           collate, dali_batches, js_divergence, kl_divergence,
                           soft_cross_entropy, symmetric_kl)
from student_train.data import build_data
from student_train.distributed import setup
from student_train.models import data_config_for
from teacher_infer.imaging import pixels_to_input
from teacher_infer.imaging.augment import ViewReplay
from train_data import make_images, make_store

CLASSES, SIZE = 6, 32
LOSS_FUNCTIONS = {"js": js_divergence, "skl": symmetric_kl, "kl": kl_divergence,
                  "soft-ce": soft_cross_entropy}


# -- sparse targets ------------------------------------------------------------------------

def _hand_dense(indices, probs, residual, classes) -> np.ndarray:
    """The format's reconstruction (docs/format.md), written out in float64 loops: every
    class residual / (C - k), the listed ones their probability (a class listed twice: the
    later entry, as an assignment), then the row renormalised."""
    out = np.zeros((len(indices), classes))
    for row, (ids, top, tail) in enumerate(zip(indices, probs, residual)):
        ids = [int(i) for i in ids if i >= 0]
        rest = classes - len(ids)
        values = np.full(classes, max(float(tail), 0.0) / rest if rest else 0.0)
        for i, p in zip(ids, top):
            values[i] = float(p)
        total = values.sum()
        out[row] = values / total if total > 0 else 1.0 / classes
    return out


def _topk_rows(rng, n: int, k: int, classes: int):
    """Store-like rows: Dirichlet top-k rounded to float16 (their sum is off by the
    rounding), then the edge cases: one-hot, residual 0, no mass at all (invalid row)."""
    dist = rng.dirichlet(np.full(classes, 0.4), n)
    indices = np.argsort(-dist, axis=1)[:, :k]
    probs = np.take_along_axis(dist, indices, 1).astype(np.float16).astype(np.float32)
    residual = (1 - dist[np.arange(n)[:, None], indices].sum(1)).astype(np.float32)
    probs[0], residual[0] = 0, 0                       # no mass: uniform
    probs[1] = 0
    probs[1, 0], residual[1] = 1, 0                    # one-hot
    residual[2] = 0                                    # residual 0, top-k renormalised
    return indices, probs, residual


@pytest.mark.parametrize("classes, k", [(10, 3), (10, 10), (1000, 5), (7, 1)])
def test_dense_is_labelstore_densify_bit_for_bit_and_the_format_s_reconstruction(classes, k):
    rng = np.random.default_rng(classes + k)
    indices, probs, residual = _topk_rows(rng, 12, k, classes)
    targets = SparseTargets.from_topk(indices, probs, residual, classes)
    expected = labelstore.densify(indices, probs, residual, classes)
    dense = targets.dense()
    assert dense.dtype == torch.float32 and dense.shape == targets.shape == (12, classes)
    assert np.array_equal(dense.numpy(), expected)                  # float32, every bit
    assert np.array_equal(targets.dense(torch.float64).numpy(),
                          labelstore.densify(indices, probs, residual, classes, np.float64))
    reference = _hand_dense(indices, probs, residual, classes)
    np.testing.assert_allclose(targets.dense(torch.float64).numpy(), reference, rtol=1e-12,
                               atol=1e-15)
    np.testing.assert_allclose(dense.numpy(), reference, rtol=2e-7, atol=0)
    np.testing.assert_allclose(reference[0], 1 / classes)           # no mass: uniform
    assert dense[1, indices[1, 0]] == 1 and dense[1].sum() == 1     # one-hot stays one-hot
    if k == classes:
        assert (targets.residual == 0).all()


def test_a_class_listed_twice_counts_once_as_in_a_dense_row():
    """Rows never written read as the fill (ids 0, probabilities 0, residual 1): a dense row
    gives the 9 other classes 1/9 each (docs/format.md's plain-zarr reader does the same)."""
    indices = np.array([[0, 0, 0], [4, 2, 4], [1, 2, 3]])
    probs = np.array([[0, 0, 0], [0.5, 0.2, 0.25], [0.5, 0.2, 0.1]], dtype=np.float32)
    residual = np.array([1, 0.05, 0.2], dtype=np.float32)
    targets = SparseTargets.from_topk(indices, probs, residual, 10)
    assert targets.indices.tolist() == [[-1, -1, 0], [-1, 2, 4], [1, 2, 3]]
    dense = targets.dense()
    assert np.array_equal(dense.numpy(), labelstore.densify(indices, probs, residual, 10))
    np.testing.assert_allclose(targets.dense(torch.float64).numpy(),
                               _hand_dense(indices, probs, residual, 10), rtol=1e-12)
    np.testing.assert_allclose(dense[0].numpy(), [0] + [1 / 9] * 9, rtol=1e-7)


def test_from_logits_is_densify_logits_bit_for_bit():
    rng = np.random.default_rng(3)
    classes, k, temperature = 50, 4, 2.0
    logits_all = rng.normal(0, 3, (9, classes))
    indices = np.argsort(-logits_all, axis=1)[:, :k]
    logits = np.take_along_axis(logits_all, indices, 1).astype(np.float32)
    log_z = np.log(np.exp(logits_all / temperature).sum(1)).astype(np.float32)
    targets = SparseTargets.from_logits(indices, logits, log_z, classes, temperature)
    assert np.array_equal(targets.dense().numpy(),
                          labelstore.densify_logits(indices, logits, log_z, classes, temperature))


def test_stacked_rows_of_different_k_and_row_selection():
    rng = np.random.default_rng(4)
    rows = []
    for k in (3, 5, 10, 3):
        indices, probs, residual = _topk_rows(rng, 4, k, 10)
        rows.append((indices[3], probs[3], residual[3]))
    singles = [SparseTargets.from_topk(i[None], p[None], r[None], 10) for i, p, r in rows]
    batch = SparseTargets.stack([SparseTargets(s.indices[0], s.probs[0], s.residual[0], 10)
                                 for s in singles])
    assert batch.indices.shape == (4, 10) and (batch.indices[0, 3:] == -1).all()
    for row, (i, p, r) in enumerate(rows):
        assert np.array_equal(batch.dense()[row].numpy(), labelstore.densify(
            i[None], p[None], r[None], 10)[0])
        assert torch.equal(batch[row:row + 1].dense()[0], batch.dense()[row])
    keep = torch.tensor([True, False, True, False])
    assert torch.equal(batch[keep].dense(), batch.dense()[keep])
    assert torch.equal(batch.argmax(), batch.dense().argmax(1))
    with pytest.raises(ValueError, match="class counts"):
        SparseTargets.stack([SparseTargets(torch.zeros(1, dtype=torch.int64),
                                           torch.ones(1, dtype=torch.float64),
                                           torch.zeros((), dtype=torch.float64), n)
                             for n in (3, 4)])


def test_the_module_examples_run():
    import student_train.targets

    failed, attempted = doctest.testmod(student_train.targets)
    assert attempted >= 3 and failed == 0


# -- losses on sparse targets --------------------------------------------------------------

def _sparse_and_dense(classes: int, k: int, seed: int):
    rng = np.random.default_rng(seed)
    indices, probs, residual = _topk_rows(rng, 8, k, classes)
    sparse = SparseTargets.from_topk(indices, probs, residual, classes)
    return sparse, torch.from_numpy(_hand_dense(indices, probs, residual, classes))


@pytest.mark.parametrize("name", sorted(LOSS_FUNCTIONS))
@pytest.mark.parametrize("classes, k", [(10, 3), (10, 10), (200, 7)])
def test_losses_give_the_same_value_and_gradient_on_sparse_and_dense_targets(name, classes, k):
    """float64 logits and a float64 dense reference built by hand; rows with no mass, a
    one-hot row, a row with residual 0, and k = C among them."""
    sparse, dense64 = _sparse_and_dense(classes, k, seed=classes * k)
    logits = torch.randn(8, classes, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(k)) * 3
    values, grads = [], []
    for target in (sparse, dense64, sparse.dense()):
        x = logits.clone().requires_grad_(True)
        extra = (2.0,) if name == "kl" else ()
        loss = LOSS_FUNCTIONS[name](x, target, *extra)
        loss.backward()
        values.append(loss.detach())
        grads.append(x.grad)
    # sparse = densify's float32 rows: the same computation, bit for bit
    assert torch.equal(values[0], values[2]) and torch.equal(grads[0], grads[2])
    # and the float64 reference up to the float32 rounding of the targets
    torch.testing.assert_close(values[0].double(), values[1].double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_distillation_loss_module_takes_sparse_targets_with_labels():
    sparse, dense64 = _sparse_and_dense(10, 3, seed=1)
    logits = torch.randn(8, 10)
    labels = torch.tensor([0, -1, 2, 3, -1, 5, 6, 7])
    module = DistillationLoss("kl", temperature=3.0, label_weight=0.5)
    assert torch.equal(module(logits, sparse, labels), module(logits, sparse.dense(), labels))
    torch.testing.assert_close(module(logits, sparse, labels),
                               module(logits, dense64.float(), labels))
    with pytest.raises(ValueError, match="does not match"):
        js_divergence(torch.randn(8, 11), sparse)


# -- the dataset, collate, sampler ---------------------------------------------------------

@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Two stores (k 3 with 3 views, k 5 with 2 views) over one image folder."""
    base = tmp_path_factory.mktemp("replay")
    keys, labels = make_images(str(base / "images"), n=24, classes=CLASSES)
    make_store(str(base / "a.zarr"), str(base / "images"), keys[:14], labels[:14],
               classes=CLASSES, views=3, topk=3, invalid=(4,), input_size=SIZE)
    make_store(str(base / "b.zarr"), str(base / "images"), keys[14:], labels[14:],
               classes=CLASSES, views=2, topk=5, seed=1, input_size=SIZE)
    return {"base": base, "a": str(base / "a.zarr"), "b": str(base / "b.zarr")}


def test_dataset_yields_the_replayed_view_its_sparse_target_and_label(stores):
    data = StoreDataset([stores["a"], stores["b"]], {"input_size": (3, SIZE, SIZE)}, seed=7)
    a, b = labelstore.open(stores["a"]), labelstore.open(stores["b"])
    assert len(data) == 13 + 10 and data.num_classes == CLASSES
    replays = [ViewReplay(a, input_size=SIZE), ViewReplay(b, input_size=SIZE)]
    rows = [(0, r) for r in np.flatnonzero(a.valid)] + [(1, r) for r in range(len(b))]
    views = set()
    for epoch in (0, 1):
        for index in (0, 5, 12, 13, 22):
            image, target, label = data[(epoch, index)]
            number, row = rows[index]
            store = (a, b)[number]
            view = data.view_of(epoch, index)
            views.add((number, view))
            teacher = replays[number](row, view)
            if view:  # the teacher's own pixels
                assert torch.equal(image, teacher)
            else:     # view 0: timm's two-step eval transform there, one box resample here
                assert (image.int() - teacher.int()).abs().max() <= 2
            part = store.read(int(row))
            assert np.array_equal(target.dense().numpy(), labelstore.densify(
                part.indices[:, view], part.probs[:, view], part.residual[:, view], CLASSES)[0])
            assert target.indices.shape == (store.topk,) and label == store.labels[row]
    assert len(views) > 3
    with pytest.raises(TypeError, match=r"\(epoch, index\) keys"):
        data[3]


def test_a_dataloader_with_collate_and_the_sampler_gives_the_trainer_s_batches(stores, tmp_path):
    """train-student's batches are this recipe's: the same images, targets and labels."""
    from student_train import TrainConfig

    data_config = data_config_for("test_resnet", SIZE)
    cfg = TrainConfig(student="test_resnet", out=str(tmp_path / "run"),
                      stores=(stores["a"], stores["b"]), batch_size=6, input_size=SIZE,
                      num_workers=0, device="cpu", threads=1, views="replay", seed=3)
    trainer = build_data(cfg, setup("cpu"), data_config, log=logging.getLogger("test"))
    data = StoreDataset([stores["a"], stores["b"]], data_config, seed=3)
    sampler = ShardedSampler(len(data), seed=3)
    loader = DataLoader(data, batch_size=6, sampler=sampler, collate_fn=collate,
                        num_workers=1, drop_last=True)
    mean, std = torch.tensor(data_config["mean"]), torch.tensor(data_config["std"])
    for epoch in (0, 2):
        trainer.set_epoch(epoch)
        sampler.set_epoch(epoch)
        ours = list(loader)
        theirs = list(trainer.train)
        assert len(ours) == len(theirs) == 23 // 6
        for (pixels, targets, labels), (images, their_targets, their_labels) in zip(ours, theirs):
            assert pixels.dtype == torch.uint8 and isinstance(targets, SparseTargets)
            assert torch.equal(pixels_to_input(pixels, mean, std), images)
            assert torch.equal(targets.dense(), their_targets.dense())
            assert torch.equal(labels, their_labels)


def test_roots_override_the_recorded_one_and_are_checked(stores, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(stores["base"] / "images", moved)
    data = StoreDataset(stores["b"], {"input_size": SIZE}, roots=str(moved), seed=1)
    recorded = StoreDataset(stores["b"], {"input_size": SIZE}, seed=1)
    assert data.samples.path(0).startswith(str(moved))
    assert torch.equal(data[(0, 3)][0], recorded[(0, 3)][0])
    os.remove(moved / data.samples.keys[2])
    with pytest.raises(FileNotFoundError, match="1 of 10 images are missing"):
        StoreDataset(stores["b"], {"input_size": SIZE}, roots=str(moved))
    with pytest.raises(ValueError, match="2 image roots for 1 label stores"):
        StoreDataset(stores["b"], {"input_size": SIZE}, roots=[str(moved), str(moved)])
    with pytest.raises(ValueError, match="needs input_size"):
        StoreDataset(stores["b"], {"crop_pct": 1.0})


def test_public_names_are_the_trainer_s_own():
    import student_train.sampling

    assert student_train.ShardedSampler is student_train.sampling.ShardedSampler
    assert set(student_train.__all__) >= {"StoreDataset", "ShardedSampler", "collate",
                                          "SparseTargets", "DistillationLoss", "dali_batches"}


@pytest.mark.slow
def test_dali_batches_match_the_pil_dataset_on_the_same_keys(stores):
    pytest.importorskip("nvidia.dali")
    data_config = data_config_for("test_resnet", SIZE)
    data = StoreDataset([stores["a"], stores["b"]], data_config, seed=2)
    sampler = ShardedSampler(len(data), seed=2)
    sampler.set_epoch(1)
    pil = list(DataLoader(data, batch_size=8, sampler=sampler, collate_fn=collate))
    dali = list(dali_batches(data, sampler, batch_size=8, device="cpu", num_workers=1))
    assert len(pil) == len(dali) == 3
    mean, std = torch.tensor(data_config["mean"]), torch.tensor(data_config["std"])
    for (pixels, targets, labels), (images, dali_targets, dali_labels) in zip(pil, dali):
        assert torch.equal(targets.dense(), dali_targets.dense())
        assert torch.equal(labels, dali_labels)
        grey = (pixels_to_input(pixels, mean, std) - images).abs() * torch.tensor(
            data_config["std"])[:, None, None] * 255    # back to 8-bit grey levels
        # the two resamplers round their 8-bit passes apart: on these noisy images (sigma 40
        # levels) a tap moved by a hair shows up to a few levels on a few pixels; a wrong
        # box or flip would move the mean by ~6 levels
        assert grey.mean() < 0.5 and (grey > 2.5).float().mean() < 0.01 and grey.max() <= 8
