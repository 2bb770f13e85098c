"""``ssld index``: options → :class:`~teacher_infer.shards.IndexConfig` →
``teacher_infer.shards.index``."""
from __future__ import annotations

import functools

import click

from .cli_options import config_option, progress_option
from .shards.config import IndexConfig  # no torch import: `ssld --help` stays instant

commands: list[click.Command] = []

# an option whose value becomes the IndexConfig field of the same name (default from there)
_field = functools.partial(config_option, IndexConfig)


@click.command("index")
@_field("data", required=True, metavar="SHARDS", help="Tar shards: a brace pattern or glob "
        "('/data/in22k/imagenet22k-train-{0000..4095}.tar'), a folder, an s3:// prefix, "
        "timm's _info.json (#SPLIT) or a wids index.")
@_field("out", required=True, metavar="DIR", help="Index folder to write, or to resume.")
@_field("dali_index", "--dali-index/--no-dali-index",
        help="List a shard from DALI's .idx beside it when there is one (checked against the "
        "shard) instead of reading its tar headers.")
@_field("listing_threads", type=click.IntRange(min=1), metavar="N",
        help="Shards listed at once per rank [16 on object storage, 1 locally].")
@progress_option
def index_cmd(**options) -> None:
    """List the samples of WebDataset tar shards once and keep them (keys, labels, byte
    ranges): every command given the index (or --data DIR) loads it in seconds.

    Resumable (rerun the same command after a kill: only shards without a part are listed)
    and parallel under torchrun (each rank lists a share of the shards).
    """
    from teacher_infer import shards  # through the package: tests replace it
    from teacher_infer.runtime import Dist

    result = shards.index(IndexConfig(**options))
    if Dist.from_env().is_main:  # under torchrun, one summary line
        click.echo(str(result))


commands.append(index_cmd)
