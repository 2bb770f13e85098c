"""The ssld label store: teacher top-k soft labels in a chunked Zarr v3 group.

>>> import labelstore
>>> st = labelstore.open("train.zarr")          # doctest: +SKIP
>>> st.load().dense([3, 1, 3]).shape            # doctest: +SKIP
(3, 1000)
"""
from ._format import FORMAT, FORMAT_VERSION, dequantize_boxes, fingerprint, quantize_boxes
from ._reader import LabelSlice, LabelStore, densify, open
from ._version import __version__
from ._writer import LabelStoreWriter, create
from ._dedup import dedup
from ._merge import merge
from ._select import select_topk

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "LabelSlice",
    "LabelStore",
    "LabelStoreWriter",
    "__version__",
    "create",
    "dedup",
    "densify",
    "dequantize_boxes",
    "fingerprint",
    "merge",
    "open",
    "quantize_boxes",
    "select_topk",
]
