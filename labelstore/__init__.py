"""The ssld label store: teacher top-k soft labels in a chunked Zarr v3 group.

>>> import labelstore
>>> st = labelstore.open("train.zarr")          # doctest: +SKIP
>>> st.load().dense([3, 1, 3]).shape            # doctest: +SKIP
(3, 1000)
"""
from ._format import (BOX_SCALE, DEFAULT_CHUNK_ROWS, FORMAT, FORMAT_VERSION, TAR_FIELDS,
                      dequantize_boxes, fingerprint, quantize_boxes)
from ._lock import LockedError, OutputLock
from ._paths import (check_disjoint, disk_bytes, exists, human_size, is_store_dir, local_path,
                     real_path)
from ._reader import DamagedStoreError, LabelSlice, LabelStore, densify, open
from ._version import __version__
from ._writer import IncompleteRunError, LabelStoreWriter, create
from ._dedup import dedup
from ._ensemble import EnsembleResult, combine_distributions, combine_top_k, ensemble
from ._merge import merge
from ._select import select_topk
from ._dist import Dist
from ._text import (KEY_RULE, escapes_root, first_bad_key, first_escaping_key, key_problem,
                    read_lines)
from ._threads import set_threads
from ._verify import TeacherCheck, VerifyResult, verify

__all__ = [
    "BOX_SCALE",
    "DEFAULT_CHUNK_ROWS",
    "FORMAT",
    "FORMAT_VERSION",
    "KEY_RULE",
    "TAR_FIELDS",
    "DamagedStoreError",
    "Dist",
    "EnsembleResult",
    "IncompleteRunError",
    "LabelSlice",
    "LabelStore",
    "LabelStoreWriter",
    "LockedError",
    "OutputLock",
    "TeacherCheck",
    "VerifyResult",
    "__version__",
    "check_disjoint",
    "combine_distributions",
    "combine_top_k",
    "create",
    "dedup",
    "densify",
    "ensemble",
    "dequantize_boxes",
    "disk_bytes",
    "escapes_root",
    "exists",
    "fingerprint",
    "first_bad_key",
    "first_escaping_key",
    "human_size",
    "is_store_dir",
    "key_problem",
    "local_path",
    "merge",
    "open",
    "quantize_boxes",
    "read_lines",
    "real_path",
    "select_topk",
    "set_threads",
    "verify",
]
