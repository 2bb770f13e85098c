"""Shared fixtures: tiny generated image data sets and tiny timm checkpoints.

Everything is generated (no downloads), deterministic, and session-scoped unless said
otherwise, so any test module can use it for free after the first use. Images are smooth
random pictures (low-resolution noise upsampled, plus a gradient), so that crops and
resizes change them and a model's outputs depend on where it looks.

Data sets (each an :class:`ImageSet`: ``.data`` is what to pass as ``--data``, ``.root``
what keys are relative to, ``.keys`` / ``.labels`` / ``.class_names`` what a reader should
find, ``.path(key)`` the file):

``image_folder``      ImageNet layout ``root/<class>/<image>``: 3 classes × 4 images, mixed
                      sizes (landscape and portrait), extensions in mixed case.
``unlabeled_folder``  a folder of images with no classes: top-level and nested files, plus a
                      text file, a hidden file and an image in a hidden folder (all ignored).
``list_file``         a PaddleClas list ``relative/path label`` over ``image_folder``'s images
                      (one line without a label, a comment and a blank line).
``mode_images``       one image per mode the readers must turn into RGB: L, CMYK, RGBA, LA,
                      P (with transparency), 1-bit, 16-bit gray and 16-bit RGB PNG, EXIF-rotated
                      JPEGs, WebP, BMP, TIFF, GIF. ``.extra["expected_size"][key]`` is the
                      (height, width) after EXIF orientation.
``broken_images``     good images plus a zero-byte JPEG, a truncated JPEG, a text file named
                      .png, random bytes named .jpg; its list file also names a missing file.
                      ``.extra["bad"]`` maps each bad key to what is wrong with it.

Helpers: :func:`make_image` writes one image of any of those modes; :func:`write_png16`
writes 16-bit RGB PNGs (PIL cannot). Models: the ``make_checkpoint`` factory saves a tiny
timm model with seeded random weights in several on-disk forms and returns the path.
``one_torch_thread`` (opt-in, e.g. ``pytestmark = pytest.mark.usefixtures(...)``) runs a
test with one torch thread: on a shared two-core machine tiny models run several times
faster that way than with two threads spinning against other processes.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from PIL import Image

# timm's 0.27M-parameter test ConvNeXt (1000 classes, bicubic, 160 px default). Unlike the test
# ResNets, whose randomly initialised outputs barely depend on the image, its outputs vary with
# the image about as much as across classes, so agreement tests mean something.
TINY_MODEL = "test_convnext"
TINY_INPUT = 64              # input size the tests run it at (fast on two CPU cores)


@dataclass
class ImageSet:
    """A generated data set; see the module docstring."""

    data: Path                            # --data: a folder or a list file
    root: Path                            # folder keys are relative to
    keys: list[str]                       # in the order a reader must list them
    labels: list[int]                     # -1 where unknown
    class_names: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def path(self, key: str) -> Path:
        return self.root / key

    def __len__(self) -> int:
        return len(self.keys)


def smooth_rgb(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth random (height, width, 3) uint8 picture."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC),
                       dtype=np.float32)
    ramp = np.linspace(0, 60, width, dtype=np.float32)[None, :, None]
    return np.clip(image * 0.8 + ramp, 0, 255).astype(np.uint8)


def write_png16(path: Path, array: np.ndarray) -> Path:
    """Write a (H, W, 3) uint16 array as a 16-bit RGB PNG (PIL cannot write one)."""
    height, width, _ = array.shape
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in array)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                           + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return Path(path)


def make_image(path: Path | str, *, size: tuple[int, int] = (48, 40), mode: str = "RGB",
               seed: int = 0, exif_orientation: int | None = None, quality: int = 92) -> Path:
    """Write a smooth random image of ``size`` (width, height) in PIL ``mode``.

    Extra modes: ``"I;16"`` (16-bit gray PNG), ``"RGB;16"`` (16-bit RGB PNG). The format
    follows the file extension; JPEGs get ``quality`` and, if given, an EXIF orientation.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    width, height = size
    rgb = smooth_rgb(height, width, seed)
    if mode == "RGB;16":
        return write_png16(path, rgb.astype(np.uint16) * 257 + np.uint16(seed % 200))
    if mode == "I;16":
        gray = np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.uint16) * 257
        image = Image.fromarray(gray)
    elif mode == "P":
        image = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
        image.info["transparency"] = 0
    elif mode in ("RGBA", "LA"):
        image = Image.fromarray(rgb).convert(mode)
        alpha = Image.fromarray(np.linspace(0, 255, width, dtype=np.uint8)[None].repeat(height, 0))
        image.putalpha(alpha)
    else:
        image = Image.fromarray(rgb).convert(mode)
    kwargs: dict[str, Any] = {}
    if path.suffix.lower() in (".jpg", ".jpeg"):
        kwargs["quality"] = quality
        if exif_orientation is not None:
            exif = Image.Exif()
            exif[0x0112] = exif_orientation
            kwargs["exif"] = exif
    if mode == "P":
        kwargs["transparency"] = 0
    image.save(path, **kwargs)
    return path


SIZES = [(64, 48), (48, 64), (80, 60), (56, 56), (72, 40), (40, 72)]  # (width, height)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> ImageSet:
    """ImageNet layout: 3 classes × 4 images (see module docstring)."""
    root = tmp_path_factory.mktemp("folder")
    classes = ["n01_cat", "n02_dog", "n03_fox"]
    extensions = [".jpg", ".JPEG", ".png", ".Jpg"]
    keys, labels = [], []
    for label, name in enumerate(classes):
        for i, ext in enumerate(extensions):
            key = f"{name}/img{i}{ext}"
            make_image(root / key, size=SIZES[(label + i) % len(SIZES)], seed=100 * label + i)
            keys.append(key)
            labels.append(label)
    order = sorted(range(len(keys)), key=lambda j: (labels[j], keys[j]))
    return ImageSet(root, root, [keys[j] for j in order], [labels[j] for j in order], classes)


@pytest.fixture(scope="session")
def unlabeled_folder(tmp_path_factory) -> ImageSet:
    """Images without classes, top-level and nested; non-images and hidden entries ignored."""
    root = tmp_path_factory.mktemp("unlabeled")
    keys = ["a.jpg", "b.PNG", "c.jpeg", "sub/d.jpg", "sub/deeper/e.webp"]
    for i, key in enumerate(keys):
        make_image(root / key, size=SIZES[i % len(SIZES)], seed=500 + i)
    (root / "readme.txt").write_text("not an image")
    make_image(root / ".hidden.jpg", seed=1)
    make_image(root / ".cache" / "f.jpg", seed=2)
    return ImageSet(root, root, sorted(keys), [-1] * len(keys))


@pytest.fixture(scope="session")
def list_file(image_folder, tmp_path_factory) -> ImageSet:
    """PaddleClas list over image_folder's images, in a non-sorted order."""
    folder = tmp_path_factory.mktemp("lists")
    order = list(reversed(range(len(image_folder))))
    keys = [image_folder.keys[j] for j in order]
    labels = [image_folder.labels[j] for j in order]
    labels[3] = -1
    lines = ["# PaddleClas list: relative/path label", ""]
    lines += [key if label == -1 else f"{key} {label}" for key, label in zip(keys, labels)]
    data = folder / "train_list.txt"
    data.write_text("\n".join(lines) + "\n")
    return ImageSet(data, image_folder.root, keys, labels)


@pytest.fixture(scope="session")
def mode_images(tmp_path_factory) -> ImageSet:
    """One image per mode/format the readers must handle (see module docstring)."""
    root = tmp_path_factory.mktemp("modes")
    specs = {  # key: (mode, exif orientation)
        "rgb.jpg": ("RGB", None), "gray.jpg": ("L", None), "cmyk.jpg": ("CMYK", None),
        "rgba.png": ("RGBA", None), "la.png": ("LA", None), "palette.png": ("P", None),
        "bilevel.png": ("1", None), "gray16.png": ("I;16", None), "rgb16.png": ("RGB;16", None),
        "exif_rot90.jpg": ("RGB", 6), "exif_rot180.jpg": ("RGB", 3), "exif_rot270.jpg": ("RGB", 8),
        "x.webp": ("RGB", None), "x.bmp": ("RGB", None), "x.tif": ("RGB", None),
        "x.gif": ("P", None),
    }
    expected = {}
    for i, (key, (mode, orientation)) in enumerate(specs.items()):
        width, height = 64, 44
        make_image(root / key, size=(width, height), mode=mode, seed=900 + i,
                   exif_orientation=orientation)
        expected[key] = (width, height) if orientation in (6, 8) else (height, width)
    keys = sorted(specs)
    return ImageSet(root, root, keys, [-1] * len(keys), extra={"expected_size": expected})


@pytest.fixture(scope="session")
def broken_images(tmp_path_factory) -> ImageSet:
    """Good images mixed with bad ones; ``data`` is a list file that also names a missing file."""
    root = tmp_path_factory.mktemp("broken")
    good = [f"good{i}.jpg" for i in range(5)]
    for i, key in enumerate(good):
        make_image(root / key, size=SIZES[i % len(SIZES)], seed=700 + i)
    (root / "zero.jpg").write_bytes(b"")
    full = make_image(root / "full.jpg", size=(64, 64), seed=9).read_bytes()
    (root / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (root / "full.jpg").unlink()
    (root / "text.png").write_text("this is not a picture\n")
    (root / "noise.jpg").write_bytes(np.random.default_rng(0).bytes(2048))
    bad = {"zero.jpg": "zero bytes", "truncated.jpg": "truncated JPEG", "text.png": "text",
           "noise.jpg": "random bytes", "missing.jpg": "missing file"}
    keys = [good[0], "zero.jpg", good[1], "truncated.jpg", good[2], "text.png", "noise.jpg",
            good[3], "missing.jpg", good[4]]
    data = root / "list.txt"
    data.write_text("\n".join(keys) + "\n")
    return ImageSet(data, root, keys, [-1] * len(keys), extra={"bad": bad})


@pytest.fixture
def one_torch_thread():
    """Run the test with ``torch.set_num_threads(1)``; the previous count is restored."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory) -> Callable[..., Path]:
    """Factory: ``make_checkpoint(model="test_resnet", form="pth", num_classes=None, seed=0)``.

    Saves a timm model with weights drawn by ``torch.manual_seed(seed)`` — the classifier
    scaled by 20, so that the random model is confident (top-1 probability ≈ 0.3 on average
    for ``test_convnext`` at 64 px) and its top-1 differs between images — and returns the
    path. ``form``: ``pth`` / ``safetensors`` (plain state dicts), ``train`` (a training
    checkpoint ``{"epoch", "state_dict", "model_ema"}`` whose EMA weights are the ones to
    use), ``ddp`` (keys prefixed with ``module.``). Files are cached per arguments.
    """
    folder = tmp_path_factory.mktemp("checkpoints")
    cache: dict[tuple, Path] = {}

    def make(model: str = TINY_MODEL, form: str = "pth", num_classes: int | None = None,
             seed: int = 0) -> Path:
        import timm
        import torch

        key = (model, form, num_classes, seed)
        if key in cache:
            return cache[key]
        torch.manual_seed(seed)
        kwargs = {} if num_classes is None else {"num_classes": num_classes}
        net = timm.create_model(model, **kwargs)
        with torch.no_grad():
            net.get_classifier().weight.mul_(20.0)
            net.get_classifier().bias.mul_(20.0)
        state = net.state_dict()
        path = folder / f"{model}-{num_classes}-{seed}-{form}" \
            f"{'.safetensors' if form == 'safetensors' else '.pth'}"
        if form == "safetensors":
            from safetensors.torch import save_file
            save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        elif form == "train":
            decoy = {k: torch.zeros_like(v) for k, v in state.items()}
            torch.save({"epoch": 3, "state_dict": decoy, "model_ema": state}, path)
        elif form == "ddp":
            torch.save({f"module.{k}": v for k, v in state.items()}, path)
        elif form == "pth":
            torch.save(state, path)
        else:
            raise ValueError(f"unknown checkpoint form {form!r}")
        cache[key] = path
        return path

    return make
