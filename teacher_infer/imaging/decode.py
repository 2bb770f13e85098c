"""Reading images with PIL, the torch ``Dataset`` both decoders share, and the PIL decoder.

``ViewDataset`` yields one item per row. In ``pil`` mode a worker decodes the image,
plans its views (:mod:`teacher_infer.imaging.views`) and renders them as uint8 tensors; in
``bytes`` mode (a decoder that decodes on the device, DALI) it only reads the image's bytes
and header — enough to plan the views — and leaves decoding to the decoder. Images DALI
cannot read (GIF, PBM ...) are rendered by PIL in the worker instead. Images are read
through a ``teacher_infer.ImageSource`` (files, or byte ranges of tar shards: a batch's
consecutive shard rows are one sequential read). An image that cannot be read or decoded
becomes an item with ``valid=False`` and a one-line reason; it never raises, so the rest of
its batch is kept.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .views import PlannedViews, ViewSpec, eval_geometry, is_eval_box, pixel_box, plan_views

# PIL resampling filters by timm's interpolation names.
PIL_FILTERS = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
               "bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
               "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING}
# Formats nvidia.dali's image decoder reads (PIL's format names); others go through PIL.
DALI_FORMATS = {"JPEG", "PNG", "BMP", "TIFF", "WEBP", "JPEG2000", "PPM"}
_EXIF_ORIENTATION = 0x0112
_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that transpose the image


class DecodeError(Exception):
    """An image that cannot be used; the message is the reason written to failed.txt."""


def _reason(exc: BaseException) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return "not an image (PIL cannot identify the format)"
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode → 8-bit RGB: EXIF orientation applied, alpha dropped, 16-bit scaled.

    16-bit and 32-bit integer images are scaled by 255/65535 with rounding (what DALI
    does); PIL's own ``convert("RGB")`` would clip them to 255 instead.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        values = np.asarray(image, dtype=np.int64).clip(0, 65535)
        image = Image.fromarray(((values + 128) // 257).astype(np.uint8), mode="L")
    elif image.mode == "F":
        image = Image.fromarray(np.asarray(image).clip(0, 255).round().astype(np.uint8), mode="L")
    if image.mode == "RGB":
        return image
    with warnings.catch_warnings():
        # "Palette images with transparency should be converted to RGBA": alpha is dropped anyway
        warnings.simplefilter("ignore", UserWarning)
        return image.convert("RGB")


def _is_16bit_color(image: Image.Image) -> bool:
    """PIL reads 16-bit RGB(A) PNGs as 8-bit by dropping the low byte."""
    return image.format == "PNG" and any(str(tile[3]).startswith(("RGB;16", "RGBA;16"))
                                         for tile in image.tile)


def _decode_16bit_color(data: bytes) -> Image.Image:
    """16-bit RGB(A) PNG → 8-bit RGB rounded like 16-bit gray (and like DALI), via OpenCV."""
    import cv2

    array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if array is None or array.ndim != 3:
        raise DecodeError("cannot decode 16-bit PNG")
    rgb = array[..., 2::-1].astype(np.int64)  # BGR(A) → RGB
    return Image.fromarray(((rgb + 128) // 257).astype(np.uint8), mode="RGB")


_TRANSPOSES = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
               4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
               6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
               8: Image.Transpose.ROTATE_90}


def _orient(image: Image.Image, orientation: int) -> Image.Image:
    method = _TRANSPOSES.get(orientation)
    return image if method is None else image.transpose(method)


def _read_all(source: Any) -> bytes:
    if hasattr(source, "read"):
        source.seek(0)
        return source.read()
    with open(source, "rb") as handle:
        return handle.read()


def open_rgb(source: Any) -> Image.Image:
    """Open and fully decode ``source`` (path or file object) as RGB; DecodeError if it cannot."""
    try:
        with Image.open(source) as image:
            if _is_16bit_color(image):
                orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
                return _orient(_decode_16bit_color(_read_all(source)), orientation)
            image.load()  # decode now: truncated data fails here, not later
            return to_rgb(image)
    except FileNotFoundError:
        raise DecodeError("missing file") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a per-file failure
        raise DecodeError(_reason(exc)) from None


def decode_rgb(data: bytes) -> Image.Image:
    """:func:`open_rgb` of image bytes (from a file or a shard)."""
    return open_rgb(io.BytesIO(data))


def read_reason(exc: OSError) -> str:
    """What failed.txt says of an image whose bytes could not be read."""
    if isinstance(exc, FileNotFoundError):
        return "missing file"
    if isinstance(exc, IsADirectoryError):
        return "is a directory"
    return _reason(exc)


def image_bytes(images: Any, key: str, tar_row: Any = None) -> bytes:
    """The bytes of ``key``'s image from ``images`` (a ``teacher_infer.ImageSource``; with
    its ``tar`` row when it lies in a shard); DecodeError with the reason when they cannot
    be read."""
    try:
        return images.read(key, tar_row)
    except OSError as exc:
        raise DecodeError(read_reason(exc)) from None


def render_box(image: Image.Image, box: np.ndarray, flip: bool, size: tuple[int, int],
               interpolation: str) -> Image.Image:
    """One view: the stored ``box`` of ``image`` resampled to ``size`` (h, w), maybe mirrored."""
    height, width = size
    crop = image.resize((width, height), PIL_FILTERS[interpolation],
                        box=pixel_box(box, image.height, image.width))
    return crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else crop


def render_eval(image: Image.Image, spec: ViewSpec, interpolation: str) -> Image.Image:
    """View 0 with timm's own two steps (resize, center crop): bit-identical to its eval
    transform; the stored view-0 box describes the same region."""
    new_h, new_w, top, left, crop_h, crop_w = eval_geometry(image.height, image.width, spec)
    if (new_h, new_w) != (image.height, image.width):  # torchvision skips a same-size resize
        image = image.resize((new_w, new_h), PIL_FILTERS[interpolation])
    return image.crop((left, top, left + crop_w, top + crop_h))


def render_view(image: Image.Image, box: np.ndarray, flip: bool, view: int, spec: ViewSpec,
                interpolation: str) -> torch.Tensor:
    """View ``view`` of an RGB image as a (3, H, W) uint8 tensor (see views.py). View 0 is
    rendered as timm's eval transform when its box is that transform's (always, unless the
    box comes from another store: then any box is resampled like the other views)."""
    if view == 0 and is_eval_box(box, flip, image.height, image.width, spec):
        crop = render_eval(image, spec, interpolation)
    else:
        crop = render_box(image, box, flip, spec.input_size, interpolation)
    return torch.from_numpy(np.array(crop)).permute(2, 0, 1)


def render_views(image: Image.Image, boxes: np.ndarray, flips: np.ndarray, spec: ViewSpec,
                 interpolation: str) -> torch.Tensor:
    """The views of an RGB image as a (V, 3, H, W) uint8 tensor (:func:`render_view`)."""
    height, width = spec.input_size
    out = torch.empty((len(boxes), 3, height, width), dtype=torch.uint8)
    for view, (box, flip) in enumerate(zip(boxes, flips)):
        out[view] = render_view(image, box, flip, view, spec, interpolation)
    return out


def header_size(data: bytes) -> tuple[int, int, str]:
    """(height, width) after EXIF orientation and the format name, from the header only."""
    if not data:
        raise DecodeError("empty file")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
            fmt = image.format or "?"
    except Exception as exc:  # noqa: BLE001
        raise DecodeError(_reason(exc)) from None
    if orientation in _SWAPS_AXES:
        height, width = width, height
    return height, width, fmt


@dataclass
class Item:
    """One row as a worker returns it."""

    row: int
    boxes: np.ndarray                  # (V, 4) uint16
    flips: np.ndarray                  # (V,) bool
    valid: bool
    reason: str | None = None
    pixels: torch.Tensor | None = None  # (V, 3, H, W) uint8 when decoded by PIL
    encoded: np.ndarray | None = None   # file bytes for DALI
    height: int = 0                     # decoded height (after EXIF orientation) for DALI
    records: Any = None                 # (V,) augmentation records (augment.ViewRecords)
    partners: list | None = None        # "bytes" mode: its partners (augment.render.PartnerItem)


def read_encoded(row: int, data: bytes,
                 plan: Callable[[int, int], tuple[np.ndarray, np.ndarray]],
                 render: Callable[[Image.Image, np.ndarray, np.ndarray], torch.Tensor]) -> Item:
    """Row ``row`` for a decoder that reads image bytes (``data``, read by the caller
    through an ``ImageSource``): the header is read here and the boxes planned from its
    oriented (height, width) with ``plan``; a format DALI cannot read is decoded here and
    its views rendered with ``render`` instead. Raises DecodeError (the caller turns it
    into a failed row or an error)."""
    height, width, fmt = header_size(data)
    boxes, flips = plan(height, width)
    if fmt not in DALI_FORMATS:
        return Item(row, boxes, flips, True, pixels=render(open_rgb(io.BytesIO(data)), boxes,
                                                             flips))
    return Item(row, boxes, flips, True, encoded=np.frombuffer(data, dtype=np.uint8),
                height=height)


class ViewDataset(torch.utils.data.Dataset):
    """Row ``i`` of ``keys`` → :class:`Item`; ``mode`` is ``pil`` or ``bytes``. Images come
    from ``images`` (a ``teacher_infer.ImageSource``), with their ``tar`` rows when they lie
    in shards. With ``planned`` the views are those boxes and flips instead of drawn ones.
    With ``augment`` (an ``augment.source.Augmentation``) each item carries its records; in
    ``pil`` mode its pixels have them applied (ops, erasing, mixing with its partners,
    rendered here), in ``bytes`` mode it carries its partners' bytes for the decoder.

    A DataLoader with a batch sampler fetches a batch with :meth:`__getitems__`: its
    images are read together, consecutive rows of a shard as one sequential range."""

    def __init__(self, images: Any, keys: list[str], spec: ViewSpec, interpolation: str,
                 mode: str = "pil", planned: PlannedViews | None = None, augment: Any = None,
                 tar: np.ndarray | None = None):
        if mode not in ("pil", "bytes"):
            raise ValueError(f"mode must be 'pil' or 'bytes', got {mode!r}")
        self.images, self.keys, self.spec, self.tar = images, keys, spec, tar
        self.interpolation, self.mode = interpolation, mode
        self.planned = planned
        self.augment = augment

    def _plan(self, row: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        if self.planned is None:
            return plan_views(self.keys[row], height, width, self.spec)
        return self.planned.boxes[row], self.planned.flips[row]

    def __len__(self) -> int:
        return len(self.keys)

    def _failed(self, row: int, reason: str) -> Item:
        views = self.spec.views
        # records are drawn or stored without the image: kept for a row that failed, and so
        # are planned boxes (the teacher pass zeroes them where they replay nothing)
        records = None if self.augment is None else self.augment.records(row)
        if self.planned is not None:
            boxes, flips = self.planned.boxes[row], self.planned.flips[row]
        else:
            boxes, flips = np.zeros((views, 4), np.uint16), np.zeros(views, bool)
        return Item(row, boxes, flips, False, reason, records=records)

    def __getitem__(self, row: int) -> Item:
        return self.__getitems__([row])[0]

    def __getitems__(self, rows: list[int]) -> list[Item]:
        rows = [int(row) for row in rows]
        wanted = [row for row in rows if self.planned is None or self.planned.usable[row]]
        read = self.images.read_many([self.keys[row] for row in wanted],
                                     None if self.tar is None else self.tar[wanted])
        found = dict(zip(wanted, read))
        return [self._item(row, *found.get(row, (None, None))) for row in rows]

    def _item(self, row: int, data: bytes | None, error: OSError | None) -> Item:
        if self.planned is not None and not self.planned.usable[row]:
            return self._failed(row, self.planned.reason)
        if error is not None:
            return self._failed(row, read_reason(error))
        try:
            if self.mode == "pil":
                return self.render(row, decode_rgb(data))
            item = read_encoded(
                row, data, lambda height, width: self._plan(row, height, width),
                lambda image, boxes, flips: render_views(image, boxes, flips, self.spec,
                                                         self.interpolation))
            return item if self.augment is None else self._with_partners(item)
        except DecodeError as exc:
            return self._failed(row, str(exc))
        except OSError as exc:
            return self._failed(row, _reason(exc))

    def render(self, row: int, image: Image.Image) -> Item:
        boxes, flips = self._plan(row, image.height, image.width)
        pixels = render_views(image, boxes, flips, self.spec, self.interpolation)
        if self.augment is None:
            return Item(row, boxes, flips, True, pixels=pixels)
        from .augment.render import make_views, render_partner

        def partner_pixels(partner, views):
            return render_partner(partner, views, self.augment, spec=self.spec,
                                  interpolation=self.interpolation, plan=self._plan)

        pixels, records, reason = make_views(pixels, self.augment.records(row), self.augment,
                                             partner_pixels)
        if reason is not None:
            return self._failed(row, reason)
        return Item(row, boxes, flips, True, pixels=pixels, records=records)

    def _with_partners(self, item: Item) -> Item:
        """A ``bytes`` item with its records and its partners' bytes and crops."""
        from .augment.render import read_partners

        partners, records, reason = read_partners(
            self.augment.records(item.row), self.augment, spec=self.spec,
            interpolation=self.interpolation, plan=self._plan)
        if reason is not None:
            return self._failed(item.row, reason)
        item.records, item.partners = records, partners
        return item


@dataclass
class Batch:
    """Consecutive rows ``[start, start + n)`` of one store chunk, collated in the worker
    (one shared-memory tensor per batch instead of one per image)."""

    start: int
    boxes: np.ndarray                   # (n, V, 4) uint16
    flips: np.ndarray                   # (n, V) bool
    valid: np.ndarray                   # (n,) bool
    reasons: list[str | None]           # why a row is invalid
    pixels: torch.Tensor | None         # (V, n, 3, H, W) uint8, view-major; rows PIL rendered
    rendered: np.ndarray                # (n,) bool: rows whose pixels are filled in
    encoded: list[np.ndarray | None]    # file bytes for DALI (None where not to be fed)
    heights: np.ndarray                 # (n,) decoded image heights of the DALI rows
    # augmentation (docs/format.md): the rows' records (n, V) — applied to ``pixels`` already
    # in "pil" mode, by the decoder in "bytes" mode, with ``partners`` (per row)
    records: Any = None
    partners: list | None = None

    def __len__(self) -> int:
        return len(self.valid)

    def pin_memory(self) -> "Batch":
        """Called by the DataLoader (pin_memory=True) for faster host→GPU copies."""
        if self.pixels is not None:
            self.pixels = self.pixels.pin_memory()
        return self


def collate(items: list[Item], *, consecutive: bool = True) -> Batch:
    """One :class:`Batch` of worker items. A store's batch holds consecutive rows (checked);
    training batches (``consecutive=False``) hold any samples, ``start`` is then the first's."""
    rows = [item.row for item in items]
    if consecutive and rows != list(range(rows[0], rows[0] + len(rows))):
        raise ValueError("a batch must hold consecutive rows")
    rendered = np.array([item.pixels is not None for item in items], dtype=bool)
    pixels = None
    if rendered.any():
        shape = next(item.pixels.shape for item in items if item.pixels is not None)
        pixels = torch.zeros((shape[0], len(items)) + tuple(shape[1:]), dtype=torch.uint8)
        for i, item in enumerate(items):
            if item.pixels is not None:
                pixels[:, i] = item.pixels
    records = None
    if items[0].records is not None:
        from .augment.records import ViewRecords

        records = ViewRecords.stack([item.records for item in items])
    return Batch(start=rows[0], boxes=np.stack([item.boxes for item in items]),
                 flips=np.stack([item.flips for item in items]),
                 valid=np.array([item.valid for item in items], dtype=bool),
                 reasons=[item.reason for item in items], pixels=pixels, rendered=rendered,
                 encoded=[item.encoded for item in items],
                 heights=np.array([item.height for item in items], dtype=np.int64),
                 records=records, partners=[item.partners for item in items])


def batch_ranges(chunks: list[tuple[int, int]], batch_size: int,
                 views: int = 1) -> list[list[int]]:
    """Row lists of the batches: never across a chunk boundary, so a batch's composition
    (and hence its exact floating-point result) is the same on resume and on any rank count.

    ``batch_size`` counts images as the model sees them, views included: a batch holds
    ``batch_size // views`` rows (at least one), so its pixels and the forward pass stay the
    size of ``batch_size`` images whatever ``views`` is (a row with more views than that is
    forwarded ``batch_size`` views at a time: ``teacher_infer.infer.in_chunks``).
    """
    rows = max(1, batch_size // views)
    batches = []
    for start, stop in chunks:
        for lo in range(start, stop, rows):
            batches.append(list(range(lo, min(lo + rows, stop))))
    return batches


def pixels_to_input(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, H, W) → normalised float32, with torchvision's ToTensor + Normalize ops."""
    return pixels.to(torch.float32).div(255).sub_(mean[:, None, None]).div_(std[:, None, None])


class PilDecoder:
    """``--decoder pil``: the DataLoader workers decode and render every view with PIL
    (``ViewDataset`` in ``pil`` mode); here the uint8 pixels only move to the device and are
    normalised. The protocol every decoder follows is in :mod:`teacher_infer.imaging.decoders`.
    """

    name = "pil"
    worker_mode = "pil"
    # `auto` on the CPU: forked PIL workers decode faster than DALI's CPU mode there
    # (docs/benchmarks.md, "Teacher inference"); on a GPU, the fallback when DALI is missing
    preferred_on = ("cpu",)

    def __init__(self, *, spec: ViewSpec, interpolation: str, mean, std, max_batch: int,
                 device: torch.device, num_threads: int, augment=None):
        # the workers render, records applied (ViewDataset's augment): nothing to build
        del spec, interpolation, max_batch, num_threads, augment
        self.device = device
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device)
        self.std = torch.tensor(std, dtype=torch.float32, device=device)

    @staticmethod
    def unavailable() -> str | None:
        return None  # PIL is a dependency of ssld

    @staticmethod
    def default_workers(cpus: int) -> int:
        """PIL decodes in the workers: one per core, at most 16."""
        return max(1, min(16, cpus))

    def decode(self, batches: Iterable[Batch]) -> Iterator[tuple[Batch, torch.Tensor | None]]:
        """``(batch, images)`` in order; ``images`` is None when every row failed."""
        for batch in batches:
            if batch.pixels is None:
                yield batch, None
                continue
            pixels = batch.pixels.to(self.device, non_blocking=True)
            yield batch, pixels_to_input(pixels, self.mean, self.std)
