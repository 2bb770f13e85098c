"""The study driver: runs a study's steps as a resumable, recorded protocol.

A study declares its steps (``Step``: one ``ssld`` command or an internal function, its
dependencies, what it collects) and its report's table, and hands them to the driver as a
``Study``; ``main(STUDY)`` is then its command line. The driver runs the steps in dependency
order, up to ``--jobs`` at once (a step marked ``exclusive`` alone), and keeps two records:

- the workdir's state, ``WORKDIR/state/STEP.json`` per step (its command, attempts, result):
  a finished step whose outputs exist is skipped, an interrupted training run continues with
  ``--resume`` from its ``last.pt``, a step with a ``rerun_flag`` reruns with it, and a
  finished step whose command would now differ is refused;
- the results file (``results/SCALE.json`` beside the study), rewritten after every step: each
  step's command, wall time, attempts and result, the report's rows, the sittings. When the
  workdir is gone (a new machine) it is the record to resume from: ``record.py`` decides which
  recorded steps are reused and which are recomputed and compared with the record.

A step that fails is recorded with its error and stops only the steps that wait for its
outputs (a step whose result is already known is not waited on); a failure recorded in an
earlier sitting stays in the results file until the step runs again. ``--only`` runs some
steps and their dependencies, ``--list`` shows every step's state, ``--estimate`` prints the
study's expected run time. Ctrl-C or ``kill`` stops the running steps; the same command
resumes.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from experiments import record

__all__ = ["Context", "Driver", "Estimate", "Step", "Study", "ancestors", "check_graph",
           "main", "make_parser", "now", "read_json", "run", "write_json"]


def now() -> str:
    """UTC now, to the second (the results file's times)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_json(path: Path) -> Any:
    """The JSON in ``path``."""
    return json.loads(path.read_text())


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file (never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def tail(path: Path, lines: int = 3) -> str:
    """The last ``lines`` non-empty lines of a log, joined (tqdm's carriage returns split)."""
    try:
        text = path.read_text().replace("\r", "\n").splitlines()
    except OSError:
        return ""
    return " | ".join(ln.strip() for ln in text[-lines:] if ln.strip())


# ----------------------------------------------------------------------------------------------
# what a study declares


@dataclass
class Step:
    """One unit of the protocol: a subprocess (``command``) or a driver-internal function.

    ``command(ctx)`` returns the argv (built when the dependencies are done, so it can use
    their results); ``collect(ctx)`` reads what the step produced into a JSON-able dict;
    ``outputs(ctx)`` lists paths that must exist for a finished step to count as finished.
    ``kind`` tells resuming from the record what the step reads (``record.py``): the data
    (``prepare``, ``split``) is recomputed whenever a command runs, a check (``eval``,
    ``inspect``) is recomputed with what it checks, a ``choose`` reads only results.
    """

    name: str
    kind: str  # prepare|split|train|eval|infer|dedup|select|merge|inspect|choose|labels
    deps: tuple[str, ...] = ()
    command: Optional[Callable[["Context"], list[str]]] = None
    internal: Optional[Callable[["Context"], dict]] = None
    collect: Callable[["Context"], dict] = lambda ctx: {}
    outputs: Callable[["Context"], list[Path]] = lambda ctx: []
    resumable_train: Optional[Path] = None  # a train-student run dir: resume with --resume
    rerun_flag: Optional[str] = None        # e.g. --overwrite: added when a failed try left output
    exclusive: bool = False                 # runs alone (its wall time is compared with others)
    group: str = ""
    stdout: bool = False                    # the command's stdout goes to logs/STEP.out alone


class Context:
    """The workdir's layout (``data``, ``splits``, ``stores``, ``runs``, ``logs``, ``state``),
    the options, the scale, and the results of finished steps (``result(step)``)."""

    def __init__(self, args: argparse.Namespace, scale: Any):
        self.args, self.scale = args, scale
        self.work = Path(args.workdir).resolve()
        self.data = Path(args.data).resolve() if args.data else self.work / "data"
        self.images = self.data / "images"
        self.splits = self.work / "splits"
        self.stores = self.work / "stores"
        self.runs = self.work / "runs"
        self.logs = self.work / "logs"
        self.state_dir = self.work / "state"
        self.teacher, self.student = args.teacher, args.student
        self.results: dict[str, dict] = {}   # step name -> collected result

    # list files written by the split step
    def split(self, name: str) -> str:
        return str(self.splits / f"{name}.txt")

    def store(self, name: str) -> str:
        return str(self.stores / f"{name}.zarr")

    def run_dir(self, name: str) -> Path:
        return self.runs / name

    def result(self, step: str) -> dict:
        return self.results[step]


@dataclass(frozen=True)
class Estimate:
    """A study's expected run time at measured throughput (``--estimate``)."""

    parts: dict[str, float]    # seconds per part of the protocol, one step at a time
    two_jobs_speedup: float    # measured throughput of two 1-thread jobs over one job


@dataclass(frozen=True)
class Study:
    """A protocol as the driver runs it: its steps, its report's table, its options.

    ``build(ctx)`` returns the steps in the order they start when ready (every dependency
    before its dependents); ``rows(ctx)`` the report's table, one dict per row with at least
    ``group``, ``label``, ``train_steps`` and ``eval_steps`` (step names: checked to exist).
    ``name``, the scale, ``constants`` and the models are recorded in the results file, and a
    record written with others is refused on resume.
    """

    name: str                                           # the results file's "study"
    description: str                                    # the first line of --help
    scales: Mapping[str, Any]                           # --scale NAME -> sizes (a dataclass)
    build: Callable[[Context], list[Step]]
    rows: Callable[[Context], list[dict]]
    estimate: Callable[[Context, list[Step]], Estimate]
    results_dir: Path                                   # --results default: DIR/SCALE.json
    teacher: str                                        # --teacher's default
    student: str                                        # --student's default
    constants: Mapping[str, Any] = field(default_factory=dict)  # e.g. input size, views
    extra: Optional[Callable[[Context], dict]] = None   # more fields of the results file
    options: Optional[Callable[[argparse.ArgumentParser], None]] = None  # its own options


# ----------------------------------------------------------------------------------------------
# the scheduler: dependencies, resume, up to --jobs steps at once, exclusive steps alone


class Driver:
    """Runs ``steps`` in ``ctx``'s workdir and keeps the results file (module docstring).

    ``study`` is the study's name, ``rows`` its report's table, ``constants`` and ``extra``
    more fields of the results file (``Study``)."""

    def __init__(self, ctx: Context, steps: list[Step], *, study: str,
                 rows: Callable[[Context], list[dict]] = lambda ctx: [],
                 constants: Optional[Mapping[str, Any]] = None,
                 extra: Optional[Callable[[Context], dict]] = None):
        self.ctx, self.steps = ctx, {s.name: s for s in steps}
        self.rows, self.study, self.extra = rows, study, extra
        self.constants = dict(constants or {})
        self.order = [s.name for s in steps]
        self.state: dict[str, dict] = {}
        self.lock = threading.Lock()
        self.procs: dict[str, subprocess.Popen] = {}
        self.results_path = Path(ctx.args.results).resolve()
        for name in self.order:
            path = ctx.state_dir / f"{name}.json"
            self.state[name] = read_json(path) if path.exists() else {"name": name,
                                                                       "attempts": []}
        # the results file as the last sitting left it: the record to resume from
        self.saved = read_json(self.results_path) if self.results_path.exists() else {}
        self.discarded: dict[str, list] = dict(self.saved.get("discarded") or {})
        self.reused: set[str] = set()          # recorded steps taken as they are
        self.expected: dict[str, dict] = {}    # recomputed step -> its recorded entry
        self.to_discard: list[tuple[str, str]] = []  # (step, reason), applied by the loop
        self.environment, self.package = record.environment(), record.package()
        self._session_iso = now()

    # -- state
    def save_state(self, name: str) -> None:
        """The workdir's own state of a step (the record stays in the results file)."""
        write_json(self.ctx.state_dir / f"{name}.json",
                   {k: v for k, v in self.state[name].items() if k != "record"})

    def is_done(self, name: str) -> bool:
        st, step = self.state[name], self.steps[name]
        if not st.get("done"):
            return False
        missing = [p for p in step.outputs(self.ctx) if not Path(p).exists()]
        if missing:
            print(f"[{name}] marked finished but {missing[0]} is missing: running it again",
                  flush=True)
            st["done"] = False
            return False
        return True

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        threads = str(self.ctx.args.threads)
        # SSLD_THREADS is every ssld command's --threads default (the commands stay as recorded)
        env.update(SSLD_THREADS=threads, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads,
                   HF_HUB_OFFLINE="1",
                   PYTHONUNBUFFERED="1")
        return env

    def settings(self) -> dict[str, Any]:
        """What every step of the results file was computed with (``record.SETTINGS``)."""
        ctx = self.ctx
        return {"study": self.study, "scale": ctx.args.scale,
                "scale_config": record.json_round_trip(asdict(ctx.scale)),
                "teacher": ctx.teacher, "student": ctx.student, **self.constants,
                "threads": ctx.args.threads, "device": ctx.args.device,
                "environment": self.environment}

    # -- resuming: the workdir first, then the record
    def load_finished(self, wanted: set[str]) -> None:
        """Results of the steps finished in this workdir, then of those the results file
        records (reused or recomputed: ``adopt_record``)."""
        for name in self.order:
            if self.is_done(name):
                self.check_command(name)
                self.ctx.results[name] = self.state[name]["result"]
        self.adopt_record(wanted)

    def adopt_record(self, wanted: set[str]) -> None:
        """Take the steps the results file records as finished and this workdir does not
        hold: reused as recorded, or recomputed and compared (``record.plan``). Refuses a
        file recorded with other settings or versions, a recorded step whose command is not
        the one it would run now, and a workdir result that differs from the record."""
        ctx, saved_steps = self.ctx, self.saved.get("steps") or {}
        if not saved_steps:
            return
        wrong = record.settings_differences(self.saved, self.settings())
        if wrong:
            raise SystemExit(f"{self.results_path} records steps computed with other settings:"
                             "\n  " + "\n  ".join(wrong) + "\nuse another --results, or these "
                             "settings")
        cpu = (self.saved.get("environment") or {}).get("cpu")
        if cpu and cpu != self.environment["cpu"]:
            print(f"note: the record was computed on {cpu}, this is {self.environment['cpu']}; "
                  "recomputed steps show whether results are the same here", flush=True)
        for name, entry in saved_steps.items():
            if name not in self.steps and entry.get("done"):
                self.discarded.setdefault(name, []).append(
                    entry | {"discarded": {"session": self._session_iso,
                                           "reason": "no such step in the protocol now"}})
        usable, conflicts, recomputed_here = [], [], set()
        for name in self.topological():  # a step's inputs are settled before it
            entry, step = saved_steps.get(name), self.steps[name]
            if not entry or not entry.get("done") or entry.get("result") is None:
                continue
            if name in ctx.results:  # finished in this workdir as well: they must agree
                diffs = record.differences(entry["result"], ctx.results[name], step.kind)
                if diffs:
                    conflicts.append(f"{name}: the workdir's result is not the record's: "
                                     f"{diffs[0]}")
                entry["result"] = record.merged(entry["result"], ctx.results[name])
                self.state[name]["record"] = entry
                if any(note.get("session") == self.state[name].get("session")
                       for note in entry.get("recomputed", [])):
                    recomputed_here.add(name)  # for the record, by an earlier start here
                continue
            if not all(d in ctx.results for d in step.deps):
                continue  # an input of it is not recorded: it runs again
            if step.command is not None:
                cmd = step.command(ctx)
                if record.comparable(cmd, str(ctx.work), str(ctx.data)) != record.comparable(
                        entry["command"], self.saved.get("workdir"), self.saved.get("data")):
                    conflicts.append(f"{name} is recorded with another command:\n    was: "
                                     f"{entry['command']}\n    now: {' '.join(cmd)}")
                    continue
                if entry["command"] != " ".join(cmd):  # the same command elsewhere
                    entry.setdefault("command_as_run", entry["command"])
                    entry["command"] = " ".join(cmd)
            ctx.results[name] = entry["result"]
            usable.append(name)
        if conflicts:
            raise SystemExit(f"{self.results_path} does not fit this run:\n  "
                             + "\n  ".join(conflicts) + "\nuse another --results (or "
                             "--workdir), or restore the protocol that wrote it")
        graph = dict(deps={n: s.deps for n, s in self.steps.items()},
                     kinds={n: s.kind for n, s in self.steps.items()},
                     has_command={n: s.command is not None for n, s in self.steps.items()})
        plan = record.plan(**graph, recorded=usable, wanted=wanted,
                           done_here={n for n in ctx.results if n not in usable},
                           recomputed_here=recomputed_here)
        for name, deps in record.base_deps(plan, **graph).items():
            self.steps[name].deps = deps
        for name in usable:
            st = self.state[name]
            st["record"] = saved_steps[name]
            if name in plan.recompute:
                del ctx.results[name]
                self.expected[name] = saved_steps[name]
                st["done"] = False
            else:  # in memory only: nothing of it is in this workdir
                st.update(done=True, result=saved_steps[name]["result"])
                self.reused.add(name)
        recompute = [n for n in self.order if n in plan.recompute]
        print(f"from {self.results_path.name}: {len(self.reused)} recorded steps reused, "
              f"{len(recompute)} recomputed and compared with the record"
              + (f" ({', '.join(recompute)})" if recompute else ""), flush=True)

    def check_reproduced(self, name: str, result: dict, seconds: float) -> dict:
        """A recomputed step's result against the record: the record (with the new
        fingerprints) when equal; otherwise the step fails, or with --discard-unreproduced
        the recorded steps that depend on it are discarded (``apply_discards``)."""
        entry, kind = self.expected.pop(name), self.steps[name].kind
        diffs = record.differences(entry["result"], result, kind)
        note = {"session": self._session_iso, "wall_s": round(seconds, 2),
                "reproduced": not diffs}
        with self.lock:
            entry.setdefault("recomputed", []).append(note)
            if not diffs:
                entry["result"] = record.merged(entry["result"], result)
                return entry["result"]
            note.update(differences=diffs, result=result)
        reason = (f"recomputed {name} does not reproduce the record: " + "; ".join(diffs[:4])
                  + (f" (+{len(diffs) - 4} more)" if len(diffs) > 4 else ""))
        if getattr(self.ctx.args, "discard_unreproduced", False):
            self.to_discard.append((name, reason))
            return result
        raise RuntimeError(
            reason + ". Rows recorded from its outputs are not mixed with rows from these: what "
            "depends on it waits. Rerun with --discard-unreproduced to move the recorded steps "
            "that depend on it to the results file's 'discarded' list and measure them again, "
            "or use another --results")

    def apply_discards(self) -> None:
        """Move the record of every step that depends on an unreproduced one to
        ``discarded`` (with the reason); those not run in this sitting run again."""
        while self.to_discard:
            name, reason = self.to_discard.pop(0)
            step = self.steps[name]
            # an evaluation or inspect that differs says its checkpoint or store differs
            roots = list(step.deps) if step.kind in record.CHECKS else [name]
            victims = set(roots) | {name} | self.dependents(roots)
            moved = []
            for victim in self.order:
                st = self.state[victim]
                if victim not in victims or st.get("record") is None:
                    continue
                why = reason if victim == name else f"depends on {name}: {reason}"
                self.discarded.setdefault(victim, []).append(
                    st["record"] | {"discarded": {"session": self._session_iso, "reason": why}})
                st["record"] = None
                self.expected.pop(victim, None)
                if victim in self.reused:  # taken from the record: measure it again
                    self.reused.discard(victim)
                    self.ctx.results.pop(victim, None)
                    st.update(done=False, result=None)
                moved.append(victim)
            print(f"[{now()}] discarded the record of {len(moved)} step(s) that depend on "
                  f"{name} (kept under 'discarded' in {self.results_path.name}); they run "
                  f"again: {', '.join(moved)}", flush=True)

    def urgency(self, name: str) -> tuple[bool, bool, bool]:
        """Ready steps start in list order, except that checks of the record come first (a
        mismatch should stop its dependents early), then evaluations (seconds; until its
        evaluation is recorded, a finished run lives only in the workdir, which a sitting's
        end takes), then interrupted training runs (their epochs die with the workdir too)."""
        step = self.steps[name]
        partial = step.resumable_train is not None and \
            (self.ctx.run_dir(str(step.resumable_train)) / "last.pt").exists()
        return name not in self.expected, step.kind != "eval", not partial

    def topological(self) -> list[str]:
        """The steps with every dependency before its dependents (else in list order)."""
        out: list[str] = []
        seen: set[str] = set()

        def visit(name: str) -> None:
            if name not in seen:
                seen.add(name)
                for dep in self.steps[name].deps:
                    visit(dep)
                out.append(name)

        for name in self.order:
            visit(name)
        return out

    def dependents(self, names: list[str]) -> set[str]:
        out: set[str] = set()
        todo = list(names)
        while todo:
            current = todo.pop()
            for other in self.order:
                if current in self.steps[other].deps and other not in out:
                    out.add(other)
                    todo.append(other)
        return out

    # -- one step
    def finished_unseen(self, step: Step) -> Optional[dict]:
        """The result of a training run that reached its last epoch after the driver that
        started it died (its process outlives the driver), or None: such a run is collected,
        not resumed (``--resume`` refuses a finished run)."""
        if step.resumable_train is None:
            return None
        if not (self.ctx.run_dir(str(step.resumable_train)) / "last.pt").exists():
            return None
        try:
            return step.collect(self.ctx)
        except (RuntimeError, OSError, ValueError, KeyError):
            return None   # not finished (or unreadable): resume it

    def run_step(self, name: str) -> bool:
        ctx, step, st = self.ctx, self.steps[name], self.state[name]
        start, t0 = now(), time.perf_counter()
        attempt = {"start": start, "wall_s": None, "rc": None}
        rc = 0
        try:
            if step.internal is not None:
                st["attempts"].append(attempt)
                result = step.internal(ctx)
            else:
                cmd = step.command(ctx)
                base = list(cmd)
                finished = self.finished_unseen(step) if st.get("command") == base else None
                if finished is not None:
                    cmd = None   # the run ended while no driver watched it (the driver died)
                elif step.resumable_train is not None and \
                        (ctx.run_dir(str(step.resumable_train)) / "last.pt").exists():
                    cmd = cmd + ["--resume"]
                elif step.rerun_flag and any(Path(p).exists() for p in step.outputs(ctx)):
                    cmd = cmd + [step.rerun_flag]
                if st.get("command") and st["command"] != base and st.get("done"):
                    raise RuntimeError(f"{name} finished earlier with another command; use a "
                                       f"new --workdir or delete {ctx.state_dir / name}.json")
                st["command"] = base
                st["attempts"].append(attempt)
                self.save_state(name)
                if cmd is None:
                    result = finished
                else:
                    ctx.logs.mkdir(parents=True, exist_ok=True)
                    with open(ctx.logs / f"{name}.log", "a") as log, \
                            open(ctx.logs / f"{name}.out", "w") if step.stdout else log as out:
                        log.write(f"\n### {start} $ {' '.join(cmd)}\n")
                        log.flush()
                        proc = subprocess.Popen(cmd, stdout=out,
                                                stderr=log if step.stdout else subprocess.STDOUT,
                                                env=self.env(), start_new_session=True)
                        with self.lock:
                            self.procs[name] = proc
                        rc = proc.wait()
                        with self.lock:
                            self.procs.pop(name, None)
                    if rc != 0:
                        raise RuntimeError(f"exit status {rc}; see {ctx.logs / name}.log: "
                                           f"{tail(ctx.logs / f'{name}.log')}")
                    result = step.collect(ctx)
            if name in self.expected:
                result = self.check_reproduced(name, result, time.perf_counter() - t0)
            ok, error = True, None
        except Exception as exc:  # noqa: BLE001 - a failed step must not stop the others
            ok, error, result = False, f"{type(exc).__name__}: {exc}", None
            rc = rc or 1
        attempt.update(wall_s=round(time.perf_counter() - t0, 2), rc=rc if not ok else 0)
        with self.lock:
            st["done"], st["error"] = ok, error
            if ok:
                st["result"], st["session"] = result, self._session_iso
                ctx.results[name] = result
            self.save_state(name)
        return ok

    # -- the loop
    def run(self, only: Optional[set[str]] = None) -> int:
        ctx = self.ctx
        wanted = set(self.order) if only is None else self.with_deps(only)
        self.load_finished(wanted)
        failed: set[str] = set()
        running: dict[str, threading.Thread] = {}
        finished: list[tuple[str, bool]] = []
        cond = threading.Condition()
        session_start = time.perf_counter()

        def worker(name: str) -> None:
            ok = self.run_step(name)
            with cond:
                finished.append((name, ok))
                cond.notify()

        def blocked(name: str) -> bool:
            return any(d in failed or self.blocked_by_failure(d, failed)
                       for d in self.steps[name].deps)

        try:
            while True:
                with cond:
                    while finished:
                        name, ok = finished.pop(0)
                        running.pop(name).join()
                        wall = self.state[name]["attempts"][-1]["wall_s"]
                        if ok:
                            print(f"[{now()}] done   {name} ({wall:.1f} s)", flush=True)
                        else:
                            failed.add(name)
                            print(f"[{now()}] FAILED {name} ({wall:.1f} s): "
                                  f"{self.state[name]['error']}", flush=True)
                        self.apply_discards()
                        self.write_results(session_start)
                pending = [n for n in self.order if n in wanted and n not in ctx.results
                           and n not in failed and n not in running and not blocked(n)]
                ready = sorted((n for n in pending
                                if all(d in ctx.results for d in self.steps[n].deps)),
                               key=self.urgency)
                exclusive_running = any(self.steps[n].exclusive for n in running)
                started = False
                for name in ready:
                    step = self.steps[name]
                    if exclusive_running or len(running) >= ctx.args.jobs:
                        break
                    if step.exclusive and running:
                        continue  # waits until the machine is free of this driver's steps
                    if step.internal is not None:  # quick, in this thread
                        ok = self.run_step(name)
                        print(f"[{now()}] {'done  ' if ok else 'FAILED'} {name}"
                              + ("" if ok else f": {self.state[name]['error']}"), flush=True)
                        if not ok:
                            failed.add(name)
                        self.apply_discards()
                        self.write_results(session_start)
                        started = True
                        break
                    print(f"[{now()}] start  {name}", flush=True)
                    thread = threading.Thread(target=worker, args=(name,), daemon=True)
                    running[name] = thread
                    thread.start()
                    started = True
                    if step.exclusive:
                        break
                if started:
                    continue
                if not running:
                    break
                with cond:
                    if not finished:
                        cond.wait(timeout=5)
        except KeyboardInterrupt:
            print("interrupted: stopping the running steps (rerun the same command to resume)",
                  flush=True)
            with self.lock:
                for proc in self.procs.values():
                    try:
                        os.killpg(proc.pid, signal.SIGTERM)
                    except ProcessLookupError:
                        pass
            for thread in running.values():
                thread.join(timeout=60)
            self.write_results(session_start)
            return 130
        self.write_results(session_start)
        left = [n for n in self.order if n in wanted and n not in ctx.results]
        if failed or left:
            print(f"{len(failed)} step(s) failed: {', '.join(sorted(failed))}; "
                  f"{len(left)} not finished", flush=True)
            return 1
        print(f"all {len(wanted)} steps finished; results in {self.results_path}", flush=True)
        return 0

    def check_command(self, name: str) -> None:
        """Refuse to reuse a finished step whose command would now be different."""
        step, saved = self.steps[name], self.state[name].get("command")
        if step.command is None or saved is None or \
                not all(d in self.ctx.results for d in step.deps):
            return
        now_cmd, work = step.command(self.ctx), str(self.ctx.work)
        if record.comparable(now_cmd, work) != record.comparable(saved, work):
            raise SystemExit(
                f"step {name} finished earlier with another command:\n  was: {' '.join(saved)}"
                f"\n  now: {' '.join(now_cmd)}\nuse a new --workdir, or delete "
                f"{self.ctx.state_dir / name}.json and the step's outputs to redo it")

    def blocked_by_failure(self, name: str, failed: set[str]) -> bool:
        """Whether ``name`` waits on a failed step. A finished step (its result recorded or
        computed here) does not: its dependents read its result, not what failed above it."""
        if name in failed:
            return True
        if name in self.ctx.results:
            return False
        return any(self.blocked_by_failure(d, failed) for d in self.steps[name].deps)

    def with_deps(self, names: set[str]) -> set[str]:
        """The steps matching the ``--only`` patterns, with everything they wait for."""
        matched = [n for n in self.order if any(re.fullmatch(p, n) for p in names)]
        if not matched:
            raise SystemExit(f"--only {' '.join(sorted(names))} matches no step")
        return ancestors(self.steps, matched) | set(matched)

    # -- results
    def write_results(self, session_start: float) -> None:
        """The results file: every step (a recorded step as its record, with what this sitting
        recomputed of it), the discarded records, the sittings with their package and
        environment."""
        ctx, saved_steps = self.ctx, self.saved.get("steps") or {}
        with self.lock:
            steps = {}
            for name in self.order:
                st = self.state[name]
                if st.get("record") is not None:
                    steps[name] = st["record"]
                    continue
                earlier = saved_steps.get(name) or {}
                if earlier.get("error") and not st.get("attempts") and not st.get("done"):
                    # an earlier sitting's failure (study 2's gate), not tried in this one:
                    # an outcome of the protocol, kept until the step runs again
                    steps[name] = earlier
                    continue
                walls = [a["wall_s"] for a in st.get("attempts", []) if a["wall_s"] is not None]
                steps[name] = {
                    "kind": self.steps[name].kind, "group": self.steps[name].group,
                    "alone": self.steps[name].exclusive,
                    "done": bool(st.get("done")), "error": st.get("error"),
                    "command": " ".join(st["command"]) if st.get("command") else None,
                    "wall_s": round(sum(walls), 2) if walls else None,
                    "attempts": len(st.get("attempts", [])),
                    "interrupted_attempts": sum(1 for a in st.get("attempts", [])
                                                if a["wall_s"] is None),
                    "session": st.get("session"), "result": st.get("result")}
            sessions = list(self.saved.get("sessions", []))
            this = {"started": self._session_iso,
                    "wall_s": round(time.perf_counter() - session_start, 1),
                    "package": self.package, "environment": self.environment}
            if sessions and sessions[-1]["started"] == this["started"]:
                sessions[-1] = this
            else:
                sessions.append(this)
            self.saved["sessions"] = sessions
            data = {"study": self.study,
                    "scale": ctx.args.scale, "updated": now(), "workdir": str(ctx.work),
                    "data": str(ctx.data), "teacher": ctx.teacher, "student": ctx.student,
                    **self.constants, "threads": ctx.args.threads,
                    "jobs": ctx.args.jobs, "device": ctx.args.device,
                    "scale_config": asdict(ctx.scale),
                    # the versions the recorded steps are checked against (the first ones
                    # recorded; sitting 1's steps ran before versions were recorded)
                    "environment": self.saved.get("environment") or self.environment,
                    "sessions": sessions, "rows": self.rows(ctx), "steps": steps}
            if self.discarded:
                data["discarded"] = self.discarded
            if self.extra is not None:
                data.update(self.extra(ctx))
            write_json(self.results_path, data)


def ancestors(steps: Mapping[str, Step], names) -> set[str]:
    """Every step that the steps ``names`` (one name or several) wait for, directly or not."""
    out: set[str] = set()
    todo = [names] if isinstance(names, str) else list(names)
    while todo:
        for dep in steps[todo.pop()].deps:
            if dep not in out:
                out.add(dep)
                todo.append(dep)
    return out


def check_graph(steps: list[Step], rows: list[dict]) -> list[str]:
    """What is wrong with a study's graph (nothing: []): a step named twice, a dependency that
    is not a step or comes after its dependent (``Study.build`` lists every dependency
    first), a report row naming a step that does not exist."""
    problems, seen = [], set()
    for step in steps:
        if step.name in seen:
            problems.append(f"step {step.name} is declared twice")
        for dep in step.deps:
            if dep not in seen:
                problems.append(f"step {step.name} depends on {dep}, which is not a step "
                                "declared before it")
        seen.add(step.name)
    problems += [f"the report's row {row['group']} names unknown step {n}" for row in rows
                 for n in row["train_steps"] + row["eval_steps"] if n not in seen]
    return problems


# ----------------------------------------------------------------------------------------------
# the command line


def make_parser(study: Study) -> argparse.ArgumentParser:
    """The options every study takes, then the study's own (``Study.options``)."""
    parser = argparse.ArgumentParser(description=study.description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True,
                        help="Folder for data, stores, runs, logs and step state (resumable).")
    parser.add_argument("--scale", choices=sorted(study.scales), default="smoke",
                        help="smoke: a few hundred images, 2 epochs, minutes (proves the driver "
                             "runs; its numbers mean nothing); full: the study.")
    parser.add_argument("--data", default=None,
                        help="An existing `ssld prepare fashion-mnist` folder (default: "
                             "WORKDIR/data, prepared on the first run).")
    parser.add_argument("--results", default=None,
                        help="Results JSON (default: results/SCALE.json next to this script).")
    parser.add_argument("--jobs", type=int, default=2,
                        help="Steps run at once (each with --threads torch threads).")
    parser.add_argument("--threads", type=int, default=1,
                        help="OMP_NUM_THREADS of every ssld process (1 is fastest on the busy "
                             "2-core machine: see the README).")
    parser.add_argument("--num-workers", type=int, default=0,
                        help="Decoding workers of train-student / infer-teacher / eval (0: decode "
                             "28x28 PNGs in-process).")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--teacher", default=study.teacher)
    parser.add_argument("--student", default=study.student)
    parser.add_argument("--ssld", default=None, help="The ssld console script (default: the one "
                        "next to this Python, else ssld on PATH).")
    parser.add_argument("--only", nargs="+", default=None, metavar="REGEX",
                        help="Run only the steps matching these patterns, plus their "
                             "dependencies (e.g. --only 'teacher_s.*').")
    parser.add_argument("--list", action="store_true",
                        help="Print the steps with their state (done here, reused or recomputed "
                             "from the results file, failed) and exit.")
    parser.add_argument("--discard-unreproduced", action="store_true",
                        help="When a recorded step, recomputed because a pending step needs its "
                             "outputs, does not reproduce its recorded result: move the recorded "
                             "steps that depend on it to the results file's 'discarded' list and "
                             "run them again (default: stop them, and say so).")
    parser.add_argument("--estimate", action="store_true",
                        help="Print the expected run time at the measured throughput and exit.")
    if study.options is not None:
        study.options(parser)
    return parser


def main(study: Study, argv: Optional[list[str]] = None) -> int:
    """The command line of ``study``: parse ``argv`` (default: ``sys.argv``) and ``run``."""
    parser = make_parser(study)
    return run(study, parser, parser.parse_args(argv))


def run(study: Study, parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Check the options, then --estimate, --list or run the study's steps."""
    if args.ssld is None:
        beside = Path(sys.executable).parent / "ssld"
        args.ssld = str(beside) if beside.exists() else (shutil.which("ssld") or "ssld")
    if args.results is None:
        args.results = str(study.results_dir / f"{args.scale}.json")
    if args.jobs < 1 or args.threads < 1:
        parser.error("--jobs and --threads must be >= 1")
    scale = study.scales[args.scale]
    if args.estimate:
        ctx = Context(args, scale)
        estimate = study.estimate(ctx, study.build(ctx))
        total = sum(estimate.parts.values())
        for name, seconds in estimate.parts.items():
            print(f"{name:<54} {seconds / 60:6.1f} min")
        print(f"{'total, one step at a time':<54} {total / 3600:6.2f} h")
        speedup = estimate.two_jobs_speedup
        print(f"{'total, --jobs 2':<54} {total / speedup / 3600:6.2f} h "
              f"(at the measured {speedup}x of two 1-thread jobs)")
        return 0
    ctx = Context(args, scale)
    ctx.work.mkdir(parents=True, exist_ok=True)
    marker = ctx.work / "scale.txt"
    if marker.exists() and marker.read_text().strip() != args.scale:
        parser.error(f"{ctx.work} holds a {marker.read_text().strip()} run; use another "
                     "--workdir for --scale " + args.scale)
    marker.write_text(args.scale + "\n")
    steps = study.build(ctx)
    problems = check_graph(steps, study.rows(ctx))
    if problems:
        raise SystemExit("internal error in the study's protocol: " + "; ".join(problems[:5]))
    driver = Driver(ctx, steps, study=study.name, rows=study.rows,
                    constants=study.constants, extra=study.extra)

    def stop(signum, frame):  # `kill PID` stops the running steps as Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)  # also when started in the background (SIGINT ignored)
    if args.list:
        driver.load_finished(set(driver.order))
        for name in driver.order:
            st = driver.state[name]
            state = ("reused" if name in driver.reused else
                     "recompute" if name in driver.expected else
                     "done" if st.get("done") else ("failed" if st.get("error") else "-"))
            print(f"{name:<36} {driver.steps[name].kind:<8} {state}")
        return 0
    print(f"ssld {study.name}, scale {args.scale}: {len(driver.order)} steps, "
          f"{args.jobs} at once, {args.threads} thread(s) each; workdir {ctx.work}", flush=True)
    return driver.run(set(args.only) if args.only else None)
