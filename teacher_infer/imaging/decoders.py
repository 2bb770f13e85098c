"""The decoders: one registry from the name a user types (``--decoder``) to the class that
decodes, and the one rule for ``auto``, the same in the teacher pass, ``ssld verify``, training
and eval.

Every decoder class follows the same small protocol, in the teacher pass and in training:

- ``name``: its registry name, recorded in stores and run summaries.
- ``worker_mode``: what the DataLoader workers do for it, which is also where the boxes are
  planned (``ViewDataset``'s modes): ``"pil"``, the workers decode the image and render its
  views, boxes planned from the decoded size; ``"bytes"``, the workers read only the file and
  its header and plan the boxes from the header's (EXIF-oriented) size, and the decoder
  decodes on the device.
- ``unavailable()``: None when it can run here, else why not (one line, with the fix).
- ``preferred_on``: the device types (``torch.device.type``) on which ``auto`` picks it first.
- ``default_workers(cpus)``: DataLoader workers per rank when ``--num-workers`` is not given.
- ``Decoder(spec=, interpolation=, mean=, std=, max_batch=, device=, num_threads=,
  augment=None)``, then ``decode(batches)``: ``(batch, images)`` for each
  :class:`~.decode.Batch`, in order, with ``images`` a normalised (V, n, 3, H, W) float32
  tensor on ``device`` (None when every row of the batch had already failed). A row it cannot
  decode is reported in the batch itself: ``batch.valid[i] = False`` and ``batch.reasons[i]``
  (its pixels stay zero). ``augment`` (an ``augment.source.Augmentation``) is given when the
  views carry augmentation records: a ``"pil"`` decoder gets them applied by the workers, a
  ``"bytes"`` decoder applies them on the device after decoding, with the rows' partners
  (``batch.records``, ``batch.partners``; ``augment.render.finish_on_device``).

``auto`` (:func:`resolve_decoder`) is a rule over those properties, never over names: the first
registered decoder that is preferred on the device's type and can run here; when none is, the
first that can run here at all. DALI is preferred on GPUs (nvJPEG decodes on the device); PIL
on the CPU, where forked PIL workers decode faster than DALI's CPU mode (docs/benchmarks.md,
"Teacher inference") and PIL is the fallback everywhere.

A new decoder is a class with that protocol and one entry in ``_WHERE``; the configs and
command lines take their choices from :func:`decoder_names`, and ``auto`` considers it by its
``preferred_on``.

Importing this module imports neither torch nor DALI (``ssld --help`` stays instant); a class
is imported when it is asked for.
"""
from __future__ import annotations

import importlib

AUTO = "auto"
# name → (module of this package, class): the registry
_WHERE = {"pil": ("decode", "PilDecoder"), "dali": ("dali", "DaliDecoder")}


def decoder_names() -> tuple[str, ...]:
    """The accepted ``--decoder`` values: ``auto`` and every registered decoder."""
    return (AUTO, *_WHERE)


def decoder_class(name: str) -> type:
    """The class registered as ``name`` (ValueError naming the choices for any other name)."""
    if name not in _WHERE:
        raise ValueError(f"decoder must be one of {', '.join(_WHERE)}, got {name!r}")
    module, attribute = _WHERE[name]
    return getattr(importlib.import_module(f".{module}", __package__), attribute)


def resolve_decoder(name: str, device) -> type:
    """The decoder class to run for ``--decoder name`` on ``device``.

    ``auto`` → the first registered decoder whose ``preferred_on`` holds ``device.type`` and
    that can run here, else the first that can run here (see the module doc). A decoder named
    explicitly that cannot run here is an ImportError saying why.
    """
    if name == AUTO:
        usable = [cls for cls in map(decoder_class, _WHERE) if cls.unavailable() is None]
        preferred = [cls for cls in usable if device.type in cls.preferred_on]
        if not usable:  # pragma: no cover - PIL is a dependency and always runs
            raise ImportError("--decoder auto: no registered decoder can run here")
        return (preferred or usable)[0]
    decoder = decoder_class(name)
    why = decoder.unavailable()
    if why is not None:
        raise ImportError(f"--decoder {name}: {why}")
    return decoder


def __getattr__(name: str):
    if name == "DECODERS":  # {name: class}; imports every decoder's module (torch)
        return {decoder: decoder_class(decoder) for decoder in _WHERE}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
