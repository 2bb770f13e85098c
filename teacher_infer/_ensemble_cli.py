"""``ssld ensemble``: one store from several teachers' stores on the same crops (the click
wiring; the work is ``labelstore.ensemble``)."""
from __future__ import annotations

import click

import labelstore

from .cli_options import config_option, overwrite_option, progress_option

commands: list[click.Command] = []


def _weights(ctx, param, value):
    if value is None:
        return None
    try:
        return [float(v) for v in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}") from None


@click.command("ensemble")
@click.argument("stores", nargs=-1, required=True)
@click.option("--out", required=True, help="Store to write or resume (e.g. ensemble.zarr).")
@click.option("--weights", callback=_weights, help="One weight per store, e.g. 0.5,0.5 "
              "(normalised) [equal].")
@click.option("--topk", type=int, help="Classes kept per view [the largest member k].")
@config_option(labelstore.ensemble, "rule", type=click.Choice(["mean", "geomean"]),
               help="Weighted mean of the distributions, or their normalised weighted "
               "geometric mean.")
@overwrite_option
@progress_option
def ensemble_cmd(stores, out, weights, topk, rule, overwrite, progress) -> None:
    """Combine stores that label the same crops (infer-teacher --views-from) into one."""
    click.echo(labelstore.ensemble(list(stores), out, weights=weights, topk=topk, rule=rule,
                                   overwrite=overwrite, progress=progress))


commands.append(ensemble_cmd)
