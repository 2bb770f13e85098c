"""``ssld select-topk`` and ``ssld merge`` (store-only data selection): their click wiring;
the work is ``labelstore``'s."""
from __future__ import annotations

import click

import labelstore

from .cli_options import config_option, overwrite_option, progress_option

commands: list[click.Command] = []


def _command(fn):
    commands.append(fn)
    return fn


@_command
@click.command("select-topk")
@click.option("--store", "stores", multiple=True, required=True,
              help="Pool store; repeat for several stores (one pool, in the order given).")
@click.option("--k", "k", type=int, required=True, help="Rows kept per class.")
@click.option("--out", required=True, help="Store to write (e.g. selected.zarr).")
@click.option("--exclude", default=None,
              help="Keys to skip: one per line, first tab field (`ssld dedup` output works).")
@click.option("--min-prob", type=float, default=None,
              help="Drop candidates below this probability.")
@config_option(labelstore.select_topk, "view", help="View that ranks the rows.")
@click.option("--list-out", default=None, help="Also write a PaddleClas list `key top1-class`.")
@overwrite_option
@progress_option
def select_topk_cmd(stores, k, out, exclude, min_prob, view, list_out, overwrite,
                    progress) -> None:
    """Keep, per class, the K pool rows with the highest teacher probability."""
    click.echo(labelstore.select_topk(list(stores), k, out, exclude=exclude, min_prob=min_prob,
                                      view=view, list_out=list_out, overwrite=overwrite,
                                      progress=progress))


@_command
@click.command("merge")
@click.argument("stores", nargs=-1, required=True)
@click.option("--out", required=True, help="Store to write (e.g. train_plus_pool.zarr).")
@overwrite_option
@progress_option
def merge_cmd(stores, out, overwrite, progress) -> None:
    """Concatenate stores with the same classes, k and views; repeated keys are dropped."""
    click.echo(labelstore.merge(list(stores), out, overwrite=overwrite, progress=progress))
