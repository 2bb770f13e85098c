"""A toy study for the study driver's tests (tests/test_study_driver.py): no ssld, no training.

Two uses of this file:

    python study_toy.py step LOG NAME [OPTION ...]   # a fake step command (below)
    python study_toy.py --workdir W --results R ...  # the driver's command line for STUDY

A fake step appends ``start NAME OPTIONS`` and ``end NAME OPTIONS`` lines to LOG (one short
append each, so the file keeps the order in which events happened, across processes). Its
options, in the order it applies them:

``--wait-for OTHER``        wait until OTHER has started (it runs at the same time)
``--refuse-existing PATH``  exit 2 when PATH exists and ``--overwrite`` was not given (as
                            ssld's commands refuse to overwrite), else write PATH
``--fail-once MARK``        fail (exit 1) when MARK does not exist yet, creating it
``--hold RUN``              a training run: write RUN/last.pt and RUN/pid, wait until the file
                            ``release`` beside RUN exists, then write RUN/finished
``--sleep SECONDS``
``--fail``                  exit 1 at the end

STUDY is a -> b -> c, where b is such a training run (``resumable_train``: the driver resumes it
with ``--resume`` when its ``last.pt`` exists).
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # run as a script: the checkout's `experiments` package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import driver  # noqa: E402

WAIT_S = 30.0  # longest wait for another step or a release (a step left waiting fails)


def step_command(log: Path, name: str, *options: str) -> list[str]:
    """The argv of a fake step that logs to ``log``."""
    return [sys.executable, str(Path(__file__).resolve()), "step", str(log), name, *options]


def fake_step(argv: list[str]) -> int:
    log, name, *options = argv

    def note(event: str) -> None:
        with open(log, "a") as handle:
            handle.write(f"{event} {name} {' '.join(options)}\n")

    def value(option: str) -> str:
        return options[options.index(option) + 1]

    def wait(until: Callable[[], bool]) -> None:
        end = time.monotonic() + WAIT_S
        while not until():
            if time.monotonic() > end:
                note("timeout")
                sys.exit(3)
            time.sleep(0.02)

    note("start")
    if "--wait-for" in options:
        other = value("--wait-for")
        wait(lambda: f"start {other} " in Path(log).read_text())
    if "--refuse-existing" in options:
        path = Path(value("--refuse-existing"))
        if path.exists() and "--overwrite" not in options:
            note("refused")
            return 2
        path.write_text("output")
    if "--fail-once" in options:
        mark = Path(value("--fail-once"))
        if not mark.exists():
            mark.write_text("")
            note("failed")
            return 1
    if "--hold" in options:
        run = Path(value("--hold"))
        run.mkdir(parents=True, exist_ok=True)
        (run / "last.pt").write_text("epoch 1")
        (run / "pid").write_text(str(os.getpid()))
        wait(lambda: (run.parent / "release").exists())
        (run / "finished").write_text("")
    if "--sleep" in options:
        time.sleep(float(value("--sleep")))
    note("end")
    return 1 if "--fail" in options else 0


@dataclass(frozen=True)
class Scale:
    """A study's sizes, as the driver records them (``scale_config``)."""

    images: int = 10


def _collect_b(ctx: driver.Context) -> dict:
    if not (ctx.run_dir("b") / "finished").exists():
        raise RuntimeError("b has not reached its last epoch")
    return {"epochs": 2}


def build(ctx: driver.Context) -> list[driver.Step]:
    log = ctx.work / "log"
    return [driver.Step("a", "prepare", command=lambda c: step_command(log, "a")),
            driver.Step("b", "train", deps=("a",), collect=_collect_b,
                        command=lambda c: step_command(log, "b", "--hold", str(c.run_dir("b"))),
                        resumable_train=Path("b")),
            driver.Step("c", "eval", deps=("b",), command=lambda c: step_command(log, "c"))]


STUDY = driver.Study(
    name="toy", description="A toy study.", scales={"smoke": Scale(), "full": Scale(100)},
    build=build,
    rows=lambda ctx: [{"group": "b", "label": "b", "train_steps": ["b"], "eval_steps": ["c"]}],
    estimate=lambda ctx, steps: driver.Estimate({"one minute per step": 60.0 * len(steps)}, 1.5),
    results_dir=Path(__file__).resolve().parent, teacher="t", student="s",
    constants={"views": 4})


if __name__ == "__main__":
    if sys.argv[1:2] == ["step"]:
        sys.exit(fake_step(sys.argv[2:]))
    sys.exit(driver.main(STUDY))
