"""Two-process DDP training through ``torchrun`` on the CPU (gloo)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from train_data import make_images, make_store

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.slow
def test_two_processes_train_on_disjoint_samples_to_the_same_weights(tmp_path):
    keys, labels = make_images(str(tmp_path / "images"), n=40, classes=4)
    make_store(str(tmp_path / "s.zarr"), str(tmp_path / "images"), keys, labels, classes=4,
               views=2, invalid=(7,))
    records = tmp_path / "records"
    records.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", os.path.join(HERE, "ddp_train_worker.py"),
               str(tmp_path / "s.zarr"), str(tmp_path / "run"), str(records)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(records / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(r["ddp"] for r in ranks)
    for epoch in (0, 1):
        parts = [{i for e, i in r["seen"] if e == epoch} for r in ranks]
        # 39 valid rows: 19 per rank, of which 2 full batches of 8 are loaded
        assert len(parts[0]) == len(parts[1]) == 16
        assert not parts[0] & parts[1]
    assert {i for e, i in ranks[0]["seen"] if e == 0} != {i for e, i in ranks[0]["seen"]
                                                           if e == 1}
    for name, value in ranks[0]["state_dict"].items():
        assert torch.equal(value, ranks[1]["state_dict"][name]), name
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert len(saved["rng"]) == 2 and saved["epoch"] == 2
    for name, value in saved["state_dict"].items():
        assert torch.equal(value, ranks[0]["state_dict"][name]), name
    resolved = open(tmp_path / "run" / "config.json").read()
    assert '"world_size": 2' in resolved and '"global_batch": 16' in resolved


@pytest.mark.slow
def test_two_nodes_train_as_one_process_with_the_same_global_batch(tmp_path):
    """Two torchrun nodes (--nnodes 2, c10d rendezvous on 127.0.0.1, one process each, gloo)
    with --batch-size 4 train what one process trains with --batch-size 8: the ranks take
    alternate samples of each epoch's order, so every step sees the same 8 samples, DDP
    averages the two halves' gradients, and the lr scales with the same global batch. The
    student has no batch norm (ConvNeXt's LayerNorm), whose statistics are per process."""
    from student_train import TrainConfig, train
    from torchrun_nodes import run_two_nodes

    keys, labels = make_images(str(tmp_path / "images"), n=40, classes=4)
    store = str(tmp_path / "s.zarr")
    make_store(store, str(tmp_path / "images"), keys, labels, classes=4, views=2)
    options = dict(student="test_convnext", stores=(store,), epochs=2, input_size=32,
                   num_workers=0, device="cpu", threads=1, lr=0.2, warmup_epochs=0.5)
    nodes = run_two_nodes(["-m", "cli", "train-student", "--student", "test_convnext",
                           "--store", store, "--out", str(tmp_path / "nodes"), "--epochs", "2",
                           "--batch-size", "4", "--input-size", "32", "--num-workers", "0",
                           "--device", "cpu", "--threads", "1", "--lr", "0.2",
                           "--warmup-epochs", "0.5"])
    assert [node.returncode for node in nodes] == [0, 0], [n.stderr[-3000:] for n in nodes]
    train(TrainConfig(out=str(tmp_path / "one"), batch_size=8, **options))

    two = torch.load(tmp_path / "nodes" / "last.pt", weights_only=True)
    one = torch.load(tmp_path / "one" / "last.pt", weights_only=True)
    assert len(two["rng"]) == 2 and len(one["rng"]) == 1
    assert two["step"] == one["step"] == 2 * 5  # 40 samples, 8 per step
    for name, value in one["state_dict"].items():
        # the same sums in another order: float32 rounding, nothing more
        torch.testing.assert_close(two["state_dict"][name], value, atol=2e-5, rtol=1e-4,
                                   msg=name)
    # what the tolerance tells apart: one process with the nodes' per-process batch of 4
    train(TrainConfig(out=str(tmp_path / "half"), batch_size=4, **options))
    half = torch.load(tmp_path / "half" / "last.pt", weights_only=True)
    assert max(float((half["state_dict"][name] - value).abs().max())
               for name, value in one["state_dict"].items() if value.is_floating_point()) > 1e-3
    resolved = json.load(open(tmp_path / "nodes" / "config.json"))["resolved"]
    assert resolved["world_size"] == 2 and resolved["global_batch"] == 8
    assert resolved["base_lr"] == json.load(open(tmp_path / "one" / "config.json"))[
        "resolved"]["base_lr"]
