"""`ssld quickstart` end to end at a tiny scale (1 epoch each), and its reuse of finished steps."""
from __future__ import annotations

import json
import os

import pytest

import labelstore
from cli import main


@pytest.mark.slow
def test_quickstart_runs_the_pipeline_and_reuses_finished_steps(tmp_path, capsys):
    work = tmp_path / "qs"
    args = ["quickstart", "--workdir", str(work), "--teacher-epochs", "1",
            "--student-epochs", "1", "--select-k", "10", "--device", "cpu"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "val top-1" in out and "SSLD (JS)" in out and "total" in out
    summary = json.loads((work / "quickstart.json").read_text())
    for name in ("teacher_top1", "baseline_top1", "ssld_top1"):
        assert 0.0 <= summary[name] <= 1.0
    labeled = labelstore.open(work / "stores" / "labeled.zarr")
    selected = labelstore.open(work / "stores" / "pool_top10.zarr")
    merged = labelstore.open(work / "stores" / "train.zarr")
    assert labeled.is_complete and selected.is_complete and merged.is_complete
    assert labeled.num_views == 4 and len(labeled) == 200
    assert 0 < len(selected) <= 10 * 10 == 100 and summary["selected"] == len(selected)
    assert len(merged) == len(labeled) + len(selected)  # pool and labeled keys never collide
    assert labelstore.open(work / "stores" / "pool.zarr").has_embeddings

    # a second run reuses the finished training runs instead of training again
    teacher = work / "runs" / "teacher" / "last.pt"
    stamp = os.path.getmtime(teacher)
    assert main(args) == 0
    assert os.path.getmtime(teacher) == stamp
    again = json.loads((work / "quickstart.json").read_text())
    assert again["teacher_top1"] == summary["teacher_top1"]
    assert again["ssld_top1"] == summary["ssld_top1"]
