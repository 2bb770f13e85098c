"""Decoding with NVIDIA DALI: one pipeline for the GPU (``mixed``: nvJPEG, hardware JPEG
decoder where present) and the CPU (``device_id=None``, what CI runs).

The pipeline decodes each image once and, per view, resamples the stored box with
``fn.resize`` and relative ROIs — the same region PIL's ``resize(box=...)`` reads (see
views.py) — in two 8-bit passes, horizontal then vertical, as PIL does, so both decoders
differ by a grey level on a few pixels rather than by the rounding of every pixel. Then
it mirrors and normalises (``fn.crop_mirror_normalize``). Boxes and flips are planned
from the image header before decoding and fed with ``fn.external_source``: both decoders
crop the same boxes. The pipeline runs one batch at a time on a background thread, up to
``IN_FLIGHT`` batches ahead of the model.

Failures: files that cannot be read or whose header does not parse never reach DALI
(:class:`~teacher_infer.imaging.decode.ViewDataset` marks them invalid). DALI stops the whole
batch when one file inside is corrupt (e.g. truncated JPEG data) and its pipeline is
then unusable, so the pipeline is rebuilt and that batch is decoded again one file at a
time through DALI; a file DALI still refuses is tried with PIL, and only when PIL
fails too is it marked invalid (reason from both). The good files of the batch keep
DALI's result.
"""
from __future__ import annotations

import io
import queue
import re
import threading
from typing import Iterable, Iterator

import numpy as np
import torch

from .decode import Batch, DecodeError, open_rgb, pixels_to_input, render_views
from .views import ViewSpec, separable_roi

IN_FLIGHT = 2  # decoded batches waiting for the model (decoding overlaps compute)


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def _interp_type(name: str):
    from nvidia.dali import types

    table = {"bilinear": types.INTERP_LINEAR, "bicubic": types.INTERP_CUBIC,
             "nearest": types.INTERP_NN, "lanczos": types.INTERP_LANCZOS3}
    if name not in table:
        raise ValueError(f"interpolation {name!r} has no DALI equivalent (DALI: "
                         f"{', '.join(table)}); use --decoder pil or --interpolation bilinear")
    return table[name]


def _dali_reason(exc: BaseException) -> str:
    text = str(exc)
    found = re.search(r"encountered:\s*(.*?)\s*(Current pipeline object|$)", text, re.S)
    reason = " ".join((found.group(1) if found else text).split())
    return (reason or type(exc).__name__)[:200]


class DaliDecoder:
    """Turns :class:`Batch` es (file bytes + planned boxes) into model input on ``device``.

    ``decode(batches)`` yields ``(batch, images)`` in order, ``images`` a (V, n, 3, H, W)
    float32 tensor, normalised with ``mean``/``std`` (fractions of 1). Rows it could not
    decode are set invalid in the batch and left at zero.
    """

    name = "dali"
    worker_mode = "bytes"  # workers read files and headers; decoding happens here
    preferred_on = ("cuda",)  # `auto` on a GPU: nvJPEG decodes there, beside the model

    @staticmethod
    def unavailable() -> str | None:
        if dali_available():
            return None
        return ("nvidia.dali is not installed (pip install nvidia-dali-cuda120, or use "
                "--decoder pil)")

    @staticmethod
    def default_workers(cpus: int) -> int:
        """The workers only read files and headers, so on a small machine the decode thread
        reads them itself and DALI keeps every core."""
        return 0 if cpus <= 4 else min(4, cpus // 4)

    def __init__(self, *, spec: ViewSpec, interpolation: str, mean, std, max_batch: int,
                 device: torch.device, num_threads: int, augment=None):
        self.spec, self.interpolation = spec, interpolation
        # With augmentation records (an ``augment.source.Augmentation``) the pipeline
        # outputs uint8 crops, and the records are applied on the device after decoding
        # (ops, erasing, then mixing with the partners, decoded by the same pipeline),
        # before normalising: the ops work on uint8 pixels (docs/format.md).
        self.augment = augment
        self.device = device
        self.max_batch, self.num_threads = int(max_batch), max(1, int(num_threads))
        self._interp = _interp_type(interpolation)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device)
        self.std = torch.tensor(std, dtype=torch.float32, device=device)
        self._pipe = None
        self.rebuilds = 0
        # DALI's outputs are copied into torch tensors on a stream of our own (GPU).
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._build()

    # -- the pipeline -------------------------------------------------------------
    def _build(self) -> None:
        from nvidia.dali import fn, pipeline_def, types

        gpu = self.device.type == "cuda"
        views, (height, width) = self.spec.views, self.spec.input_size
        # uint8 for the records (normalised after them), else normalised here
        normalize = {"dtype": types.UINT8} if self.augment is not None else {
            "dtype": types.FLOAT, "mean": [255.0 * m for m in self.mean.tolist()],
            "std": [255.0 * s for s in self.std.tolist()]}
        resize = {"interp_type": self._interp, "antialias": True, "dtype": types.UINT8}

        @pipeline_def(batch_size=self.max_batch, num_threads=self.num_threads,
                      device_id=(self.device.index or 0) if gpu else None,
                      prefetch_queue_depth=1)  # fed and run one batch at a time
        def pipeline():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            image = fn.decoders.image(encoded, device="mixed" if gpu else "cpu",
                                      output_type=types.RGB)
            height_in = fn.external_source(name="height", dtype=types.FLOAT, ndim=0)
            outputs = []
            for view in range(views):
                roi = {name: fn.external_source(name=f"{name}{view}", dtype=types.FLOAT, ndim=1)
                       for name in ("x_start", "x_end", "y_start", "y_end")}
                mirror = fn.external_source(name=f"mirror{view}", dtype=types.INT32, ndim=0)
                # Two 8-bit passes, horizontal first, as PIL resamples: the result matches the
                # PIL decoder to a grey level on a few pixels instead of differing by the
                # rounding of every pixel.
                rows = fn.resize(image, resize_x=width, resize_y=height_in,
                                 roi_start=roi["x_start"], roi_end=roi["x_end"],
                                 roi_relative=True, **resize)
                crop = fn.resize(rows, resize_x=width, resize_y=height,
                                 roi_start=roi["y_start"], roi_end=roi["y_end"],
                                 roi_relative=True, **resize)
                outputs.append(fn.crop_mirror_normalize(crop, mirror=mirror, output_layout="CHW",
                                                        **normalize))
            return tuple(outputs)

        self._pipe = pipeline()
        self._pipe.build()

    def _rebuild(self) -> None:
        self._pipe = None
        self.rebuilds += 1
        self._build()

    def _decode_sync(self, encoded: list[np.ndarray], heights: np.ndarray, boxes: np.ndarray,
                     flips: np.ndarray) -> torch.Tensor:
        """Decode ``len(encoded)`` images now; a (V, n, 3, H, W) tensor on ``self.device``."""
        from nvidia.dali.plugin.pytorch import feed_ndarray

        roi = separable_roi(boxes)  # name -> (n, V, 2)
        self._pipe.feed_input("encoded", encoded)
        self._pipe.feed_input("height", list(heights.astype(np.float32)))
        for view in range(self.spec.views):
            for name, value in roi.items():
                self._pipe.feed_input(f"{name}{view}", list(value[:, view]))
            self._pipe.feed_input(f"mirror{view}", list(flips[:, view].astype(np.int32)))
        outputs = self._pipe.run()
        height, width = self.spec.input_size
        images = torch.empty((self.spec.views, len(encoded), 3, height, width),
                             dtype=self._dtype, device=self.device)
        if self._stream is not None:
            # ``images`` may reuse memory that kernels queued on the current stream (the
            # model's forward) still read: our copy stream waits for them before writing.
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
        for view, output in enumerate(outputs):
            feed_ndarray(output.as_tensor(), images[view], cuda_stream=self._stream)
        if self._stream is not None:
            # DALI reuses its output buffers on the next run: the copies must be finished.
            self._stream.synchronize()
        return images

    # -- batches ------------------------------------------------------------------
    def decode(self, batches: Iterable[Batch]) -> Iterator[tuple[Batch, torch.Tensor]]:
        """Decode ``batches`` in a background thread, up to ``IN_FLIGHT`` ahead of the caller,
        so that DALI's work overlaps the model's."""
        results: queue.Queue = queue.Queue(maxsize=IN_FLIGHT)
        stop = threading.Event()
        done = object()

        def work() -> None:
            try:
                if self._stream is not None:
                    torch.cuda.set_device(self.device)
                for batch in batches:
                    item = (batch, self.decode_batch(batch))
                    while not stop.is_set():
                        try:
                            results.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                results.put(done)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                results.put(exc)

        thread = threading.Thread(target=work, name="dali-decode", daemon=True)
        thread.start()
        try:
            while True:
                item = results.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while thread.is_alive():
                try:
                    results.get(timeout=0.1)
                except queue.Empty:
                    pass
            thread.join()

    @property
    def _dtype(self) -> torch.dtype:
        """What the pipeline outputs: uint8 crops when records follow, else model input."""
        return torch.uint8 if self.augment is not None else torch.float32

    def _pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """PIL-rendered uint8 crops as the pipeline would output them."""
        pixels = pixels.to(self.device)
        return pixels if self.augment is not None else pixels_to_input(pixels, self.mean,
                                                                      self.std)

    def _decode_rows(self, encoded: list, heights: np.ndarray, boxes: np.ndarray,
                     flips: np.ndarray) -> tuple[torch.Tensor, dict[int, str]]:
        """(V, m, 3, H, W) crops of ``m`` files (pipeline dtype) and, by index, the reason
        of those neither DALI nor PIL could decode (left at zero). A corrupt file stops
        DALI's batch and breaks the pipeline: it is rebuilt and the files are decoded one
        at a time, a file DALI still refuses through PIL."""
        height, width = self.spec.input_size
        images = torch.zeros((self.spec.views, len(encoded), 3, height, width),
                             dtype=self._dtype, device=self.device)
        failed: dict[int, str] = {}
        if not encoded:
            return images, failed
        try:
            images[:] = self._decode_sync(encoded, heights, boxes, flips)
            return images, failed
        except RuntimeError:
            self._rebuild()
        for i, data in enumerate(encoded):
            try:
                images[:, i:i + 1] = self._decode_sync([data], heights[i:i + 1],
                                                       boxes[i:i + 1], flips[i:i + 1])
                continue
            except RuntimeError as exc:
                self._rebuild()
                dali_reason = _dali_reason(exc)
            try:
                image = open_rgb(io.BytesIO(data.tobytes()))
            except DecodeError as exc:
                failed[i] = f"{exc} (DALI: {dali_reason})"
                continue
            images[:, i] = self._pixels(render_views(image, boxes[i], flips[i], self.spec,
                                                     self.interpolation))
        return images, failed

    def decode_batch(self, batch: Batch) -> torch.Tensor:
        """A (V, n, 3, H, W) float32 tensor of the batch; rows DALI could not decode (and PIL
        neither) are set invalid in ``batch`` and left at zero. With records, they are
        applied here (``augment.render.finish_on_device``), their partners decoded too."""
        rows = [i for i, data in enumerate(batch.encoded) if data is not None and batch.valid[i]]
        height, width = self.spec.input_size
        images = torch.zeros((self.spec.views, len(batch), 3, height, width),
                             dtype=self._dtype, device=self.device)
        if rows:
            decoded, failed = self._decode_rows([batch.encoded[i] for i in rows],
                                                batch.heights[rows], batch.boxes[rows],
                                                batch.flips[rows])
            images[:, rows] = decoded
            for index, reason in failed.items():
                batch.valid[rows[index]] = False
                batch.reasons[rows[index]] = reason
        if batch.pixels is not None:
            rendered = np.flatnonzero(batch.rendered).tolist()
            images[:, rendered] = self._pixels(batch.pixels[:, rendered])
        if self.augment is None:
            return images
        return pixels_to_input(self._apply_records(batch, images), self.mean, self.std)

    def _apply_records(self, batch: Batch, images: torch.Tensor) -> torch.Tensor:
        from .augment.render import finish_on_device

        def decode_partners(items) -> tuple[torch.Tensor, dict[int, str]]:
            feed = [i for i, item in enumerate(items) if item.encoded is not None]
            decoded, failed = self._decode_rows(
                [items[i].encoded for i in feed], np.array([items[i].height for i in feed]),
                np.stack([items[i].boxes for i in feed]) if feed else np.zeros((0, 1, 4)),
                np.stack([items[i].flips for i in feed]) if feed else np.zeros((0, 1)))
            height, width = self.spec.input_size
            out = torch.zeros((self.spec.views, len(items), 3, height, width),
                              dtype=torch.uint8, device=self.device)
            out[:, feed] = decoded
            for i, item in enumerate(items):
                if item.pixels is not None:
                    out[:, i] = item.pixels.to(self.device)
            return out, {feed[index]: reason for index, reason in failed.items()}

        partners = [items if batch.valid[row] else None
                    for row, items in enumerate(batch.partners or [None] * len(batch))]
        pixels, records, failed = finish_on_device(images, batch.records, partners,
                                                   self.augment, decode_partners)
        batch.records = records
        for row, reason in failed.items():
            batch.valid[row] = False
            batch.reasons[row] = reason
        return pixels
