"""``ssld infer-teacher``: options → :class:`InferConfig` → ``teacher_infer.run``; ``ssld verify``
(a store against its recorded teacher) → ``teacher_infer.verify``."""
from __future__ import annotations

import os

import click

from labelstore import threads_option

from .config import DECODERS, DEVICES, PRECISIONS, SOURCES

commands: list[click.Command] = []


@click.command("infer-teacher")
@click.option("--model", required=True,
              help="timm name (arch or arch.tag) or PaddleClas name, e.g. resnext101_32x16d_wsl.")
@click.option("--checkpoint", type=click.Path(dir_okay=False),
              help="Weights: state dict or training checkpoint (.pth, .pt, .safetensors).")
@click.option("--pretrained", is_flag=True, help="Weights from timm's hub cache (no waiting on "
              "a network: fails at once when they are not cached and the hub is unreachable).")
@click.option("--random-weights", is_flag=True,
              help="Run without weights (seeded by --seed); for tests and benchmarks.")
@click.option("--data", help="Class-folder root, unlabeled image folder, or a list file of "
              "'relative/path [label]' lines (optional with --views-from).")
@click.option("--views-from", type=click.Path(), help="Label store whose rows, dataset root, "
              "views, boxes and flips to reuse: this teacher labels exactly its crops.")
@click.option("--root", help="Folder the list file's paths are relative to (default: its folder).")
@click.option("--source", type=click.Choice(SOURCES), default="auto", show_default=True,
              help="Kind of --data when a folder is ambiguous.")
@click.option("--out", required=True, help="Label store to write or resume (NAME.zarr).")
@click.option("--topk", default=10, show_default=True, help="Classes kept per view.")
@click.option("--views", default=1, show_default=True,
              help="Views per image (view 0: eval crop; the others: RandomResizedCrop + flip).")
@click.option("--seed", default=0, show_default=True, help="Seed of the view boxes.")
@click.option("--crop-scale", nargs=2, type=float, default=(0.08, 1.0), show_default=True,
              help="Area range of the random views.")
@click.option("--crop-ratio", nargs=2, type=float, default=(3 / 4, 4 / 3),
              show_default="0.75 1.333",
              help="Aspect-ratio range of the random views.")
@click.option("--temperature", default=1.0, show_default=True, help="Softmax temperature.")
@click.option("--input-size", type=int, help="Input side in pixels [model's].")
@click.option("--interpolation", type=click.Choice(["bilinear", "bicubic", "nearest", "lanczos"]),
              help="Resize filter [model's].")
@click.option("--mean", nargs=3, type=float, default=None, help="Normalisation mean R G B [model's].")
@click.option("--std", nargs=3, type=float, default=None, help="Normalisation std R G B [model's].")
@click.option("--crop-pct", type=float, help="Center-crop fraction of view 0 [model's].")
@click.option("--batch-size", default=64, show_default=True, help="Images per forward pass.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("--decoder", type=click.Choice(DECODERS), default="auto", show_default=True,
              help="auto = DALI when installed, else PIL.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True)
@click.option("--channels-last", is_flag=True, help="channels_last memory format.")
@click.option("--compile", "compile_model", is_flag=True, help="torch.compile the forward.")
@click.option("--num-workers", type=int, help="Data-loading workers per rank [from CPU count].")
@click.option("--num-classes", type=int, help="Classifier size when it differs from the model's.")
@click.option("--class-names", type=click.Path(exists=True, dir_okay=False),
              help="File with one class name per line, recorded in the store.")
@click.option("--chunk-rows", type=int, help="Rows per store chunk [16384].")
@click.option("--embeddings", is_flag=True, help="Also store view 0's pooled features (fp16).")
@click.option("--overwrite", is_flag=True, help="Replace --out instead of resuming it.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@threads_option
def infer_teacher(model, checkpoint, pretrained, random_weights, data, views_from, root, source,
                  out, topk, views, seed, crop_scale, crop_ratio, temperature, input_size,
                  interpolation, mean, std, crop_pct, batch_size, device, decoder, precision, channels_last,
                  compile_model, num_workers, num_classes, class_names, chunk_rows, embeddings,
                  overwrite, no_progress, threads) -> None:
    """Run a teacher once over a data set and write its top-k soft labels to a label store.

    Rerunning the same command resumes an interrupted store; under torchrun every rank
    takes whole store chunks. With --views-from STORE the rows, views, boxes and flips are
    STORE's (--views and the view-sampling options are not used), e.g. to ensemble teachers.
    """
    from teacher_infer import InferConfig, run

    cfg = InferConfig(
        model=model, data=data, out=out, root=root, source=source, checkpoint=checkpoint,
        pretrained=pretrained, random_weights=random_weights, num_classes=num_classes,
        class_names=class_names, views_from=views_from, topk=topk, views=views, seed=seed,
        crop_scale=crop_scale, crop_ratio=crop_ratio, temperature=temperature, input_size=input_size,
        interpolation=interpolation, mean=mean or None, std=std or None, crop_pct=crop_pct,
        batch_size=batch_size, device=device, decoder=decoder, precision=precision,
        channels_last=channels_last, compile=compile_model, num_workers=num_workers,
        chunk_rows=chunk_rows, embeddings=embeddings, overwrite=overwrite,
        progress=not no_progress)
    summary = run(cfg)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary line
        click.echo(str(summary))


commands.append(infer_teacher)


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
    options = {"atol": atol, "min_agreement": min_agreement}
    if structure_only:  # the store alone: no torch
        from labelstore import verify as verify_structure

        result = verify_structure(store, **{k: v for k, v in options.items() if v is not None})
    else:
        from teacher_infer import verify

        result = verify(store, sample=sample, checkpoint=list(checkpoints) or None, root=root,
                        seed=seed, device=device, decoder=decoder, **options)
    click.echo(result)
    if not result.ok:
        ctx.exit(1)


commands.append(verify_cmd)
