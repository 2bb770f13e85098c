"""``ssld ensemble`` and ``ssld verify``: combining teachers' stores, checking a store."""
from __future__ import annotations

import click

commands: list[click.Command] = []


def _command(fn):
    commands.append(fn)
    return fn


def _weights(ctx, param, value):
    if value is None:
        return None
    try:
        return [float(v) for v in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {value!r}") from None


@_command
@click.command("ensemble")
@click.argument("stores", nargs=-1, required=True)
@click.option("--out", required=True, help="Store to write or resume (e.g. ensemble.zarr).")
@click.option("--weights", callback=_weights, help="One weight per store, e.g. 0.5,0.5 "
              "(normalised) [equal].")
@click.option("--topk", type=int, help="Classes kept per view [the largest member k].")
@click.option("--rule", type=click.Choice(["mean", "geomean"]), default="mean",
              show_default=True, help="Weighted mean of the distributions, or their "
              "normalised weighted geometric mean.")
@click.option("--overwrite", is_flag=True, help="Replace --out instead of resuming it.")
def ensemble_cmd(stores, out, weights, topk, rule, overwrite) -> None:
    """Combine stores that label the same crops (infer-teacher --views-from) into one."""
    from labelstore import ensemble

    click.echo(ensemble(list(stores), out, weights=weights, topk=topk, rule=rule,
                        overwrite=overwrite, progress=True))


@_command
@click.command("verify")
@click.argument("store")
@click.option("--sample", default=64, show_default=True,
              help="Rows recomputed with the teacher (all their views).")
@click.option("--checkpoint", "checkpoints", multiple=True, type=click.Path(dir_okay=False),
              help="Teacher weights instead of the recorded file; one per teacher, in member "
              "order for an ensemble store.")
@click.option("--structure-only", is_flag=True, help="Check the arrays only, no teacher.")
@click.option("--root", help="Image folder instead of the recorded dataset root.")
@click.option("--seed", default=0, show_default=True, help="Seed of the row sample.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True)
@click.option("--decoder", type=click.Choice(["dali", "pil"]), help="[the recorded one]")
@click.option("--atol", type=float, default=None, help="Largest |Δp| of an agreeing row-view "
              "[0.05].")
@click.option("--min-agreement", type=float, default=None,
              help="Fraction of row-views that must agree [0.99].")
@click.pass_context
def verify_cmd(ctx, store, sample, checkpoints, structure_only, root, seed, device, decoder,
               atol, min_agreement) -> None:
    """Check a store: its structure, and sampled rows recomputed with its teacher.

    Exit status 1 (with the problems and the worst rows) when it fails.
    """
    from labelstore import verify

    options = {"atol": atol, "min_agreement": min_agreement}
    result = verify(store, sample=sample, checkpoint=list(checkpoints) or None,
                    structure_only=structure_only, root=root, seed=seed, device=device,
                    decoder=decoder, **{k: v for k, v in options.items() if v is not None})
    click.echo(result)
    if not result.ok:
        ctx.exit(1)
