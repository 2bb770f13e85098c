"""``ssld train-student`` and ``ssld eval``: options → a config → one library call."""
from __future__ import annotations

import dataclasses
import os

import click

from labelstore import threads_option

from .config import TrainConfig  # no torch import: `ssld --help` stays instant

commands: list[click.Command] = []

# Defaults come from the dataclass so the help text and the library cannot disagree.
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def _default(name: str):
    return _DEFAULTS[name]


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
    click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
                 show_default=True, help="auto: CUDA when available."),
    click.option("--decoder", type=click.Choice(["auto", "dali", "pil"]), default="auto",
                 show_default=True, help="auto: DALI on a GPU, PIL workers on the CPU."),
    click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
                 default="auto", show_default=True, help="auto: bf16 autocast on GPUs, fp32 on "
                 "the CPU."),
    click.option("--channels-last/--no-channels-last", default=None,
                 help="Memory format (default: channels_last on GPUs)."),
    click.option("--num-workers", type=int, default=None,
                 help="Decoding workers per process (default: cores / processes, at most 8)."),
    click.option("--input-size", type=int, default=None,
                 help="Square input side (default: the model's pretrained config)."),
    threads_option,
]


def _runtime(fn):
    for option in reversed(_runtime_options):
        fn = option(fn)
    return fn


@_command
@click.command("train-student")
@click.option("--student", required=True, help="timm model name (or a PaddleClas name).")
@click.option("--store", "stores", multiple=True, metavar="STORE",
              help="Label store to distil from; repeat for several (one training set).")
@click.option("--data", default=None, metavar="SRC", help="Images for --supervised / --teacher "
              "without a store: class folder, unlabeled folder or list file.")
@click.option("--root", default=None, help="Root of a list-file --data.")
@click.option("--out", required=True, metavar="RUN_DIR", help="Run directory.")
@click.option("--val", default=None, metavar="SRC", help="Validation images (class folder or "
              "list file) for top-1/top-5 each epoch.")
@click.option("--val-root", default=None, help="Root of a list-file --val.")
@click.option("--val-every", type=click.IntRange(min=1), default=_default("val_every"),
              show_default=True, metavar="N", help="Validate every N epochs and after the last.")
@click.option("--epochs", type=int, default=_default("epochs"), show_default=True)
@click.option("--batch-size", type=int, default=_default("batch_size"), show_default=True,
              help="Images per process and step.")
@click.option("--lr", type=float, default=_default("lr"), show_default=True,
              help="Learning rate for 256 images; scaled linearly to the global batch.")
@click.option("--warmup-epochs", type=float, default=_default("warmup_epochs"),
              show_default=True)
@click.option("--weight-decay", type=float, default=_default("weight_decay"), show_default=True,
              help="L2 decay (not on norm and bias parameters).")
@click.option("--nesterov", is_flag=True, help="Nesterov momentum (SGD momentum 0.9).")
@click.option("--loss", type=click.Choice(["js", "skl", "kl", "soft-ce"]),
              default=_default("loss"), show_default=True,
              help="js: Jensen–Shannon; skl: PaddleClas's JSDivLoss.")
@click.option("--temperature", type=float, default=_default("temperature"), show_default=True,
              help="For --loss kl.")
@click.option("--label-weight", type=float, default=_default("label_weight"),
              show_default=True, help="Add this × cross-entropy on known ground-truth labels.")
@click.option("--views", type=click.Choice(["auto", "replay", "global"]), default="auto",
              show_default=True, help="replay: stored teacher views; global: RandomResizedCrop "
              "with view-0 targets; auto: replay when the stores hold > 1 view.")
@click.option("--crop-scale", type=float, nargs=2, default=_default("crop_scale"),
              show_default=True, metavar="MIN MAX",
              help="RandomResizedCrop area range of global views and --supervised crops.")
@click.option("--autoaugment", default=None, metavar="POLICY",
              help="timm policy after the crop (e.g. rand-m9-mstd0.5); weakens consistency.")
@click.option("--lr-mult", callback=_lr_mult, default=None, metavar="M0,M1,M2,M3,M4",
              help="LR multipliers for stem and stages 1-4 (classifier 1.0).")
@click.option("--init", default=None, metavar="CKPT", help="Start from these student weights.")
@click.option("--freeze-backbone", is_flag=True,
              help="Train the classifier only, with eval preprocessing (FixRes step).")
@click.option("--supervised", is_flag=True,
              help="Baseline: hard labels with label smoothing 0.1.")
@click.option("--teacher", default=None, metavar="NAME", help="Online distillation teacher.")
@click.option("--teacher-checkpoint", default=None, metavar="FILE")
@click.option("--ema", type=float, default=None, metavar="DECAY",
              help="Keep an EMA of the weights (e.g. 0.9998).")
@click.option("--resume", is_flag=True, help="Continue RUN_DIR/last.pt exactly.")
@click.option("--seed", type=int, default=_default("seed"), show_default=True)
@_runtime
@click.pass_context
def train_student_cmd(ctx: click.Context, **options) -> None:
    """Distil a timm student from label stores (or train a baseline).

    \b
    ssld train-student --student mobilenetv3_large_100 --store train.zarr \\
        --store pool.zarr --val imagenet/val --out runs/mv3
    """
    from .trainer import TrainingDiverged, train

    cfg = TrainConfig(**options)
    try:
        result = train(cfg)
    except TrainingDiverged as exc:
        click.echo(f"ssld: training stopped: {exc}", err=True)
        ctx.exit(1)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary
        click.echo(result.summary())


@_command
@click.command("eval")
@click.option("--model", required=True, help="timm model name (or a PaddleClas name).")
@click.option("--checkpoint", required=True, metavar="FILE",
              help="train-student checkpoint or plain state dict (.pt/.pth/.safetensors).")
@click.option("--data", required=True, metavar="SRC", help="Labeled images: class folder or "
              "list file.")
@click.option("--root", default=None, help="Root of a list-file --data.")
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--json", "as_json", is_flag=True,
              help="Print the result as one JSON object (for scripts) instead of a line.")
@_runtime
def eval_cmd(as_json: bool, **options) -> None:
    """Top-1/top-5 accuracy and images/s of a checkpoint on a labeled data set."""
    import json

    from .evaluation import evaluate

    options.pop("threads")  # applied to the process by the option itself
    result = evaluate(**options)
    if as_json:
        click.echo(json.dumps({"model": options["model"], "checkpoint": options["checkpoint"],
                               "data": options["data"], "top1": result.top1,
                               "top5": result.top5, "images": result.images,
                               "seconds": result.seconds,
                               "images_per_s": result.images_per_s}))
    else:
        click.echo(f"{options['model']} {options['checkpoint']}: {result}")
