"""``--threads N`` (labelstore/_threads.py) reaches every command that computes."""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

import labelstore
import student_train.evaluation
import student_train.quickstart
import student_train.trainer
import teacher_infer
from cli import main


@pytest.fixture
def seen(monkeypatch):
    """Replace the library call behind each command by one that records the thread count."""
    calls = {}

    def record(name, result, **fields):
        def call(*args, **kwargs):
            calls[name] = dict(torch=torch.get_num_threads(), omp=os.environ["OMP_NUM_THREADS"],
                               args=args, kwargs=kwargs)
            return result
        return call

    monkeypatch.setattr(teacher_infer, "InferConfig", lambda **kw: kw)
    monkeypatch.setattr(teacher_infer, "run", record("infer-teacher", "ran"))
    monkeypatch.setattr(student_train.evaluation, "evaluate", record("eval", "ran"))
    monkeypatch.setattr(labelstore, "dedup", record("dedup", "ran"))
    monkeypatch.setattr(student_train.trainer, "train",
                        record("train-student", SimpleNamespace(summary=lambda: "ran")))
    monkeypatch.setattr(student_train.quickstart, "run", record(
        "quickstart", SimpleNamespace(table=lambda: "ran", workdir="w")))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # restored after the test
    threads = torch.get_num_threads()
    yield calls
    torch.set_num_threads(threads)


@pytest.mark.parametrize("command", [
    ["infer-teacher", "--model", "resnet18", "--data", "d", "--out", "o.zarr"],
    ["eval", "--model", "resnet18", "--checkpoint", "c.pt", "--data", "d"],
    ["dedup", "--query", "q.zarr", "--pool", "p.zarr", "--out", "x.tsv"],
    ["train-student", "--student", "resnet18", "--store", "s.zarr", "--out", "r"],
    ["quickstart", "--workdir", "w"],
])
def test_threads_option_sets_the_thread_count_before_the_work(seen, command, tmp_path):
    wanted = 3 if torch.get_num_threads() != 3 else 2  # not what the process had
    assert main(command + ["--threads", str(wanted)]) == 0
    call = seen[command[0]]
    assert call["torch"] == wanted and call["omp"] == str(wanted)
    if command[0] == "dedup":
        assert call["kwargs"]["workers"] == wanted  # SIFT verification threads
    if command[0] == "train-student":
        assert call["args"][0].threads == wanted    # recorded in config.json by train()
    if command[0] == "quickstart":
        assert call["args"][0].threads == wanted


def test_threads_default_is_one_and_zero_is_refused(seen, capsys):
    assert main(["eval", "--model", "resnet18", "--checkpoint", "c.pt", "--data", "d"]) == 0
    assert seen["eval"]["torch"] == 1
    assert main(["eval", "--model", "m", "--checkpoint", "c", "--data", "d",
                 "--threads", "0"]) == 2
    assert "--threads" in capsys.readouterr().err


def test_opencv_loaded_after_the_option_uses_the_thread_count():
    # dedup imports cv2 only when SIFT runs, after --threads was applied: OpenCV must still get
    # the count (without it, a 2-core machine's cv2 starts 2 threads whatever --threads says).
    import subprocess
    import sys

    code = ("import sys; from labelstore._threads import set_threads; set_threads(1); "
            "assert 'cv2' not in sys.modules; import cv2; print(cv2.getNumThreads())")
    env = {k: v for k, v in os.environ.items() if k != "OPENCV_FOR_THREADS_NUM"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "1"
