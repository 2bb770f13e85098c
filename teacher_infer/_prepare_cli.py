"""``ssld prepare``: write small real data sets as image files (digits, Fashion-MNIST)."""
from __future__ import annotations

import click

from .cli_options import config_option, overwrite_option, progress_option

from .prepare import prepare_digits, prepare_fashion_mnist  # numpy only: no torch

commands: list[click.Command] = []


@click.group("prepare")
def prepare() -> None:
    """Write a small real data set as PNG files in ImageNet layout plus list files."""


@prepare.command("fashion-mnist")
@config_option(prepare_fashion_mnist, "src",
               help="Folder with the IDX files (Debian package dataset-fashion-mnist).")
@click.option("--out", required=True, help="Output folder.")
@config_option(prepare_fashion_mnist, "labeled_per_class",
               help="Training images per class in the labeled set L; the rest form the pool U.")
@config_option(prepare_fashion_mnist, "seed", help="Seed of the L/U split.")
@overwrite_option
@progress_option
def fashion_mnist(out: str, **options) -> None:
    """Fashion-MNIST: L = 600/class of train, U = the other 54,000, V = the 10,000 test images."""
    click.echo(prepare_fashion_mnist(out, **options).describe("fashion-mnist"))


@prepare.command("digits")
@click.option("--out", required=True, help="Output folder.")
@config_option(prepare_digits, "labeled_per_class",
               help="Images per class in the labeled set L (after V is drawn).")
@config_option(prepare_digits, "val_per_class", help="Images per class in the validation set V.")
@config_option(prepare_digits, "seed", help="Seed of the splits.")
@overwrite_option
@progress_option
def digits(out: str, **options) -> None:
    """scikit-learn's bundled digits (1,797 8x8 images) split into labeled / pool / val."""
    click.echo(prepare_digits(out, **options).describe("digits"))


commands.append(prepare)
