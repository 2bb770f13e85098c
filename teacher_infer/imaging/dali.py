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
                 device: torch.device, num_threads: int):
        self.spec, self.interpolation = spec, interpolation
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
        mean = [255.0 * m for m in self.mean.tolist()]
        std = [255.0 * s for s in self.std.tolist()]
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
                outputs.append(fn.crop_mirror_normalize(crop, mirror=mirror, mean=mean, std=std,
                                                        dtype=types.FLOAT, output_layout="CHW"))
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
                             dtype=torch.float32, device=self.device)
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

    def decode_batch(self, batch: Batch) -> torch.Tensor:
        """A (V, n, 3, H, W) float32 tensor of the batch; rows DALI could not decode (and PIL
        neither) are set invalid in ``batch`` and left at zero."""
        rows = [i for i, data in enumerate(batch.encoded) if data is not None and batch.valid[i]]
        height, width = self.spec.input_size
        images = torch.zeros((self.spec.views, len(batch), 3, height, width),
                             dtype=torch.float32, device=self.device)
        if rows:
            try:
                images[:, rows] = self._decode_sync([batch.encoded[i] for i in rows],
                                                    batch.heights[rows], batch.boxes[rows],
                                                    batch.flips[rows])
            except RuntimeError:
                # A corrupt file stopped the batch and broke the pipeline: rebuild it and
                # redo this batch one file at a time.
                self._rebuild()
                self._one_by_one(batch, rows, images)
        if batch.pixels is not None:
            rendered = np.flatnonzero(batch.rendered).tolist()
            pixels = batch.pixels[:, rendered].to(self.device)
            images[:, rendered] = pixels_to_input(pixels, self.mean, self.std)
        return images

    def _one_by_one(self, batch: Batch, rows: list[int], images: torch.Tensor) -> None:
        for i in rows:
            try:
                images[:, i:i + 1] = self._decode_sync([batch.encoded[i]],
                                                       batch.heights[i:i + 1],
                                                       batch.boxes[i:i + 1], batch.flips[i:i + 1])
                continue
            except RuntimeError as exc:
                self._rebuild()
                dali_reason = _dali_reason(exc)
            try:
                image = open_rgb(io.BytesIO(batch.encoded[i].tobytes()))
            except DecodeError as exc:
                batch.valid[i] = False
                batch.reasons[i] = f"{exc} (DALI: {dali_reason})"
                continue
            pixels = render_views(image, batch.boxes[i], batch.flips[i], self.spec,
                                  self.interpolation)
            images[:, i] = pixels_to_input(pixels.to(self.device), self.mean, self.std)
