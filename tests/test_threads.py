"""``threads``: one runtime function (teacher_infer/runtime/threads.py) sets torch, OpenMP, BLAS
and OpenCV, called by every library entry point that computes; ``--threads N`` is only the
config field (or keyword) of the same name, so the CLI and Python behave the same."""
from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import student_train.distributed
import student_train.evaluation
import student_train.quickstart
import student_train.trainer
import teacher_infer
import teacher_infer.dedup
import teacher_infer.dedup.run
import teacher_infer.infer
import teacher_infer.recompute
from cli import main
from teacher_infer.runtime import Dist, cpus_per_rank, set_threads


@pytest.fixture
def restore_threads(monkeypatch):
    """Whatever a test sets, the process gets its thread count and environment back."""
    for name in ("OMP_NUM_THREADS", "OPENCV_FOR_THREADS_NUM"):
        monkeypatch.delenv(name, raising=False)  # restored after the test
    threads = torch.get_num_threads()
    yield
    set_threads(threads)


@pytest.fixture
def seen(monkeypatch, restore_threads):
    """Replace the library call behind each command by one that records what it was given and
    the thread count at the time."""
    calls = {}

    def record(name, result):
        def call(*args, **kwargs):
            calls[name] = dict(torch=torch.get_num_threads(), args=args, kwargs=kwargs)
            return result
        return call

    monkeypatch.setattr(teacher_infer, "run", record("infer-teacher", "ran"))
    monkeypatch.setattr(teacher_infer, "verify", record("verify", SimpleNamespace(ok=True)))
    monkeypatch.setattr(student_train.evaluation, "evaluate", record("eval", "ran"))
    monkeypatch.setattr(student_train.evaluation, "report", lambda *a, **k: "ran")
    monkeypatch.setattr(teacher_infer.dedup, "dedup", record("dedup", "ran"))
    monkeypatch.setattr(student_train.trainer, "train",
                        record("train-student", SimpleNamespace(summary=lambda: "ran")))
    monkeypatch.setattr(student_train.quickstart, "run", record(
        "quickstart", SimpleNamespace(table=lambda: "ran", workdir="w")))
    set_threads(1)
    yield calls


COMMANDS = [
    ["infer-teacher", "--model", "resnet18", "--random-weights", "--data", "d", "--out", "o.zarr"],
    ["verify", "s.zarr"],
    ["eval", "--model", "resnet18", "--checkpoint", "c.pt", "--data", "d"],
    ["dedup", "--query", "q.zarr", "--pool", "p.zarr", "--out", "x.tsv"],
    ["train-student", "--student", "resnet18", "--store", "s.zarr", "--out", "r"],
    ["quickstart", "--workdir", "w"],
]


def _threads_given(call) -> int | None:
    """The thread count a recorded library call was asked for (a config field or keyword)."""
    if "threads" in call["kwargs"]:
        return call["kwargs"]["threads"]
    return call["args"][0].threads


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[0])
def test_threads_option_is_the_config_field_and_parsing_changes_nothing(seen, command):
    assert main(command + ["--threads", "3"]) == 0
    call = seen[command[0]]
    assert _threads_given(call) == 3
    assert call["torch"] == 1               # no callback set it while the options were parsed
    assert "OMP_NUM_THREADS" not in os.environ or os.environ["OMP_NUM_THREADS"] == "1"
    assert main(command) == 0                # the default is the config's
    assert _threads_given(seen[command[0]]) == (1 if command[0] == "quickstart" else None)
    if command[0] == "dedup":
        assert call["args"][0].workers is None       # SIFT threads: --threads unless given


def test_zero_threads_is_refused(seen, capsys):
    assert main(["eval", "--model", "m", "--checkpoint", "c", "--data", "d",
                 "--threads", "0"]) == 2
    assert "--threads" in capsys.readouterr().err


def test_set_threads_sets_torch_openmp_blas_and_opencv(restore_threads):
    import cv2
    from threadpoolctl import threadpool_info

    wanted = 3 if torch.get_num_threads() != 3 else 2
    assert set_threads(wanted) == wanted
    assert torch.get_num_threads() == wanted and cv2.getNumThreads() == wanted
    assert os.environ["OMP_NUM_THREADS"] == os.environ["OPENCV_FOR_THREADS_NUM"] == str(wanted)
    pools = threadpool_info()
    assert pools and all(pool["num_threads"] == wanted for pool in pools)
    with pytest.raises(ValueError, match="threads must be >= 1"):
        set_threads(0)


def test_the_default_is_the_cpus_available_per_rank(restore_threads, monkeypatch):
    monkeypatch.delenv("SSLD_THREADS", raising=False)
    cpus = len(os.sched_getaffinity(0))
    assert set_threads(None, Dist()) == cpus == torch.get_num_threads()
    two_ranks = Dist(rank=1, world_size=2, local_rank=1, local_world_size=2)
    assert set_threads(None, two_ranks) == max(1, cpus // 2) == cpus_per_rank(two_ranks)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")     # from the environment, as under torchrun
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert set_threads() == max(1, cpus // 2)


def test_ssld_threads_is_the_default_when_set(restore_threads, monkeypatch):
    """A driver of many commands (experiments/driver.py) sets the default once; an explicit
    count still wins, and a value that is not a count is one line naming the variable."""
    wanted = 3 if torch.get_num_threads() != 3 else 2
    monkeypatch.setenv("SSLD_THREADS", str(wanted))
    assert set_threads(None, Dist()) == wanted == torch.get_num_threads()
    assert set_threads(1) == 1 == torch.get_num_threads()
    for bad in ("0", "two", "-1", "1.5"):
        monkeypatch.setenv("SSLD_THREADS", bad)
        with pytest.raises(ValueError, match="SSLD_THREADS="):
            set_threads(None, Dist())


class _Started(Exception):
    """Raised where an entry point starts its work: the threads must be set by then."""


def _stop_at(monkeypatch, module, name, record):
    def stop(*args, **kwargs):
        record.append(torch.get_num_threads())
        raise _Started
    monkeypatch.setattr(module, name, stop)


def test_every_library_entry_point_applies_its_threads_first(restore_threads, monkeypatch,
                                                             tmp_path):
    """train(TrainConfig(threads=2)) and friends set the count before any work, as --threads 2
    does: the same function, called by the library, not by the command line."""
    from student_train.config import TrainConfig
    from teacher_infer.config import InferConfig
    from teacher_infer.dedup import DedupConfig

    seen: list[int] = []
    wanted = 3 if torch.get_num_threads() != 3 else 2
    _stop_at(monkeypatch, teacher_infer.infer, "resolve_device", seen)
    _stop_at(monkeypatch, student_train.distributed, "resolve_device", seen)
    _stop_at(monkeypatch, teacher_infer.dedup.run, "resolve_device", seen)
    _stop_at(monkeypatch, teacher_infer.recompute, "plan_teachers", seen)   # after open
    from test_labelstore import make_store
    make_store(str(tmp_path / "v.zarr"), n=4, views=1, k=2, classes=3, chunk_rows=4)
    monkeypatch.setattr(teacher_infer.dedup.run, "_open_embedded", lambda source, role: source)
    calls = {
        "infer": lambda: teacher_infer.infer.run(InferConfig(
            model="m", data=str(tmp_path / "images"), out=str(tmp_path / "o.zarr"),
            random_weights=True, threads=wanted)),
        "train": lambda: student_train.trainer.train(TrainConfig(
            student="m", stores=("s.zarr",), out=str(tmp_path / "run"), threads=wanted)),
        "eval": lambda: student_train.evaluation.evaluate("m", "c.pt", "d", threads=wanted),
        "verify": lambda: teacher_infer.recompute.verify(str(tmp_path / "v.zarr"),
                                                         threads=wanted),
        "dedup": lambda: teacher_infer.dedup.run.dedup(DedupConfig(
            query="q", pool="p", verify="none", threads=wanted)),
    }
    for name, call in calls.items():
        set_threads(1)
        with pytest.raises(_Started):
            call()
        assert seen[-1] == wanted, name
    assert len(seen) == len(calls)


def test_opencv_loaded_after_set_threads_uses_the_thread_count():
    # dedup imports cv2 only when SIFT runs, after the threads were set: OpenCV must still get
    # the count (without it, a 2-core machine's cv2 starts 2 threads whatever --threads says).
    code = ("import sys; from teacher_infer.runtime import set_threads; set_threads(1); "
            "assert 'cv2' not in sys.modules; import cv2; print(cv2.getNumThreads())")
    env = {k: v for k, v in os.environ.items() if k != "OPENCV_FOR_THREADS_NUM"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "1"
