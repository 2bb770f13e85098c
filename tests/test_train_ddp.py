"""Two-process DDP training through ``torchrun`` on the CPU (gloo)."""
from __future__ import annotations

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
