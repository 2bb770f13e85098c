"""``ssld quickstart``: the whole pipeline on scikit-learn's bundled digits."""
from __future__ import annotations

import click

from labelstore import threads_option

from .quickstart import QuickstartConfig  # no torch import

commands: list[click.Command] = []
_DEFAULTS = QuickstartConfig()


@click.command("quickstart")
@click.option("--workdir", default=_DEFAULTS.workdir, show_default=True,
              help="Folder for the data, stores, runs and quickstart.json.")
@click.option("--teacher-epochs", default=_DEFAULTS.teacher_epochs, show_default=True)
@click.option("--student-epochs", default=_DEFAULTS.student_epochs, show_default=True)
@click.option("--select-k", default=_DEFAULTS.select_k, show_default=True,
              help="Pool images kept per class.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True)
@click.option("--seed", default=0, show_default=True)
@threads_option
def quickstart(workdir: str, teacher_epochs: int, student_epochs: int, select_k: int,
               device: str, seed: int, threads: int) -> None:
    """Teacher → infer-teacher → dedup → select-topk → merge → train-student → eval on digits."""
    from .quickstart import run

    result = run(QuickstartConfig(workdir=workdir, teacher_epochs=teacher_epochs,
                                  student_epochs=student_epochs, select_k=select_k,
                                  device=device, seed=seed, threads=threads), echo=click.echo)
    click.echo("\n" + result.table())
    click.echo(f"\nEverything is under {result.workdir} (summary: quickstart.json).")


commands.append(quickstart)
