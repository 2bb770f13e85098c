"""``ssld quickstart``: the whole pipeline on scikit-learn's bundled digits."""
from __future__ import annotations

import click

commands: list[click.Command] = []


@click.command("quickstart")
@click.option("--workdir", default="ssld-quickstart", show_default=True,
              help="Folder for the data, stores, runs and quickstart.json.")
@click.option("--teacher-epochs", default=60, show_default=True)
@click.option("--student-epochs", default=60, show_default=True)
@click.option("--select-k", default=100, show_default=True, help="Pool images kept per class.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True)
@click.option("--seed", default=0, show_default=True)
def quickstart(workdir: str, teacher_epochs: int, student_epochs: int, select_k: int,
               device: str, seed: int) -> None:
    """Teacher → infer-teacher → dedup → select-topk → merge → train-student → eval on digits."""
    from student_train.quickstart import QuickstartConfig, run

    result = run(QuickstartConfig(workdir=workdir, teacher_epochs=teacher_epochs,
                                  student_epochs=student_epochs, select_k=select_k,
                                  device=device, seed=seed), echo=click.echo)
    click.echo("\n" + result.table())
    click.echo(f"\nEverything is under {result.workdir} (summary: quickstart.json).")


commands.append(quickstart)
