"""`ssld quickstart` end to end at a tiny scale (1 epoch each), and its reuse of finished steps."""
from __future__ import annotations

import json
import os
import re

import pytest
import torch

import labelstore
from cli import main


@pytest.mark.slow
def test_quickstart_runs_the_pipeline_and_reuses_finished_steps(tmp_path, capsys, monkeypatch,
                                                                 one_torch_thread):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # --threads sets it; restored after
    work = tmp_path / "qs"
    args = ["quickstart", "--workdir", str(work), "--teacher-epochs", "1",
            "--student-epochs", "1", "--select-k", "10", "--device", "cpu"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "val top-1" in out and "SSLD (JS)" in out and "total" in out
    assert "model (last.pt)" in out and "reused" not in out
    assert re.search(r"\[3/8\] teacher inference.*\(about \d+( min \d\d)? s left\)", out)
    summary = json.loads((work / "quickstart.json").read_text())
    assert summary["threads"] == 1 and not any(s["reused"] for s in summary["steps"])
    teacher_config = json.loads((work / "runs" / "teacher" / "config.json").read_text())
    assert teacher_config["resolved"]["threads"] == 1
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

    # a second run reuses every finished step (and says so) instead of computing it again
    outputs = [work / "runs" / "teacher" / "last.pt", work / "data" / "meta.json",
               work / "stores" / "pool_vs_val.dups", work / "stores" / "pool.zarr" / "zarr.json"]
    stamps = [os.path.getmtime(path) for path in outputs]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert [os.path.getmtime(path) for path in outputs] == stamps
    reused = [line.split("  ")[0] for line in out.splitlines() if " reused " in f"{line} "]
    assert reused == ["prepare digits", "train teacher", "infer-teacher L", "infer-teacher U",
                      "infer-teacher V (dedup)", "dedup U vs V", "train label-only student",
                      "train SSLD student"]
    again = json.loads((work / "quickstart.json").read_text())
    assert again["teacher_top1"] == summary["teacher_top1"]
    assert again["ssld_top1"] == summary["ssld_top1"]
    assert again["steps"] == summary["steps"]  # the first run's times are kept
    assert len(again["reruns"]) == 1
    rerun = {step["name"]: step["reused"] for step in again["reruns"][0]["steps"]}
    assert rerun["train teacher"] and rerun["dedup U vs V"] and not rerun["select-topk"]

    # changed options: the steps they reach are computed again, not marked reused
    changed = ["quickstart", "--workdir", str(work), "--teacher-epochs", "1",
               "--student-epochs", "2", "--select-k", "5", "--device", "cpu"]
    assert main(changed) == 0
    out = capsys.readouterr().out
    assert [os.path.getmtime(path) for path in outputs] == stamps
    reused = [line.split("  ")[0] for line in out.splitlines() if " reused " in f"{line} "]
    assert reused == ["prepare digits", "train teacher", "infer-teacher L", "infer-teacher U",
                      "infer-teacher V (dedup)", "dedup U vs V"]
    labels_only = torch.load(work / "runs" / "student_labels" / "last.pt", weights_only=True)
    assert labels_only["config"]["epochs"] == labels_only["epoch"] == 2  # afresh, not resumed
    ssld = torch.load(work / "runs" / "student_ssld" / "last.pt", weights_only=True)
    assert ssld["data"][0]["label_sha256"] == labelstore.label_sha256(
        labelstore.open(work / "stores" / "train.zarr"))  # trained on the new selection
    assert len(labelstore.open(work / "stores" / "pool_top5.zarr")) <= 5 * 10


def test_table_layout():
    """The printed table, character for character (it was one function before the split)."""
    from student_train.quickstart import QuickstartResult, StepTime

    result = QuickstartResult(teacher_top1=0.9144, baseline_top1=0.6, ssld_top1=0.725,
                              selected=97, duplicates=3, threads=2, steps=[
                                  StepTime("prepare digits", 1.26, "200 L / 1237 U / 360 V"),
                                  StepTime("train teacher", 0, "", True),
                                  StepTime("select-topk", 0.21, "97 rows")])
    assert result.table() == (
        "model (last.pt)                                                   val top-1\n"
        "----------------------------------------------------------------  ---------\n"
        "teacher resnet18, supervised on L (200 images)                       91.44%\n"
        "student mobilenetv3_small_050, label-only on L                       60.00%\n"
        "student mobilenetv3_small_050, SSLD (JS) on L + 97 selected pool     72.50%\n"
        "\n"
        "step                          wall time\n"
        "prepare digits                    1.3 s  200 L / 1237 U / 360 V\n"
        "train teacher                    reused  \n"
        "select-topk                       0.2 s  97 rows\n"
        "total                             1.5 s  (2 threads)")
    result.threads = 1
    assert result.table().endswith("total                             1.5 s  (1 thread)")
