"""``ssld select-topk``, ``ssld dedup`` and ``ssld merge`` (store-only data selection)."""
from __future__ import annotations

import functools

import click

from . import _dedup, _select
from .cli_options import (config_option, device_option, is_main_process, overwrite_option,
                          threads_option)

commands: list[click.Command] = []

# an option whose value is the keyword of the same name of labelstore.dedup (its default)
_dedup_option = functools.partial(config_option, _dedup.dedup)


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
@config_option(_select.select_topk, "view", help="View that ranks the rows.")
@click.option("--list-out", default=None, help="Also write a PaddleClas list `key top1-class`.")
@overwrite_option
def select_topk_cmd(stores, k, out, exclude, min_prob, view, list_out, overwrite) -> None:
    """Keep, per class, the K pool rows with the highest teacher probability."""
    from labelstore import select_topk

    click.echo(select_topk(list(stores), k, out, exclude=exclude, min_prob=min_prob, view=view,
                           list_out=list_out, overwrite=overwrite, progress=True))


@_command
@click.command("dedup")
@click.option("--query", required=True, help="Store of the query set (e.g. val), with embeddings.")
@click.option("--pool", required=True, help="Pool store with embeddings.")
@click.option("--out", default="-", show_default=True, help="Duplicate list to write (- = stdout).")
@_dedup_option("threshold", type=float, help="Cosine similarity of stage-1 candidates.")
@_dedup_option("verify", type=click.Choice(["sift", "none"]),
               help="sift: confirm candidates on the images; none: report stage-1 pairs.")
@_dedup_option("top_m", type=int, help="Stage-1 candidates kept per query.")
@_dedup_option("min_inliers", type=int, help="RANSAC inliers that confirm a duplicate.")
@click.option("--query-root", default=None,
              help="Image root of the query (default: its dataset.root).")
@click.option("--pool-root", default=None,
              help="Image root of the pool (default: its dataset.root).")
@device_option
@_dedup_option("precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
               help="dtype of the stage-1 products (auto: fp16 on CUDA, fp32 on CPU; bf16 is "
               "fast on CPUs with AVX512-BF16/AMX); the result is the same.")
@_dedup_option("rule", type=click.Choice(["best", "component"]),
               help="best: drop confirmed matches; component: drop every connected component "
               "of pairs above the threshold that holds one (DINOv2).")
@click.option("--report-threshold", "report_thresholds", type=float, multiple=True,
              help="Threshold of the per-rule report (repeat; default: threshold +0, .05, "
              ".1, .15).")
@click.option("--workers", type=int, default=None,
              help="SIFT threads per process (default: --threads).")
@threads_option
def dedup_cmd(query, pool, out, threshold, verify, top_m, min_inliers, query_root,
              pool_root, device, precision, rule, report_thresholds, workers, threads) -> None:
    """Find near-duplicates of query images in a pool: cosine candidates, SIFT verification.

    --device is where stage 1 multiplies (queries held there, fp16 on CUDA); the result is
    the same on every device. Under torchrun every rank searches a share of the pool and
    verifies a share of the pairs; rank 0 writes --out. A killed run resumes stage 2 from
    OUT.progress.* files.
    """
    from labelstore import dedup

    result = dedup(query, pool, out, threshold=threshold, verify=verify, top_m=top_m,
                   min_inliers=min_inliers, query_root=query_root, pool_root=pool_root,
                   device=device, precision=precision, rule=rule,
                   report_thresholds=list(report_thresholds) or None,
                   workers=threads if workers is None else workers, progress=True)
    if is_main_process():
        click.echo(result, err=out == "-")   # keep stdout for the list itself


@_command
@click.command("merge")
@click.argument("stores", nargs=-1, required=True)
@click.option("--out", required=True, help="Store to write (e.g. train_plus_pool.zarr).")
@overwrite_option
def merge_cmd(stores, out, overwrite) -> None:
    """Concatenate stores with the same classes, k and views; repeated keys are dropped."""
    from labelstore import merge

    click.echo(merge(list(stores), out, overwrite=overwrite, progress=True))
