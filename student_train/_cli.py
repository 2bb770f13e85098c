"""``ssld train-student`` and ``ssld eval``: options → a config → one library call."""
from __future__ import annotations

import functools

import click

from teacher_infer.cli_options import (config_option, device_option, json_option,
                                       progress_option, threads_option)
from teacher_infer.runtime import Dist

# no torch import: `ssld --help` stays instant
from .config import DECODERS, EVAL_BATCH_SIZE, TrainConfig

commands: list[click.Command] = []

# an option whose value becomes the TrainConfig field of the same name (default from there)
_field = functools.partial(config_option, TrainConfig)


def _command(fn):
    commands.append(fn)
    return fn


def _lr_mult(ctx, param, value):
    if value is None:
        return None
    try:
        mult = tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected 5 comma-separated numbers, got {value!r}") from None
    if len(mult) != 5:
        raise click.BadParameter(f"expected 5 numbers (stem, stage 1..4), got {len(mult)}")
    return mult


_runtime_options = [
    device_option,
    _field("decoder", type=click.Choice(DECODERS),
           help="auto: DALI on a GPU, PIL workers on the CPU (and wherever DALI is not "
           "installed)."),
    _field("precision", help="auto: bf16 autocast on GPUs, fp32 on the CPU (fp32 on a GPU "
           "uses TF32 matmuls)."),
    _field("channels_last", "--channels-last/--no-channels-last",
           help="Memory format (default: channels_last on GPUs)."),
    _field("num_workers", type=int,
           help="Decoding workers per process (default: cores / processes, at most 8)."),
    _field("input_size", type=int,
           help="Square input side (default: the model's pretrained config)."),
    threads_option(TrainConfig),  # eval's `threads` keyword has the same default (None)
    progress_option,              # TrainConfig.progress, eval's `progress` keyword
]


def _runtime(fn):
    for option in reversed(_runtime_options):
        fn = option(fn)
    return fn


@_command
@click.command("train-student")
@_field("student", required=True, help="timm model name (or a PaddleClas name).")
@_field("stores", "--store", multiple=True, metavar="STORE",
        help="Label store to distil from; repeat for several (one training set).")
@_field("store_roots", "--store-root", multiple=True, metavar="DIR",
        help="Where the stores' images are now, if not at the root each store recorded (moved, "
        "another mount): one for all stores, or one per --store in order.")
@_field("data", metavar="SRC", help="Images for --supervised / --teacher without a store: "
        "class folder, unlabeled folder, list file or tar shards.")
@_field("root", help="Root of a list-file --data.")
@_field("out", required=True, metavar="RUN_DIR", help="Run directory.")
@_field("val", metavar="SRC", help="Validation images (class folder, list file or tar "
        "shards) for top-1/top-5 each epoch.")
@_field("val_root", help="Root of a list-file --val.")
@_field("val_every", type=click.IntRange(min=1), metavar="N",
        help="Validate every N epochs and after the last.")
@_field("epochs", type=int, help="Passes over the training set.")
@_field("batch_size", type=int, help="Images per process and step.")
@_field("lr", type=float,
        help="Learning rate for 256 images; scaled linearly to the global batch. Default: 0.1, "
             "and 0.4 when distilling with --loss js (its gradient near agreement is a "
             "quarter of KL's).")
@_field("warmup_epochs", type=float,
        help="Linear warmup (fractions allowed), then cosine decay to 0 per step.")
@_field("weight_decay", type=float, help="L2 decay (not on norm and bias parameters).")
@_field("nesterov", is_flag=True, help="Nesterov momentum (SGD momentum 0.9).")
@_field("loss")
@_field("temperature", type=float)
@_field("label_weight", type=float, help="Add this × cross-entropy on known ground-truth labels.")
@_field("views", help="replay: stored teacher views; global: RandomResizedCrop with view-0 "
        "targets; auto: replay when the stores hold > 1 view.")
@_field("crop_scale", type=float, nargs=2, metavar="MIN MAX",
        help="RandomResizedCrop area range of global views and --supervised crops.")
@_field("autoaugment", metavar="POLICY",
        help="timm policy after the crop (e.g. rand-m9-mstd0.5); weakens consistency.")
@_field("lr_mult", callback=_lr_mult, metavar="M0,M1,M2,M3,M4",
        help="LR multipliers for stem and stages 1-4 (classifier 1.0).")
@_field("init", metavar="CKPT", help="Start from these student weights.")
@_field("freeze_backbone", is_flag=True,
        help="Train the classifier only, with eval preprocessing (FixRes step).")
@_field("supervised", is_flag=True, help="Baseline: hard labels with label smoothing 0.1.")
@_field("teacher", metavar="NAME", help="Online distillation teacher.")
@_field("teacher_checkpoint", metavar="FILE", help="Weights of --teacher (needed with it).")
@_field("ema", type=float, metavar="DECAY", help="Keep an EMA of the weights (e.g. 0.9998).")
@_field("resume", is_flag=True, help="Continue RUN_DIR/last.pt exactly.")
@_field("bad_images", help="An image that cannot be read: skip (leave it out, count it, list "
        "it in RUN_DIR/failed.txt) or stop (end the run with one line naming it).")
@_field("seed", type=int, help="Seeds the weights, the sample order, the replayed views and "
        "the augmentation (workers and resumes see the same).")
@_runtime
@click.pass_context
def train_student_cmd(ctx: click.Context, **options) -> None:
    """Distil a timm student from label stores (or train a baseline).

    \b
    ssld train-student --student mobilenetv3_large_100 --store train.zarr \\
        --store pool.zarr --val imagenet/val --out runs/mv3
    """
    from .trainer import TrainingDiverged, train

    try:
        result = train(TrainConfig(**options))
    except TrainingDiverged as exc:
        click.echo(f"ssld: training stopped: {exc}", err=True)
        ctx.exit(1)
    if Dist.from_env().is_main:  # under torchrun, one summary
        click.echo(result.summary())


@_command
@click.command("eval")
@click.option("--model", required=True, help="timm model name (or a PaddleClas name).")
@click.option("--checkpoint", required=True, metavar="FILE",
              help="train-student checkpoint or plain state dict (.pt/.pth/.safetensors).")
@click.option("--data", required=True, metavar="SRC", help="Labeled images: class folder, "
              "list file or tar shards (pattern, folder, s3:// prefix, index).")
@click.option("--root", default=None, help="Root of a list-file --data.")
@click.option("--batch-size", type=int, default=EVAL_BATCH_SIZE, show_default=True,
              help="Images per process and step.")
@json_option
@_runtime
def eval_cmd(as_json: bool, **options) -> None:
    """Top-1/top-5 accuracy and images/s of a checkpoint on a labeled data set."""
    from .evaluation import evaluate, report

    result = evaluate(**options)
    click.echo(report(result, options["model"], options["checkpoint"], options["data"],
                      as_json=as_json))
