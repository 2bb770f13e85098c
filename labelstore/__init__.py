"""The ssld label store: teacher top-k soft labels in a chunked Zarr v3 group.

The format and the operations on stores alone: create, read, write, select-topk, merge,
ensemble, export, inspect and the structure check. At run time it imports numpy, zarr,
numcodecs, google-crc32c and fsspec (h5py inside ``export``, tqdm when a progress bar is
asked for, xarray or pandas in ``LabelStore.to_xarray`` / ``to_dataframe``); torch, click and
images are the layers above (docs/architecture.md; tests/test_layers.py checks it).

>>> import labelstore
>>> st = labelstore.open("train.zarr")          # doctest: +SKIP
>>> st.load().dense([3, 1, 3]).shape            # doctest: +SKIP
(3, 1000)
"""
from ._derive import check_compatible, first_in_runs, open_complete, read_blocks
from ._ensemble import combine_distributions, ensemble
from ._export import export
from ._format import (BOX_SCALE, DEFAULT_CHUNK_ROWS, TAR_FIELDS, dequantize_boxes, fingerprint,
                      quantize_boxes)
from ._inspect import inspect_store, label_sha256
from ._lock import LockedError, OutputLock
from ._merge import merge
from ._paths import (check_disjoint, check_output_file, disk_bytes, exists, human_size,
                     is_store_dir, local_path)
from ._progress import progress_bar
from ._reader import (DamagedStoreError, LabelStore, UnfinishedStoreError, densify,
                      densify_logits, normalize_topk, open, topk_from_logits)
from ._select import select_rows, select_topk
from ._text import KEY_RULE, escapes_root, first_bad_key, key_problem, read_lines, read_text
from ._verify import TeacherCheck, VerifyResult, verify
from ._version import __version__
from ._writer import IncompleteRunError, LabelStoreWriter, create

# Each name, who needs it and why: docs/architecture.md, "labelstore's public names".
__all__ = [
    "BOX_SCALE",
    "DEFAULT_CHUNK_ROWS",
    "KEY_RULE",
    "TAR_FIELDS",
    "DamagedStoreError",
    "IncompleteRunError",
    "LabelStore",
    "LabelStoreWriter",
    "LockedError",
    "OutputLock",
    "TeacherCheck",
    "UnfinishedStoreError",
    "VerifyResult",
    "__version__",
    "check_compatible",
    "check_disjoint",
    "check_output_file",
    "combine_distributions",
    "create",
    "densify",
    "densify_logits",
    "dequantize_boxes",
    "disk_bytes",
    "ensemble",
    "escapes_root",
    "exists",
    "export",
    "fingerprint",
    "first_bad_key",
    "first_in_runs",
    "human_size",
    "inspect_store",
    "is_store_dir",
    "key_problem",
    "label_sha256",
    "local_path",
    "merge",
    "normalize_topk",
    "open",
    "open_complete",
    "progress_bar",
    "quantize_boxes",
    "read_blocks",
    "read_lines",
    "read_text",
    "select_rows",
    "select_topk",
    "topk_from_logits",
    "verify",
]
