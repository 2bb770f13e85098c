"""benchmarks/gpu/run.py: its smoke mode on the CPU writes every part, each with figures or
the reason it has none; a crashing measurement or part is recorded and the rest runs."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu" / "run.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def test_a_failing_measurement_is_recorded_and_the_next_one_runs(tmp_path):
    gpu_run = load_script()
    rec = gpu_run.Recorder("teacher", str(tmp_path / "teacher.json"), time.time() + 60)

    def broken():
        raise RuntimeError("DALI pipeline exploded")

    assert rec.measure("first", broken) is None
    assert rec.measure("second", lambda: {"img_s": 12.5})["img_s"] == 12.5
    assert rec.measure("third", lambda: {"img_s": 1.0}, needs_s=3600) is None
    rec.finish()
    record = json.loads((tmp_path / "teacher.json").read_text())
    assert record["status"] == "partial"
    assert "DALI pipeline exploded" in record["errors"]["first"]["error"]
    assert record["errors"]["first"]["traceback"]
    assert record["results"]["second"]["img_s"] == 12.5
    assert "time box" in record["skipped"]["third"]


def test_a_part_that_measures_nothing_says_so(tmp_path):
    gpu_run = load_script()
    rec = gpu_run.Recorder("dedup", str(tmp_path / "dedup.json"), time.time() + 60)
    rec.finish()
    record = json.loads((tmp_path / "dedup.json").read_text())
    assert record["status"] == "skipped" and record["skipped"]["part"]


def test_a_dead_part_process_is_an_error_not_a_result(tmp_path):
    gpu_run = load_script()
    args = gpu_run.parse(["--smoke", "--out", str(tmp_path)])
    (tmp_path / "parts").mkdir()
    rec = gpu_run.Recorder("train", str(tmp_path / "parts" / "train.json"), time.time() + 60)
    rec.measure("pil/supervised", lambda: {"img_s": 3.0})
    rec.record["running"] = "pil/online"  # what the process was doing when it died
    rec._save()
    (tmp_path / "parts" / "train.log").write_text("Segmentation fault\n")
    crashed = gpu_run._load_part(args, "train", {"returncode": -11, "wall_s": 4.0})
    assert crashed["status"] == "partial" and "exited -11" in crashed["errors"]["process"]["error"]
    assert "Segmentation fault" in crashed["errors"]["process"]["log_tail"]
    killed = gpu_run._load_part(args, "train", {"returncode": -9, "wall_s": 60.0,
                                                "timed_out": True})
    assert "while measuring pil/online" in killed["errors"]["timeout"]["error"]
    assert killed["results"]["pil/supervised"]["img_s"] == 3.0
    rec.finish()  # done, but slow to exit: the figures stand
    late = gpu_run._load_part(args, "train", {"returncode": 0, "wall_s": 61.0, "timed_out": True})
    assert late["status"] == "ok" and "timeout" not in late["errors"]


def test_parts_past_the_budget_are_skipped_with_the_reason(tmp_path):
    done = run_script("--smoke", "--out", str(tmp_path / "out"), "--workdir",
                      str(tmp_path / "work"), "--budget", "0", "--parts", "env,teacher",
                      timeout=120)
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    for name in ("env", "teacher"):
        assert results["parts"][name]["status"] == "skipped"
        assert "global time budget" in results["parts"][name]["skipped"]["part"]
    assert "skipped" in done.stdout


def _numbers(value) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [value]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    return []


@pytest.mark.slow
def test_smoke_run_writes_every_part(tmp_path):
    gpu_run = load_script()
    out = tmp_path / "out"
    done = run_script("--smoke", "--out", str(out), "--workdir", str(tmp_path / "work"),
                      timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    parts = results["parts"]
    assert list(parts) == list(gpu_run.PARTS)
    for name, record in parts.items():
        assert record["status"] in ("ok", "skipped"), (name, record["errors"])
        assert record["results"] or record["skipped"], name
        assert all(isinstance(r, str) and r for r in record["skipped"].values()), name
        assert (out / "parts" / f"{name}.json").exists()

    env = parts["env"]["results"]
    assert env["software"]["torch"] and env["software"]["nvidia.dali"][0].isdigit()
    assert env["accelerator"]["cuda_available"] in (True, False)

    teacher = parts["teacher"]["results"]
    images = results["config"]["teacher"]["images"]
    for views in (1, 4):
        assert teacher[f"v{views}/model_only"]["img_s"] > 0
        for decoder in ("dali", "pil"):
            assert teacher[f"v{views}/decode_only/{decoder}"]["img_s"] > 0
            run = teacher[f"v{views}/end_to_end/{decoder}"]
            assert run["img_s"] > 0 and run["images"] == images and run["failures"] == 0
            assert 0 <= run["overhead_pct"] <= 100

    # the teacher reading the same JPEGs from IN-22k-like shards: the same labels, per decoder
    shards = parts["shards"]["results"]
    assert shards["pack"]["samples"] == images and shards["pack"]["shards"] == 3
    for decoder in ("dali", "pil"):
        for layout in ("files", "shards"):
            run = shards[f"{decoder}/{layout}"]
            assert run["img_s"] > 0 and run["images"] == images and run["failures"] == 0
        assert shards[f"{decoder}/labels"]["indices_equal"]
        assert shards[f"{decoder}/labels"]["max_abs_dp"] == 0
        assert shards[f"{decoder}/labels"]["valid_rows"] == images

    # DALI and PIL on the same images, weights and boxes: they differ by a grey level on a
    # few pixels, so the teacher's answers must agree (tests/test_teacher_infer.py: >= 99 %)
    for views in (1, 4):
        agreement = parts["agreement"]["results"][f"v{views}"]
        assert agreement["rows"] == images and agreement["view_rows"] == images * views
        assert agreement["boxes_equal"] and agreement["flips_equal"]
        assert agreement["top1_equal_rate"] >= 0.95
        assert 0 <= agreement["max_abs_dp"] <= 0.05
        assert agreement["pil_distinct_top1"] > 1  # the teacher's answer depends on the image

    # bf16 autocast against fp32 on the same images, weights and boxes (infer-teacher's
    # default precision on a GPU): the same bounds as tests/test_teacher_infer.py's bf16 test,
    # with a random teacher deliberately sensitive to pixel noise
    precision = parts["precision"]["results"]
    for name in ("fp32", "bf16"):
        assert precision[f"store/{name}"]["images"] == images
    bf16 = precision["bf16_vs_fp32"]
    assert bf16["rows"] == images and bf16["view_rows"] == images * 4
    assert bf16["boxes_equal"] and bf16["flips_equal"]
    assert bf16["top1_equal_rate"] >= 0.75 and bf16["topk_overlap"] >= 0.75
    assert 0 < bf16["max_abs_dp"] < 0.15   # bf16 did run: the stores are not the same
    assert bf16["fp32_distinct_top1"] > 1

    # replayed augmentation against crop-only views, end to end, both decoders
    augment = parts["augment"]["results"]
    for decoder in ("dali", "pil"):
        for name in gpu_run.AUGMENT_SETTINGS:
            run = augment[f"{decoder}/{name}"]
            assert run["img_s"] > 0 and run["images"] == images and run["failures"] == 0

    train = parts["train"]["results"]
    teachers = results["config"]["train"]["teachers"]
    labels = ["supervised", "stored (replay)", "stored (global)"] + [
        f"online ({t})" for t in teachers]
    for decoder in ("dali", "pil"):
        for label in labels:
            assert train[f"{decoder}/{label}"]["img_s"] > 0, (decoder, label)
    for name in teachers:
        assert train[f"forward_cost/{name}"]["teacher_over_student"] > 0

    quickstart = parts["quickstart"]
    assert quickstart["results"]["command"]["command"].startswith("ssld quickstart --workdir")
    assert "run" in quickstart["skipped"] or quickstart["results"]["run"]["returncode"] == 0

    dedup = parts["dedup"]
    assert "--device" in dedup["skipped"].get("stage1", "") or \
        dedup["results"]["stage1"]["pairs"] >= dedup["results"]["stores"]["planted"]

    for record in parts.values():  # every figure recorded is a finite number
        assert all(n == n and abs(n) != float("inf") for n in _numbers(record["results"]))
    assert "ERROR" not in done.stdout and "EMPTY" not in done.stdout
    assert (out / "summary.txt").read_text().startswith("part")
