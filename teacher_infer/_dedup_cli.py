"""``ssld dedup``: options → :class:`~teacher_infer.dedup.DedupConfig` → ``dedup(cfg)``."""
from __future__ import annotations

import functools

import click

from .cli_options import config_option, device_option, progress_option, threads_option
from .dedup.config import DedupConfig  # no torch import: `ssld --help` stays instant

commands: list[click.Command] = []

# an option whose value becomes the DedupConfig field of the same name (default from there)
_field = functools.partial(config_option, DedupConfig)


@click.command("dedup")
@_field("query", required=True, help="Store of the query set (e.g. val), with embeddings.")
@_field("pool", required=True, help="Pool store with embeddings.")
@_field("out", default="-", show_default=True, help="Duplicate list to write (- = stdout).")
@_field("threshold", type=float, help="Cosine similarity of stage-1 candidates.")
@_field("verify", help="sift: confirm candidates on the images; none: report stage-1 pairs.")
@_field("top_m", type=int, help="Stage-1 candidates kept per query.")
@_field("min_inliers", type=int, help="RANSAC inliers that confirm a duplicate.")
@_field("query_root", help="Image root of the query (default: its dataset.root).")
@_field("pool_root", help="Image root of the pool (default: its dataset.root).")
@device_option
@_field("precision", help="dtype of the stage-1 products (auto: bf16 on CUDA, fp32 on the "
        "CPU; bf16 is fast on CPUs with AVX512-BF16/AMX); the result is the same.")
@_field("rule", help="best: drop confirmed matches; component: drop every connected "
        "component of pairs above the threshold that holds one (DINOv2).")
@_field("report_thresholds", "--report-threshold", type=float, multiple=True,
        help="Threshold of the per-rule report (repeat; default: threshold +0, .05, .1, .15).")
@_field("workers", "--num-workers", "--workers", type=int,
        help="SIFT workers (threads) per process (default: --threads).")
@threads_option(DedupConfig)
@progress_option
def dedup_cmd(**options) -> None:
    """Find near-duplicates of query images in a pool: cosine candidates, SIFT verification.

    --device is where stage 1 multiplies (queries held there, bf16 on CUDA); the result is
    the same on every device. Under torchrun every rank searches a share of the pool and
    verifies a share of the pairs; rank 0 writes --out. A killed run resumes stage 2 from
    OUT.progress.* files.
    """
    from teacher_infer import dedup  # through the package: tests replace it
    from teacher_infer.runtime import Dist

    result = dedup.dedup(DedupConfig(**options))
    if Dist.from_env().is_main:  # under torchrun, one summary
        click.echo(result, err=options["out"] == "-")   # keep stdout for the list itself


commands.append(dedup_cmd)
