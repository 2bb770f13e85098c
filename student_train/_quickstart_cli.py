"""``ssld quickstart``: the whole pipeline on scikit-learn's bundled digits."""
from __future__ import annotations

import functools

import click

from teacher_infer.cli_options import (config_option, device_option, progress_option,
                                       threads_option)

from .quickstart import QuickstartConfig  # no torch import

commands: list[click.Command] = []

# an option whose value becomes the QuickstartConfig field of the same name
_field = functools.partial(config_option, QuickstartConfig)


@click.command("quickstart")
@_field("workdir", help="Folder for the data, stores, runs and quickstart.json.")
@_field("teacher_epochs", help="Epochs of the resnet18 teacher on the 200 labeled images.")
@_field("student_epochs", help="Epochs of the label-only student on L (the SSLD student "
        "sees as many images on L + pool).")
@_field("select_k", help="Pool images kept per class.")
@device_option
@_field("seed", help="Seeds the splits, the models and every step's sampling.")
@_field("num_workers", type=click.IntRange(min=0),
        help="Decoding workers per step (teacher passes, training, eval).")
@threads_option(QuickstartConfig)
@progress_option
def quickstart(**options) -> None:
    """Teacher → infer-teacher → dedup → select-topk → merge → train-student → eval on digits."""
    from .quickstart import run

    result = run(QuickstartConfig(**options), echo=click.echo)
    click.echo("\n" + result.table())
    click.echo(f"\nEverything is under {result.workdir} (summary: quickstart.json).")


commands.append(quickstart)
