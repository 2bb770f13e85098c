"""``ssld prepare``: write small real data sets as image files (digits, Fashion-MNIST)."""
from __future__ import annotations

import click

commands: list[click.Command] = []


def _summary(name: str, layout) -> None:
    click.echo(f"{name}: {layout.num_labeled:,} labeled, {layout.num_pool:,} pool (labels "
               f"hidden), {layout.num_val:,} val images, {layout.num_classes} classes\n"
               f"  images under {layout.root}\n"
               f"  lists: {layout.labeled}, {layout.pool}, {layout.val} (use --root {layout.root})")


@click.group("prepare")
def prepare() -> None:
    """Write a small real data set as PNG files in ImageNet layout plus list files."""


@prepare.command("fashion-mnist")
@click.option("--src", default="/usr/share/datasets/fashion-mnist", show_default=True,
              help="Folder with the IDX files (Debian package dataset-fashion-mnist).")
@click.option("--out", required=True, help="Output folder.")
@click.option("--labeled-per-class", default=600, show_default=True,
              help="Training images per class in the labeled set L; the rest form the pool U.")
@click.option("--seed", default=0, show_default=True, help="Seed of the L/U split.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
def fashion_mnist(src: str, out: str, labeled_per_class: int, seed: int, overwrite: bool) -> None:
    """Fashion-MNIST: L = 600/class of train, U = the other 54,000, V = the 10,000 test images."""
    from teacher_infer.prepare import prepare_fashion_mnist

    _summary("fashion-mnist", prepare_fashion_mnist(out, src=src, seed=seed, overwrite=overwrite,
                                                    labeled_per_class=labeled_per_class))


@prepare.command("digits")
@click.option("--out", required=True, help="Output folder.")
@click.option("--labeled-per-class", default=20, show_default=True)
@click.option("--val-per-class", default=36, show_default=True)
@click.option("--seed", default=0, show_default=True, help="Seed of the splits.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
def digits(out: str, labeled_per_class: int, val_per_class: int, seed: int,
           overwrite: bool) -> None:
    """scikit-learn's bundled digits (1,797 8x8 images) split into labeled / pool / val."""
    from teacher_infer.prepare import prepare_digits

    _summary("digits", prepare_digits(out, labeled_per_class=labeled_per_class,
                                      val_per_class=val_per_class, seed=seed,
                                      overwrite=overwrite))


commands.append(prepare)
