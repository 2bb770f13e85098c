"""Resuming a study from its committed results file: the one state that outlives a machine.

A sitting may start on a fresh machine where the workdir (data, stores, checkpoints, state
files) is gone and only the repository survives, with the results JSON the driver rewrites
after every step (each step's command, wall time and collected result). ``plan`` sorts every
step of the protocol by that record and by what the workdir holds:

- **reused**: recorded as finished with the same command, and no step that still has to run
  reads its outputs (a tuning run, a finished student row and its evaluation: their only
  product is a number). It is not run again.
- **recomputed**: recorded, but a step that has to run reads its outputs (the teacher's
  checkpoint, a store, the split files), or it checks such an output (the evaluation of a
  recomputed checkpoint, the inspect of a recomputed store). It runs again and its new result
  must equal the recorded one (``differences``): then the rows measured from the recorded
  outputs and the rows measured from the new ones are rows of the same teacher and stores.
  If it does not, the driver refuses to mix them (the step fails, and what depends on it
  waits) unless told to discard the recorded rows that depend on it.
- **pending**: not recorded (or recorded unfinished): runs.

The data steps (``prepare``, the split lists) are recomputed whenever a command runs, since
every command reads their files. Commands are compared without the ``ssld`` executable's path,
the workdir's location, ``--src`` (where the raw data was found; the prepared lists' hashes
are compared instead) and options that never change a result (``--num-workers``) or only its
printed form (``--json``).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

# kinds of steps that read only the results of their dependencies, never their files
RESULT_ONLY = frozenset({"choose"})
# kinds that every command reads the files of (recomputed whenever anything runs)
BASE = frozenset({"prepare", "split"})
# kinds that check the output of their dependency (recomputed with it, and compared)
CHECKS = frozenset({"eval", "inspect"})

# result fields that differ between two identical computations (timings, where files are,
# bytes on disk, which the store's compression settings change) and are not compared
VOLATILE = frozenset({"train_seconds", "images_per_s", "seconds", "metrics_rows_missing",
                      "bytes_on_disk", "bytes_per_row_view", "missing", "path", "store",
                      "file", "run_dir", "source", "wall_s"})

# library versions that change floating-point results: a record of other versions is refused
VERSIONED = ("python", "torch", "timm", "numpy")

# options left out of a command before comparing it with the record: a value after each
DROP_WITH_VALUE = frozenset({"--num-workers", "--src"})
DROP_FLAGS = frozenset({"--json"})


def comparable(command: str | list[str], workdir: str, data: Optional[str] = None) -> list[str]:
    """``command`` as compared between sittings (see the module docstring)."""
    argv = command.split(" ") if isinstance(command, str) else [str(a) for a in command]
    out, skip = [], False
    for arg in argv[1:]:  # argv[0]: the ssld executable, wherever it is installed
        if skip:
            skip = False
        elif arg in DROP_WITH_VALUE:
            skip = True
        elif arg not in DROP_FLAGS:
            out.append(_placeholder(arg, workdir, data))
    return out


def _placeholder(arg: str, workdir: str, data: Optional[str]) -> str:
    for prefix, name in ((data, "DATA"), (workdir, "WORKDIR")):
        if prefix and (arg == prefix or arg.startswith(prefix.rstrip("/") + "/")):
            return name + arg[len(prefix.rstrip("/")):]
    return arg


def settings_differences(record: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """The fields in which a results file differs from this run's settings.

    ``current``: the top-level fields of the results file that every step is computed with
    (``Driver.settings``: the study, scale, models, the study's constants, threads, device)
    and its ``environment``, of which the VERSIONED fields are compared. A field the file does
    not hold is not compared (versions: files of study 1's sitting 1 do not record them)."""
    out = [f"{key}: recorded {record.get(key)!r}, now {current.get(key)!r}"
           for key in current if key != "environment" and key in record
           and record.get(key) != current.get(key)]
    recorded_env, env = record.get("environment") or {}, current.get("environment") or {}
    out += [f"environment {key}: recorded {recorded_env[key]!r}, now {env.get(key)!r}"
            for key in VERSIONED if key in recorded_env and recorded_env[key] != env.get(key)]
    return out


@dataclass
class Plan:
    reused: set[str]      # recorded, not run again: nothing pending reads their outputs
    recompute: set[str]   # recorded, run again and compared with the record
    pending: set[str]     # not recorded: run


def plan(deps: Mapping[str, tuple[str, ...]], kinds: Mapping[str, str],
         has_command: Mapping[str, bool], recorded: Iterable[str], done_here: Iterable[str],
         wanted: Iterable[str], recomputed_here: Iterable[str] = ()) -> Plan:
    """Which recorded steps are reused and which are recomputed (module docstring).

    ``deps``/``kinds``/``has_command`` describe the steps; ``recorded``: finished in the results
    file with the same command; ``done_here``: finished in this workdir (outputs present);
    ``wanted``: the steps this run is asked for (``--only``); ``recomputed_here``: steps of
    ``done_here`` that this workdir recomputed for the record (the driver was restarted after
    them): their checks still run.
    """
    done_here = set(done_here)
    recomputed_here = set(recomputed_here)
    usable = {n for n in recorded if n not in done_here}
    pending = {n for n in wanted if n not in done_here and n not in usable}
    need: set[str] = set()

    def needs_files_of(names: Iterable[str]) -> None:
        todo = list(names)
        while todo:
            name = todo.pop()
            if kinds[name] in RESULT_ONLY:
                continue
            for dep in deps[name]:
                if dep in usable and dep not in need and kinds[dep] not in RESULT_ONLY:
                    need.add(dep)
                    todo.append(dep)

    needs_files_of(pending)
    if any(has_command[n] or kinds[n] not in RESULT_ONLY for n in pending | need):
        base = {n for n in usable if kinds[n] in BASE}
        need |= base
        needs_files_of(base)
    for name in deps:  # checks of a recomputed output run with it
        if name in usable and name not in need and kinds[name] in CHECKS and deps[name] \
                and all(d in need or d in recomputed_here for d in deps[name]):
            need.add(name)
    return Plan(reused=usable - need, recompute=need, pending=pending)


def base_deps(plan: Plan, deps: Mapping[str, tuple[str, ...]], kinds: Mapping[str, str],
              has_command: Mapping[str, bool]) -> dict[str, tuple[str, ...]]:
    """The recomputed data steps as dependencies of every step that reads files.

    The protocol does not declare them everywhere: a teacher depends on the choice of its lr,
    which in the first sitting came after the data. On a fresh machine the choice is reused
    at once, so without these the teacher would start before its list files exist."""
    base = tuple(n for n in deps if n in plan.recompute and kinds[n] in BASE)
    if not base:
        return {}
    return {name: tuple(dict.fromkeys(deps[name] + base)) for name in deps
            if kinds[name] not in BASE and (has_command[name] or kinds[name] not in RESULT_ONLY)
            and not set(base) <= set(deps[name])}


def _eval_as_recorded(recorded: Mapping[str, Any], now: Mapping[str, Any]
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Two evaluations at the precision of the record: counts of correct images where it
    holds them (``eval --json``, since sitting 2); else the percentage with the two decimals
    sitting 1 parsed from eval's printed line (exact counts on V's 10,000 images, 3 images
    on U's 30,000: 29,942 and 29,943 correct both print 99.81 %)."""
    def view(result: Mapping[str, Any], exact: bool) -> dict[str, Any]:
        out = {k: v for k, v in result.items() if k not in ("top1", "top5") and
               not k.endswith("_correct")}
        for key in ("top1", "top5"):
            if exact and f"{key}_correct" in result:
                out[f"{key}_correct"] = result[f"{key}_correct"]
            elif key in result:
                out[f"{key}_percent"] = f"{100 * result[key]:.2f}"
        return out

    exact = "top1_correct" in recorded and "top1_correct" in now
    return view(recorded, exact), view(now, exact)


# Fields whose definition changed in the package, told apart by how they were recorded:
# inspect's top1_counts.median was numpy's median (a float: the mean of the two middle counts
# of 10 classes) until commit 32bd51a and is the lower middle count (an int) since. A value
# recorded under the other definition is not compared (sitting 1's inspect_L: 601.0, the
# mean of 597 and 605, against 597 now for the same counts).
REDEFINED = {"top1_counts.median": lambda a, b: type(a) is type(b)}


def differences(recorded: Mapping[str, Any], now: Mapping[str, Any], kind: str = "",
                prefix: str = "") -> list[str]:
    """Fields in which a recomputed result differs from the recorded one.

    Compared: the fields both hold (fingerprints added after the record was written cannot be
    compared with it), except VOLATILE ones, absolute paths and values recorded under another
    definition (REDEFINED); numbers exactly.
    """
    if kind == "eval":
        recorded, now = _eval_as_recorded(recorded, now)
    out = []
    for key in sorted(set(recorded) & set(now)):
        a, b = recorded[key], now[key]
        if key in VOLATILE or _is_path(a) or _is_path(b):
            continue
        if not REDEFINED.get(prefix + key, lambda a, b: True)(a, b):
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, prefix=f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: recorded {a!r}, now {b!r}")
    return out


def _is_path(value: Any) -> bool:
    return isinstance(value, str) and value.startswith("/")


def merged(recorded: Mapping[str, Any], now: Mapping[str, Any]) -> dict[str, Any]:
    """A reproduced result: the record, plus the fields (fingerprints) it did not hold yet."""
    return dict(recorded) | {k: v for k, v in now.items() if k not in recorded}


def sha256_of(path: Path, skip_comments: bool = False) -> str:
    """sha256 of a text file's lines (``#`` comment lines left out when asked: dedup's header
    names the stores' paths)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for line in handle:
            if not (skip_comments and line.startswith(b"#")):
                digest.update(line)
    return digest.hexdigest()


def environment() -> dict[str, Any]:
    """Versions that decide floating-point results, and the CPU (recorded, not required)."""
    env: dict[str, Any] = {"python": platform.python_version()}
    for name in ("torch", "timm", "numpy"):
        try:
            env[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            env[name] = None
    env["cpu"] = _cpu()
    return env


def _cpu() -> Optional[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or None
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines()
                  if ln.startswith("model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines()
                  if ln.startswith("flags")), [])
    simd = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    return f"{model} ({' '.join(simd) or 'no avx2'})"


def package() -> dict[str, Any]:
    """Where the ``ssld`` package this Python imports lives, and its git commit."""
    spec = importlib.util.find_spec("labelstore")
    if spec is None or spec.origin is None:
        return {"dir": None, "commit": None, "dirty": None}
    root = Path(spec.origin).resolve().parent.parent

    def git(*args: str) -> Optional[str]:
        try:
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True,
                                  text=True, timeout=30, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain", "--", "labelstore", "student_train",
                 "teacher_infer", "cli.py")
    return {"dir": str(root), "commit": git("rev-parse", "HEAD"),
            "dirty": None if status is None else bool(status)}


def json_round_trip(value: Any) -> Any:
    """``value`` as it reads back from the results file (tuples become lists)."""
    return json.loads(json.dumps(value))
