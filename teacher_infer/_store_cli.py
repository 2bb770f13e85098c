"""``ssld inspect`` and ``ssld export`` (store-only commands): their click wiring, here in the
lowest layer that may import click; the work is ``labelstore``'s."""
from __future__ import annotations

import json

import click

from labelstore import inspect_store

from .cli_options import config_option, json_option, overwrite_option

commands: list[click.Command] = []


def _command(fn):
    commands.append(fn)
    return fn


@_command
@click.command("inspect")
@click.argument("store")
@config_option(inspect_store, "view", help="View whose statistics are reported.")
@json_option
def inspect_cmd(store: str, view: int, as_json: bool) -> None:
    """Summarise a label store: size, completeness, confidence, agreement with labels."""
    import labelstore

    report = inspect_store(labelstore.open(store), view=view)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else str(report))


@_command
@click.command("export")
@click.argument("store")
@click.option("--out", required=True, help="HDF5 file to write (e.g. labels.h5).")
@click.option("--rows", default=None, metavar="A:B", help="Export only rows A to B (half-open).")
@overwrite_option
@click.option("--allow-incomplete", is_flag=True,
              help="Export an unfinished store; rows not written yet have valid=False.")
def export_cmd(store: str, out: str, rows: str | None, overwrite: bool,
               allow_incomplete: bool) -> None:
    """Export a label store (or a row range of it) to HDF5 with h5py."""
    import labelstore

    result = labelstore.export(labelstore.open(store), out, rows, overwrite=overwrite,
                    allow_incomplete=allow_incomplete)
    if result.warning():
        click.echo(result.warning(), err=True)
    click.echo(result.summary())
