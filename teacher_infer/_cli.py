"""``ssld infer-teacher``: options → :class:`InferConfig` → ``teacher_infer.run``; ``ssld verify``
(a store against its recorded teacher) → ``teacher_infer.verify``."""
from __future__ import annotations

import functools

import click

from labelstore import DEFAULT_CHUNK_ROWS
from labelstore import verify as verify_structure

from . import verify as verify_teacher  # the package's wrapper: no torch import here
from .cli_options import (config_option, device_option, overwrite_option, progress_option,
                          threads_option)
from .config import DECODERS, VERIFY_SAMPLE, VERIFY_SEED, InferConfig
from .runtime import Dist

commands: list[click.Command] = []

# an option whose value becomes the InferConfig field of the same name (default from there)
_field = functools.partial(config_option, InferConfig)


@click.command("infer-teacher")
@_field("model", required=True,
        help="timm name (arch or arch.tag) or PaddleClas name, e.g. resnext101_32x16d_wsl.")
@_field("checkpoint", type=click.Path(dir_okay=False),
        help="Weights: state dict or training checkpoint (.pth, .pt, .safetensors).")
@_field("pretrained", is_flag=True, help="Weights from timm's hub cache (no waiting on "
        "a network: fails at once when they are not cached and the hub is unreachable).")
@_field("random_weights", is_flag=True,
        help="Run without weights (seeded by --seed); for tests and benchmarks.")
@_field("data", help="Class-folder root, unlabeled image folder, a list file of "
        "'relative/path [label]' lines, or WebDataset tar shards: a brace pattern or glob, a "
        "folder of .tar files, an s3:// prefix, timm's _info.json, a wids index or an "
        "ssld index (optional with --views-from).")
@_field("views_from", type=click.Path(), help="Label store whose rows, dataset root, "
        "views, boxes and flips to reuse: this teacher labels exactly its crops.")
@_field("root", help="Folder the list file's paths are relative to (default: its folder).")
@_field("source", help="Kind of --data when a folder is ambiguous; unlabeled: every label "
        "-1 (a pool in sub-folders, or shards whose cls are not the model's classes).")
@_field("out", required=True, help="Label store to write or resume (NAME.zarr).")
@_field("topk", help="Classes kept per view.")
@_field("views", help="Views per image (view 0: eval crop; the others: RandomResizedCrop + flip).")
@_field("seed", help="Seed of the view boxes.")
@_field("crop_scale", nargs=2, type=float, help="Area range of the random views.")
@_field("crop_ratio", nargs=2, type=float, show_default="0.75 1.333",
        help="Aspect-ratio range of the random views.")
@_field("temperature", help="Softmax temperature.")
@_field("input_size", type=int, help="Input side in pixels [model's].")
@_field("interpolation", help="Resize filter [model's].")
@_field("mean", nargs=3, type=float, help="Normalisation mean R G B [model's].")
@_field("std", nargs=3, type=float, help="Normalisation std R G B [model's].")
@_field("crop_pct", type=float, help="Center-crop fraction of view 0 [model's].")
@_field("batch_size", help="Images per forward pass.")
@device_option
@_field("decoder", type=click.Choice(DECODERS), help="auto: DALI on a GPU, PIL workers on the "
        "CPU (and wherever DALI is not installed).")
@_field("precision", help="auto: bf16 autocast on GPUs, fp32 on the CPU (fp32 on a GPU uses "
        "TF32 matmuls); softmax and top-k are float32 whatever this says.")
@_field("channels_last", is_flag=True, help="channels_last memory format.")
@_field("compile", is_flag=True, help="torch.compile the forward.")
@_field("num_workers", type=int, help="Data-loading workers per rank [from CPU count].")
@_field("num_classes", type=int, help="Classifier size when it differs from the model's.")
@_field("class_names", type=click.Path(exists=True, dir_okay=False),
        help="File with one class name per line, recorded in the store.")
@_field("chunk_rows", type=int, help=f"Rows per store chunk [{DEFAULT_CHUNK_ROWS}].")
@_field("embeddings", is_flag=True, help="Also store view 0's pooled features (fp16).")
@_field("store_logits", is_flag=True, help="Also store each view's top-k logits and "
        "log-partition (float32): train-student --loss kl --temperature re-tempers them "
        "without fp16 rounding.")
@_field("augment", metavar="POLICY", help="RandAugment applied to views 1..V-1 before the "
        "teacher labels them, stored per view (timm's grammar, e.g. rand-m9-n2-mstd0.5).")
@_field("erase", type=float, metavar="P",
        help="Random-erasing probability per view (timm --reprob); stored per view.")
@_field("erase_count", type=int, metavar="N",
        help="At most N erased boxes per view (timm --recount).")
@_field("mixup", type=float, metavar="ALPHA",
        help="MixUp with λ ~ Beta(α, α), partners from the same store chunk [off].")
@_field("cutmix", type=float, metavar="ALPHA", help="CutMix with λ ~ Beta(α, α) [off].")
@_field("mix_prob", type=float, metavar="P",
        help="Probability that a view is mixed (timm --mixup-prob).")
@_field("mixup_switch_prob", type=float, metavar="P",
        help="CutMix rather than MixUp when both are on.")
@overwrite_option
@progress_option
@threads_option(InferConfig)
def infer_teacher(**options) -> None:
    """Run a teacher once over a data set and write its top-k soft labels to a label store.

    Rerunning the same command resumes an interrupted store; under torchrun every rank
    takes whole store chunks. With --views-from STORE the rows, views, boxes and flips are
    STORE's (--views and the view-sampling options are not used), e.g. to ensemble teachers.
    """
    from teacher_infer import InferConfig, run  # through the package: tests replace them

    summary = run(InferConfig(**options))
    if Dist.from_env().is_main:  # under torchrun, one summary line
        click.echo(str(summary))


commands.append(infer_teacher)


@click.command("verify")
@click.argument("store")
@click.option("--sample", default=VERIFY_SAMPLE, show_default=True,
              help="Rows recomputed with the teacher (all their views).")
@click.option("--checkpoint", "checkpoints", multiple=True, type=click.Path(dir_okay=False),
              help="Teacher weights instead of the recorded file; one per teacher, in member "
              "order for an ensemble store.")
@click.option("--structure-only", is_flag=True, help="Check the arrays only, no teacher.")
@click.option("--root", help="Image (or shard) folder or URL instead of the recorded dataset "
              "root.")
@click.option("--seed", default=VERIFY_SEED, show_default=True, help="Seed of the row sample.")
@device_option
@click.option("--decoder", type=click.Choice([n for n in DECODERS if n != "auto"]),
              help="[the recorded one]")
@config_option(verify_structure, "atol", type=float, help="Largest |Δp| of an agreeing row-view.")
@config_option(verify_structure, "min_agreement", type=float,
               help="Fraction of row-views that must agree.")
@threads_option(verify_teacher)
@click.option("--num-workers", type=click.IntRange(min=0), default=0, show_default=True,
              help="Decoding workers (0: in this process, enough for --sample rows).")
@click.pass_context
def verify_cmd(ctx, store, sample, checkpoints, structure_only, root, seed, device, decoder,
               atol, min_agreement, threads, num_workers) -> None:
    """Check a store: its structure, and sampled rows recomputed with its teacher.

    Exit status 1 (with the problems and the worst rows) when it fails.
    """
    if structure_only:  # the store alone: no torch
        result = verify_structure(store, atol=atol, min_agreement=min_agreement)
    else:
        from teacher_infer import verify

        result = verify(store, sample=sample, checkpoint=list(checkpoints) or None, root=root,
                        seed=seed, device=device, decoder=decoder, atol=atol,
                        min_agreement=min_agreement, threads=threads, num_workers=num_workers)
    click.echo(result)
    if not result.ok:
        ctx.exit(1)


commands.append(verify_cmd)
