"""The study driver (experiments/driver.py) and the record it resumes from (experiments/record.py).

Real runs of the scheduler with tiny fake steps (tests/study_toy.py: subprocesses that log
when they start and end, or internal functions), never ssld or training: dependencies,
parallel slots, exclusive steps, failures, ``--only``, resuming a killed sitting in its workdir,
and resuming from the results file in a new one.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments import record, steps
from experiments.driver import (Context, Driver, Step, ancestors, check_graph, main,
                                read_json)
from study_toy import STUDY, Scale, step_command

REPO = Path(__file__).resolve().parent.parent


def _context(tmp_path, workdir="w", results="results.json", **options) -> Context:
    args = dict(workdir=str(tmp_path / workdir), data=None, teacher="t", student="s",
                ssld="ssld", device="cpu", num_workers=0, jobs=1, threads=1, scale="smoke",
                results=str(tmp_path / results), discard_unreproduced=False) | options
    ctx = Context(argparse.Namespace(**args), Scale())
    ctx.work.mkdir(parents=True, exist_ok=True)
    return ctx


def _command(tmp_path, name, *options, deps=(), kind="train", **fields) -> Step:
    """A step that runs the fake command of study_toy.py, logging to tmp_path/log."""
    return Step(name, kind, deps=deps, command=lambda c: step_command(tmp_path / "log", name,
                                                                      *options), **fields)


def _events(tmp_path) -> list[tuple[str, str]]:
    """(event, step) pairs of the fake steps' log, in the order they happened."""
    return [tuple(line.split()[:2]) for line in (tmp_path / "log").read_text().splitlines()]


def _most_at_once(events) -> int:
    running, most = set(), 0
    for event, name in events:
        if event == "start":
            running.add(name)
            most = max(most, len(running))
        elif event == "end":
            running.discard(name)
    return most


def _internal(calls: dict, name: str, kind: str = "train", deps=(), fail: bool = False,
              **fields) -> Step:
    """An internal step that counts its runs in ``calls`` (and raises when ``fail``)."""
    def run(ctx):
        calls[name] = calls.get(name, 0) + 1
        if fail:
            raise RuntimeError(f"{name} broke")
        return {"step": name}
    return Step(name, kind, deps=deps, internal=run, **fields)


# -- one sitting: dependencies, slots, failures, --only ----------------------------------------

def test_steps_wait_for_their_dependencies_and_run_side_by_side(tmp_path):
    """b and c each wait until the other has started, so both finish only if the driver runs
    them at once (--jobs 2); each starts after its dependency ended, d after both."""
    graph = [_command(tmp_path, "a"),
             _command(tmp_path, "b", "--wait-for", "c", deps=("a",)),
             _command(tmp_path, "c", "--wait-for", "b", deps=("a",)),
             _command(tmp_path, "d", deps=("b", "c"))]
    assert Driver(_context(tmp_path, jobs=2), graph, study="toy").run() == 0
    events = _events(tmp_path)
    at = {event: i for i, event in enumerate(events)}
    assert len(at) == len(events) == 8  # each step started and ended once
    assert at[("end", "a")] < min(at[("start", "b")], at[("start", "c")])
    assert max(at[("end", "b")], at[("end", "c")]) < at[("start", "d")]
    assert _most_at_once(events) == 2


def test_never_more_steps_at_once_than_jobs(tmp_path):
    graph = [_command(tmp_path, name, "--sleep", "0.3") for name in "pqrs"]
    assert Driver(_context(tmp_path, jobs=2), graph, study="toy").run() == 0
    events = _events(tmp_path)
    assert len(events) == 8 and _most_at_once(events) <= 2


def test_an_exclusive_step_runs_alone(tmp_path):
    """x is ready first but waits until nothing else runs, and nothing starts beside it."""
    graph = [_command(tmp_path, "p", "--sleep", "0.3"),
             _command(tmp_path, "x", "--sleep", "0.3", exclusive=True),
             _command(tmp_path, "q", "--sleep", "0.3"), _command(tmp_path, "r", "--sleep", "0.3")]
    assert Driver(_context(tmp_path, jobs=3), graph, study="toy").run() == 0
    events = _events(tmp_path)
    start, end = events.index(("start", "x")), events.index(("end", "x"))
    assert end == start + 1
    assert _most_at_once(events[:start]) >= 2  # the others did run side by side
    before = events[:start]
    assert all(("end", name) in before for event, name in before if event == "start")


def test_a_failed_step_stops_only_the_steps_that_wait_for_it(tmp_path, capsys):
    calls: dict[str, int] = {}
    graph = [_internal(calls, "a", fail=True), _internal(calls, "b", deps=("a",)),
             _internal(calls, "c"), _internal(calls, "d", deps=("c",)),
             _internal(calls, "e", deps=("b", "d"))]
    assert Driver(_context(tmp_path), graph, study="toy").run() == 1
    assert calls == {"a": 1, "c": 1, "d": 1}
    assert "1 step(s) failed: a; 3 not finished" in capsys.readouterr().out  # a, b, e
    recorded = read_json(tmp_path / "results.json")["steps"]
    assert recorded["a"]["error"] == "RuntimeError: a broke" and not recorded["a"]["done"]
    assert recorded["a"]["attempts"] == 1
    assert not recorded["b"]["done"] and recorded["b"]["attempts"] == 0
    assert recorded["b"]["error"] is None  # it never ran: only what failed says so
    assert recorded["d"]["done"] and recorded["d"]["result"] == {"step": "d"}


def test_only_runs_the_matching_steps_and_their_dependencies(tmp_path):
    calls: dict[str, int] = {}
    graph = [_internal(calls, "prepare", "prepare"),
             _internal(calls, "teacher_s0", deps=("prepare",)),
             _internal(calls, "teacher_s1", deps=("prepare",)),
             _internal(calls, "eval_teacher_s0", "eval", deps=("teacher_s0",)),
             _internal(calls, "student", deps=("teacher_s0",))]
    driver = Driver(_context(tmp_path), graph, study="toy")
    assert driver.run({"eval_teacher_s.*"}) == 0
    assert calls == {"prepare": 1, "teacher_s0": 1, "eval_teacher_s0": 1}
    with pytest.raises(SystemExit, match="--only teacher matches no step"):
        Driver(_context(tmp_path), graph, study="toy").run({"teacher"})  # a whole name only
    assert Driver(_context(tmp_path), graph, study="toy").run() == 0
    assert calls == {"prepare": 1, "teacher_s0": 1, "eval_teacher_s0": 1, "teacher_s1": 1,
                     "student": 1}


def test_checks_then_evaluations_then_interrupted_runs_start_first(tmp_path):
    ctx = _context(tmp_path)
    steps = [Step(n, "train", resumable_train=Path(n)) for n in ("a", "b", "c")]
    steps.append(Step("eval_x", "eval"))
    driver = Driver(ctx, steps, study="toy")
    (ctx.run_dir("c")).mkdir(parents=True)
    (ctx.run_dir("c") / "last.pt").write_bytes(b"")
    driver.expected["b"] = {}
    assert sorted(["a", "b", "c", "eval_x"], key=driver.urgency) == ["b", "eval_x", "c", "a"]


def test_steps_run_with_the_sittings_thread_count(tmp_path):
    """ssld's --threads defaults to every CPU of the rank; the driver's commands are recorded
    without --threads, so it hands its own count to every step as $SSLD_THREADS."""
    ctx = _context(tmp_path)
    env = Driver(ctx, [Step("a", "train")], study="toy").env()
    assert env["SSLD_THREADS"] == env["OMP_NUM_THREADS"] == str(ctx.args.threads)


# -- resuming in the same workdir --------------------------------------------------------------

def _sitting(tmp_path, *options: str) -> subprocess.Popen:
    """The toy study's command line in a process of its own, as a user starts it."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "study_toy.py"), "--workdir", str(tmp_path / "w"),
         "--results", str(tmp_path / "results.json"), *options],
        env=dict(os.environ, PYTHONPATH=path), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)


def _wait_for(path: Path, proc: subprocess.Popen) -> None:
    end = time.monotonic() + 60
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.05)


def _gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (waits up to 10 s for it)."""
    end = time.monotonic() + 10
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def _kill(pid_file: Path) -> None:
    if pid_file.exists():
        try:
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        except ProcessLookupError:
            pass


def _starts(tmp_path, name: str) -> list[str]:
    return [line.strip() for line in (tmp_path / "w" / "log").read_text().splitlines()
            if line.startswith(f"start {name} ")]


def test_a_killed_sitting_resumes(tmp_path):
    """The driver is killed while b trains (SIGKILL: nothing cleaned up) and b's process with
    it, as when a machine goes away. The same command then skips a, resumes b from its
    last.pt with --resume, runs c, and the results file counts b's interrupted attempt."""
    run_dir = tmp_path / "w" / "runs" / "b"
    first = _sitting(tmp_path)
    try:
        _wait_for(run_dir / "pid", first)
        first.kill()
        first.wait(timeout=60)
    finally:
        _kill(run_dir / "pid")
    (run_dir.parent / "release").write_text("")
    again = _sitting(tmp_path)
    out = again.communicate(timeout=120)[0]
    assert again.returncode == 0, out
    assert len(_starts(tmp_path, "a")) == 1 and len(_starts(tmp_path, "c")) == 1
    b = _starts(tmp_path, "b")
    assert len(b) == 2 and not b[0].endswith("--resume") and b[1].endswith("--resume")
    data = read_json(tmp_path / "results.json")
    assert data["steps"]["b"] | {"done": True, "attempts": 2, "interrupted_attempts": 1,
                                 "result": {"epochs": 2}} == data["steps"]["b"]
    assert data["steps"]["a"]["attempts"] == 1 and data["steps"]["c"]["done"]
    assert data["views"] == 4 and data["study"] == "toy"


def test_kill_stops_the_running_steps_and_the_same_command_resumes(tmp_path):
    """``kill PID`` (SIGTERM) of the driver stops the step it runs and records it as failed;
    the same command resumes it."""
    run_dir = tmp_path / "w" / "runs" / "b"
    first = _sitting(tmp_path)
    try:
        _wait_for(run_dir / "pid", first)
        pid = int((run_dir / "pid").read_text())
        first.send_signal(signal.SIGTERM)
        out = first.communicate(timeout=120)[0]
        assert first.returncode == 130 and "interrupted" in out, out
        assert _gone(pid)  # without waiting for its release
    finally:
        _kill(run_dir / "pid")
    b = read_json(tmp_path / "results.json")["steps"]["b"]
    assert not b["done"] and b["error"].startswith("RuntimeError: exit status -15")
    (run_dir.parent / "release").write_text("")
    again = _sitting(tmp_path)
    out = again.communicate(timeout=120)[0]
    assert again.returncode == 0, out
    assert _starts(tmp_path, "b")[1].endswith("--resume")
    assert read_json(tmp_path / "results.json")["steps"]["c"]["done"]


def test_a_finished_step_is_skipped_and_runs_again_when_its_outputs_are_gone(tmp_path, capsys):
    calls: dict[str, int] = {}
    out = tmp_path / "w" / "a.out"

    def make(ctx):
        calls["a"] = calls.get("a", 0) + 1
        out.write_text("x")
        return {"n": 1}

    def graph():
        return [Step("a", "prepare", internal=make, outputs=lambda c: [out]),
                _internal(calls, "b", deps=("a",))]

    assert Driver(_context(tmp_path), graph(), study="toy").run({"a"}) == 0
    assert Driver(_context(tmp_path), graph(), study="toy").run({"a"}) == 0
    assert calls == {"a": 1}
    out.unlink()
    assert Driver(_context(tmp_path), graph(), study="toy").run() == 0
    assert calls == {"a": 2, "b": 1} and out.exists()
    assert f"[a] marked finished but {out} is missing" in capsys.readouterr().out


def test_a_finished_step_whose_command_changed_is_refused(tmp_path):
    assert Driver(_context(tmp_path), [_command(tmp_path, "a", "--sleep", "0")],
                  study="toy").run() == 0
    with pytest.raises(SystemExit, match="step a finished earlier with another command"):
        Driver(_context(tmp_path), [_command(tmp_path, "a", "--sleep", "0.1")],
               study="toy").run()


def test_a_step_whose_failed_try_left_output_runs_again_with_its_flag(tmp_path):
    """Like select-topk, the command refuses an existing output: the try after a failed one
    gets the step's rerun_flag (--overwrite)."""
    out, mark = tmp_path / "U_top10.txt", tmp_path / "mark"

    def graph():
        return [_command(tmp_path, "select", "--refuse-existing", str(out), "--fail-once",
                         str(mark), kind="select", outputs=lambda c: [out],
                         rerun_flag="--overwrite")]

    assert Driver(_context(tmp_path), graph(), study="toy").run() == 1
    assert Driver(_context(tmp_path), graph(), study="toy").run() == 0
    starts = [ln for ln in (tmp_path / "log").read_text().splitlines()
              if ln.startswith("start select")]
    assert len(starts) == 2
    assert not starts[0].endswith("--overwrite") and starts[1].endswith("--overwrite")


def test_a_run_that_finished_while_no_driver_watched_is_collected_not_resumed(tmp_path):
    """A driver that dies leaves its train-student processes running; one that reaches its last
    epoch then must be collected by the next driver, not resumed (--resume refuses a finished
    run: exit status 2 in ssld, 3 in this stand-in)."""
    ctx = _context(tmp_path)
    run_dir = ctx.run_dir("r")
    script = (f"import pathlib, sys; d = pathlib.Path({str(run_dir)!r}); "
              "d.mkdir(parents=True, exist_ok=True); (d / 'last.pt').write_text('x'); "
              "sys.exit(3 if '--resume' in sys.argv else 0)")

    def collect(c):
        if not (run_dir / "finished").exists():
            raise RuntimeError("metrics.csv does not reach the last epoch")
        return {"epochs": 1}

    def driver():
        step = Step("r", "train", command=lambda c: [sys.executable, "-c", script],
                      collect=collect, outputs=lambda c: [run_dir / "last.pt"],
                      resumable_train=Path("r"))
        return Driver(ctx, [step], study="toy")

    assert driver().run() == 1          # the driver "died" before the run's last epoch
    (run_dir / "finished").write_text("")   # the orphaned run then finished
    assert driver().run() == 0
    assert read_json(tmp_path / "results.json")["steps"]["r"]["result"] == {"epochs": 1}


# -- resuming from the results file in a new workdir (record.py) ------------------------

class _Toy:
    """A four-step protocol of internal steps, so the driver runs without ssld: the data, a
    teacher, its evaluation, its store and the store's inspect, two students of the store and
    their evaluations, a tuning run and its choice. ``calls`` counts runs per step."""

    def __init__(self, tmp_path, teacher_loss=0.5):
        self.calls, self.loss = {}, teacher_loss
        self.fail_once: set[str] = set()
        self.tmp = tmp_path

    def prepare(self):
        (self.workdir / "prepared").write_text("data")
        return {"n": 100}

    def teacher(self):
        if not (self.workdir / "prepared").exists():
            raise RuntimeError("the teacher started before its data existed")
        return {"last_train_loss": self.loss}

    def step(self, name, kind, deps=(), value=None):
        def internal(ctx, name=name, value=value):
            self.calls[name] = self.calls.get(name, 0) + 1
            if name in self.fail_once:  # e.g. the sitting ended while it ran
                self.fail_once.discard(name)
                raise RuntimeError(f"{name} was stopped")
            return dict(value() if callable(value) else (value or {"ok": 1}))
        return Step(name, kind, deps=deps, internal=internal)

    def steps(self):
        s = self.step
        return [s("prepare", "prepare", value=self.prepare),
                s("tune", "train", ("prepare",), {"dev_top1": 0.7}),
                s("choose", "choose", ("tune",)),
                s("teacher", "train", ("choose",), self.teacher),
                s("eval_teacher", "eval", ("teacher",),
                  lambda: {"top1": 0.9 if self.loss == 0.5 else 0.8, "images": 100}),
                s("store", "infer", ("teacher",)),
                s("inspect_store", "inspect", ("store",),
                  lambda: {"mean_top1_prob": self.loss}),
                s("student_a", "train", ("choose", "inspect_store"), {"last_train_loss": 1.0}),
                s("eval_student_a", "eval", ("student_a",), {"top1": 0.8, "images": 100}),
                s("student_b", "train", ("choose", "inspect_store"), {"last_train_loss": 1.1}),
                s("eval_student_b", "eval", ("student_b",), {"top1": 0.81, "images": 100})]

    def run(self, workdir, results, discard=False, only=None):
        ctx = _context(self.tmp, workdir, results, discard_unreproduced=discard)
        self.workdir = ctx.work
        # the teacher comes before the data in the step list, as a reused choice lets it
        steps = self.steps()
        steps.insert(0, steps.pop([s.name for s in steps].index("tune")))
        steps.insert(1, steps.pop([s.name for s in steps].index("choose")))
        steps.insert(2, steps.pop([s.name for s in steps].index("teacher")))
        driver = Driver(ctx, steps, study="toy")
        self.calls = {}
        return driver.run(only), read_json(self.tmp / results)


def _sitting_1_of_toy(tmp_path):
    """A first sitting that finished everything but student_b's evaluation and whose workdir
    is then lost."""
    toy = _Toy(tmp_path)
    code, data = toy.run("w1", "results.json")
    assert code == 0 and all(v["done"] for v in data["steps"].values())
    data["steps"]["eval_student_b"].update(done=False, result=None)
    data["steps"]["student_b"].update(done=False, result=None)
    (tmp_path / "results.json").write_text(json.dumps(data))
    return toy


def test_a_new_workdir_resumes_from_the_results_file(tmp_path):
    toy = _sitting_1_of_toy(tmp_path)
    code, data = toy.run("w2", "results.json")
    assert code == 0
    # recomputed: what student_b reads (teacher -> store) and its checks; run: student_b
    assert set(toy.calls) == {"prepare", "teacher", "eval_teacher", "store", "inspect_store",
                              "student_b", "eval_student_b"}
    steps = data["steps"]
    assert steps["teacher"]["recomputed"][-1]["reproduced"] is True
    assert steps["student_a"]["done"] and "recomputed" not in steps["student_a"]
    assert steps["eval_student_b"]["done"] and "discarded" not in data
    # a third sitting finds everything recorded: nothing runs
    code, data = toy.run("w3", "results.json")
    assert code == 0 and toy.calls == {}


def test_a_restart_in_the_same_workdir_still_checks_what_was_recomputed(tmp_path):
    """The driver stopped after the teacher was recomputed here but before its evaluation:
    started again, it evaluates the teacher and compares, instead of taking the record."""
    toy = _sitting_1_of_toy(tmp_path)
    toy.fail_once = {"eval_teacher"}
    code, _ = toy.run("w2", "results.json")
    assert code == 1 and "teacher" in toy.calls
    code, data = toy.run("w2", "results.json")
    assert code == 0 and "eval_teacher" in toy.calls and "teacher" not in toy.calls
    assert data["steps"]["eval_teacher"]["recomputed"][-1]["reproduced"] is True


def test_an_unreproduced_teacher_stops_its_dependents_and_keeps_the_record(tmp_path):
    toy = _sitting_1_of_toy(tmp_path)
    toy.loss = 0.6  # the recomputed teacher trains to another loss
    code, data = toy.run("w2", "results.json")
    assert code == 1
    assert "student_b" not in toy.calls and "store" not in toy.calls
    teacher = data["steps"]["teacher"]
    assert teacher["result"] == {"last_train_loss": 0.5}  # the record is kept as it was
    note = teacher["recomputed"][-1]
    assert note["reproduced"] is False and note["result"] == {"last_train_loss": 0.6}
    assert data["steps"]["student_a"]["done"] and "discarded" not in data


def test_a_failed_teacher_does_not_block_steps_that_read_only_finished_results(tmp_path):
    """Study 2's amendment 1b: the recorded teacher does not reproduce on a new machine, and a
    step that reads only recorded results below it (the curve's evaluations) still runs, with
    a second teacher after it; what reads the failed teacher's outputs waits."""
    toy = _sitting_1_of_toy(tmp_path)
    toy.loss = 0.6
    base = toy.steps
    toy.steps = lambda: base() + [toy.step("summary", "choose", ("eval_student_a",)),
                                  toy.step("teacher2", "train", ("summary",))]
    code, data = toy.run("w2", "results.json")
    assert code == 1  # the teacher's check failed
    assert {"summary", "teacher2"} <= set(toy.calls)
    assert "student_b" not in toy.calls and "store" not in toy.calls
    assert data["steps"]["teacher2"]["done"] and "discarded" not in data


def test_a_recorded_failure_stays_in_the_results_until_the_step_runs_again(tmp_path):
    """Study 2's gate failed in sitting 2; a later sitting that runs other steps only
    (--only) in a new workdir must keep that outcome in the results file, not write it as a
    step that never ran."""
    toy = _Toy(tmp_path)
    base = toy.steps

    flat = []

    def gate():
        if not flat:
            raise RuntimeError("not flattened")
        return {"flat": True}
    toy.steps = lambda: base() + [toy.step("gate", "choose", ("eval_student_a",), gate)]
    code, data = toy.run("w1", "results.json")
    assert code == 1 and data["steps"]["gate"]["error"] == "RuntimeError: not flattened"
    recorded = data["steps"]["gate"]
    code, data = toy.run("w2", "results.json", only={"eval_student_b"})
    assert code == 0 and "gate" not in toy.calls
    assert data["steps"]["gate"] == recorded
    # run again, the step's new outcome replaces the old one
    flat.append(True)
    code, data = toy.run("w3", "results.json")
    assert code == 0 and toy.calls.get("gate") == 1
    assert data["steps"]["gate"]["done"] and data["steps"]["gate"]["error"] is None
    assert data["steps"]["gate"]["result"] == {"flat": True}


def test_discard_unreproduced_moves_the_dependent_records_and_measures_them_again(tmp_path):
    toy = _sitting_1_of_toy(tmp_path)
    toy.loss = 0.6
    code, data = toy.run("w2", "results.json", discard=True)
    assert code == 0
    assert {"student_a", "eval_student_a", "student_b"} <= set(toy.calls)
    assert "tune" not in toy.calls  # does not depend on the teacher: kept
    assert data["steps"]["teacher"]["result"] == {"last_train_loss": 0.6}
    assert data["steps"]["eval_teacher"]["result"]["top1"] == 0.8
    gone = data["discarded"]
    assert {"teacher", "eval_teacher", "store", "inspect_store", "student_a",
            "eval_student_a"} <= set(gone)
    assert "tune" not in gone and "choose" not in gone
    assert gone["eval_student_a"][0]["result"]["top1"] == 0.8
    assert "does not reproduce" in gone["teacher"][0]["discarded"]["reason"]
    assert gone["student_a"][0]["discarded"]["reason"].startswith("depends on teacher")


def test_a_record_of_other_settings_is_refused(tmp_path):
    """The study, its constants, threads and device, and (where recorded) library versions
    are what every recorded step was computed with: a record of others is not resumed."""
    calls: dict[str, int] = {}

    def sitting(workdir, study="toy", views=4, **options):
        driver = Driver(_context(tmp_path, workdir, **options), [_internal(calls, "a")],
                        study=study, constants={"views": views})
        return driver.run()

    assert sitting("w1") == 0
    for workdir, change, refusal in (
            ("w2", {"views": 1}, "views: recorded 4, now 1"),
            ("w3", {"threads": 2}, "threads: recorded 1, now 2"),
            ("w4", {"study": "other"}, "study: recorded 'toy', now 'other'")):
        with pytest.raises(SystemExit, match=refusal):
            sitting(workdir, **change)
    assert sitting("w5") == 0 and calls == {"a": 1}  # the same settings: reused
    # a file of sitting 1 records no versions; one that does is compared by them
    sitting_1 = {"threads": 1, "device": "cpu", "scale": "full"}
    assert record.settings_differences(sitting_1, sitting_1 | {"environment": {"torch": "2"}}) \
        == []
    assert record.settings_differences(sitting_1, sitting_1 | {"threads": 2}) == \
        ["threads: recorded 1, now 2"]
    versioned = sitting_1 | {"environment": {"torch": "2.14.1"}}
    assert record.settings_differences(versioned,
                                       sitting_1 | {"environment": {"torch": "2.15"}}) == \
        ["environment torch: recorded '2.14.1', now '2.15'"]


def test_recomputed_results_are_compared_exactly_where_they_must_repeat():
    rec = record
    # sitting 1 parsed "88.62%" (0.8862000000000001); eval --json gives the fraction
    old = {"top1": 0.8862000000000001, "top5": 0.9975, "images": 10000, "data": "V"}
    new = {"top1": 0.8862, "top5": 0.9975, "images": 10000, "top1_correct": 8862,
           "top5_correct": 9975, "data": "V"}
    assert rec.differences(old, new, "eval") == []
    assert rec.differences(old, new | {"top1": 0.8861, "top1_correct": 8861}, "eval") == \
        ["top1_percent: recorded '88.62', now '88.61'"]
    # sitting 1's "99.81%" on 30,000 images is 29,942 or 29,943 correct: both reproduce it
    on_u = {"top1": 0.8904000000000001, "top5": 0.9981, "images": 30000}
    assert rec.differences(on_u, {"top1": 0.8904, "top5": 29942 / 30000, "images": 30000,
                                  "top1_correct": 26712, "top5_correct": 29942}, "eval") == []
    # records with counts (eval --json) are compared by count, exactly
    assert rec.differences(new, new | {"top5": 0.9974, "top5_correct": 9974}, "eval") == \
        ["top5_correct: recorded 9975, now 9974"]
    # a store: its statistics (and, from now on, fingerprints) repeat; bytes on disk and paths
    # need not (the store format's checksums changed them)
    store = {"path": "/a/L.zarr", "rows": 6000, "mean_top1_prob": 0.8106748250325521,
             "top1_counts": {"min": 502.0, "median": 601.0}, "bytes_on_disk": 620456}
    again = store | {"path": "/b/L.zarr", "bytes_on_disk": 650000,
                     "top1_counts": {"min": 502, "median": 601},
                     "label_sha256": {"probs": "ab"}}
    assert rec.differences(store, again, "inspect") == []
    assert rec.differences(store, again | {"mean_top1_prob": 0.8106748250325522}, "inspect")
    assert rec.differences(store, again | {"top1_counts": {"min": 503, "median": 601}},
                           "inspect") == ["top1_counts.min: recorded 502.0, now 503"]
    # the median was numpy's (a float) until 32bd51a, the lower middle count (an int) since:
    # sitting 1 recorded 601.0 for counts whose lower median is 597
    assert rec.differences(store, again | {"top1_counts": {"min": 502, "median": 597}},
                           "inspect") == []
    lower = store | {"top1_counts": {"min": 502, "median": 597}}
    assert rec.differences(lower, again | {"top1_counts": {"min": 502, "median": 598}},
                           "inspect") == ["top1_counts.median: recorded 597, now 598"]
    train = {"last_train_loss": 0.902409, "train_seconds": 868.4, "steps": 1870,
             "run_dir": "/work/fm2/full/runs/teacher_T_s0"}
    assert rec.differences(train, train | {"train_seconds": 500.0, "run_dir": "/x"}) == []
    assert rec.differences(train, train | {"last_train_loss": 0.902410})
    assert rec.merged(store, again)["label_sha256"] == {"probs": "ab"}
    assert rec.merged(store, again)["path"] == "/a/L.zarr"


# -- the command line ----------------------------------------------------------------------------

@pytest.fixture
def signals_restored():
    """The driver's command line turns SIGTERM into Ctrl-C for its process: undone after."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_the_command_line_runs_lists_and_estimates_a_study(tmp_path, capsys, signals_restored):
    base = ["--workdir", str(tmp_path / "w"), "--results", str(tmp_path / "results.json")]
    assert main(STUDY, base + ["--estimate"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["one", "minute", "per", "step", "3.0", "min"]
    assert out[1].split()[-2:] == ["0.05", "h"]                         # 180 s
    assert out[2].split()[-10:-8] == ["0.03", "h"] and "1.5x" in out[2]  # 120 s
    assert not (tmp_path / "w").exists()  # an estimate writes nothing
    assert main(STUDY, base + ["--list"]) == 0
    assert [ln.split() for ln in capsys.readouterr().out.splitlines()] == \
        [["a", "prepare", "-"], ["b", "train", "-"], ["c", "eval", "-"]]
    (tmp_path / "w" / "runs").mkdir(parents=True)
    (tmp_path / "w" / "runs" / "release").write_text("")  # b trains without waiting
    assert main(STUDY, base) == 0
    assert "all 3 steps finished" in capsys.readouterr().out
    assert main(STUDY, base + ["--list"]) == 0
    assert [ln.split()[-1] for ln in capsys.readouterr().out.splitlines()
            if not ln.startswith("from results.json")] == ["done"] * 3
    # a new workdir: the record's steps are reused (nothing pending reads their outputs)
    assert main(STUDY, ["--workdir", str(tmp_path / "w2")] + base[2:] + ["--list"]) == 0
    assert [ln.split()[-1] for ln in capsys.readouterr().out.splitlines()[1:]] == \
        ["reused"] * 3
    data = read_json(tmp_path / "results.json")
    assert data["rows"] == STUDY.rows(None) and data["scale_config"] == {"images": 10}


def test_the_command_line_refuses_bad_options(tmp_path, capsys, signals_restored):
    base = ["--workdir", str(tmp_path / "w"), "--results", str(tmp_path / "results.json")]
    for options, refusal in ((["--jobs", "0"], "--jobs and --threads must be >= 1"),
                             (["--scale", "full", "--list"], "holds a smoke run")):
        if "full" in options:
            assert main(STUDY, base + ["--list"]) == 0
        with pytest.raises(SystemExit) as exc:
            main(STUDY, base + options)
        assert exc.value.code == 2 and refusal in capsys.readouterr().err
    broken = dataclasses.replace(STUDY, rows=lambda ctx: [
        {"group": "b", "label": "b", "train_steps": ["b"], "eval_steps": ["eval_b"]}])
    with pytest.raises(SystemExit, match=r"the report's row b names unknown step eval_b"):
        main(broken, base + ["--list"])
    late = dataclasses.replace(STUDY, build=lambda ctx: list(reversed(STUDY.build(ctx))))
    with pytest.raises(SystemExit, match=r"step c depends on b, which is not a step declared "
                                         "before it"):
        main(late, base + ["--list"])


def test_check_graph_names_every_fault_of_a_graph_and_ancestors_follow_it():
    a, b = Step("a", "prepare"), Step("b", "train", deps=("a",))
    rows = [{"group": "g", "train_steps": ["b"], "eval_steps": ["e"]}]
    assert check_graph([a, b], rows[:0]) == []
    assert check_graph([a, b, Step("a", "eval")], []) == ["step a is declared twice"]
    assert check_graph([b, a], []) == [
        "step b depends on a, which is not a step declared before it"]
    assert check_graph([a, Step("c", "eval", deps=("x",))], []) == [
        "step c depends on x, which is not a step declared before it"]
    assert check_graph([a, b], rows) == ["the report's row g names unknown step e"]
    c, d = Step("c", "eval", deps=("b",)), Step("d", "eval", deps=("a",))
    graph = {s.name: s for s in (a, b, c, d)}
    assert ancestors(graph, "c") == {"a", "b"} and ancestors(graph, "a") == set()
    assert ancestors(graph, ["c", "d"]) == {"a", "b"}


# -- the shared steps read JSON, not printed text (issue 11, point 5) -------------------

def test_eval_and_dedup_results_come_from_the_commands_json(tmp_path):
    out = tmp_path / "eval.out"
    out.write_text('{"model": "m", "checkpoint": "c", "data": "d", "top1": 0.8862, '
                   '"top5": 0.9975, "images": 10000, "seconds": 3.0, "images_per_s": 3000}\n')
    assert steps.read_eval(out) == {"top1": 0.8862, "top5": 0.9975, "images": 10000,
                                  "top1_correct": 8862, "top5_correct": 9975}
    dups = tmp_path / "U_vs_V.dups"
    dups.write_text("# ssld dedup: query=/a/V.zarr pool=/a/U.zarr threshold=0.9\n"
                    "# pool_key\tquery_key\tcosine\tinliers\n"
                    "pool/1.png\tval/1.png\t0.9900\t40\npool/1.png\tval/2.png\t0.9500\t30\n"
                    "pool/3.png\tval/3.png\t0.9300\t25\n")
    (tmp_path / "U_vs_V.dups.rules.json").write_text(
        '{"query": "/a/V.zarr", "pool": "/a/U.zarr", "threshold": 0.9, "verify": "sift", '
        '"min_inliers": 20, "rule": "best", "candidates": 7, "confirmed": 3, '
        '"excluded_pool_images": 2, "thresholds": []}')
    counted = steps.count_dups(None, dups)
    assert counted["pairs"] == 3 and counted["pool_images"] == 2 and counted["val_images"] == 3
    assert counted["candidates"] == 7 and counted["confirmed"] == 3
    assert counted["excluded_pool_images"] == 2
    # the hash is of the pairs, not of the header that names the stores' paths
    moved = tmp_path / "moved.dups"
    moved.write_text(dups.read_text().replace("/a/", "/b/"))
    (tmp_path / "moved.dups.rules.json").write_text(
        (tmp_path / "U_vs_V.dups.rules.json").read_text())
    assert steps.count_dups(None, moved)["sha256"] == counted["sha256"]
