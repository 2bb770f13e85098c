"""Images to model input, shared by the teacher pass and training: the views (boxes and flips,
on the store's uint16 grid), PIL decoding and rendering, DALI decoding, the batches the
workers collate, and the decoder registry.

- :mod:`.views`: the view geometry (no torch);
- :mod:`.decode`: PIL decoding and rendering, ``ViewDataset``, ``Batch``/``collate``, the PIL
  decoder;
- :mod:`.dali`: the DALI decoder (``mixed`` on a GPU, CPU otherwise);
- :mod:`.decoders`: ``--decoder`` name → decoder class, and the ``auto`` rule.

>>> from teacher_infer.imaging import ViewSpec, plan_views
>>> boxes, flips = plan_views("a.jpg", 480, 640, ViewSpec(views=2, input_size=(224, 224),
...                                                       crop_pct=0.875))
>>> boxes.shape, flips.shape
((2, 4), (2,))

The names below are what ``student_train`` and the benchmarks use (docs/architecture.md says
why each); everything else stays in its module (``teacher_infer.imaging.views``, ``.decode``,
``.dali``, ``.decoders``), where the teacher pass and the tests import it from. Names are
imported on first use, so importing this package imports neither torch nor DALI.
"""
from __future__ import annotations

import importlib

_WHERE = {
    # the view geometry training replays and draws
    "ViewSpec": "views", "eval_box": "views", "plan_views": "views",
    "quantize_inside": "views", "random_resized_crop_box": "views",
    # decoding and rendering in the workers, and the batches they collate
    "Batch": "decode", "DecodeError": "decode", "Item": "decode", "ViewDataset": "decode",
    "batch_ranges": "decode", "collate": "decode", "decode_rgb": "decode",
    "image_bytes": "decode", "open_rgb": "decode", "pixels_to_input": "decode",
    "read_encoded": "decode", "render_box": "decode", "render_eval": "decode",
    # the decoder registry
    "decoder_class": "decoders", "decoder_names": "decoders", "resolve_decoder": "decoders",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
