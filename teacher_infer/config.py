"""The configuration of one teacher-inference run (no torch import here).

Every field has the default the ``ssld infer-teacher`` command shows; ``None`` means
"the model's own value" (from timm's pretrained config) or "decide from the machine".
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .imaging.decoders import decoder_names
from .runtime.device import DEVICES, PRECISIONS

DECODERS = decoder_names()  # the registry's names, "auto" first
SOURCES = ("auto", "folder", "unlabeled", "list", "shards")
VERIFY_SAMPLE, VERIFY_SEED = 64, 0   # ssld verify's rows recomputed and their seed


@dataclass
class InferConfig:
    """What to run, on what, and how; ``teacher_infer.run(cfg)`` executes it."""

    model: str                          # timm name, "arch.tag", or a PaddleClas name
    data: str | None                    # class folder, unlabeled folder, list file, or tar shards
    out: str                            # label store to write (NAME.zarr)
    # list files: paths are relative to this (default: its folder)
    root: str | None = None
    # force the data-source kind when a folder is ambiguous
    source: str = field(default="auto", metadata={"choices": SOURCES})
    checkpoint: str | None = None       # state dict / training checkpoint (.pth, .pt, .safetensors)
    pretrained: bool = False            # weights from timm's hub cache (never waits on a network)
    random_weights: bool = False        # allow running without weights (tests, benchmarks)
    num_classes: int | None = None      # classifier size when it differs from the model default
    class_names: str | None = None      # file with one class name per line (recorded in the store)
    views_from: str | None = None       # label store whose rows, root, boxes and flips to reuse

    topk: int = 10                      # classes kept per view
    views: int = 1                      # view 0 = eval crop; 1.. = RandomResizedCrop + flip
    seed: int = 0                       # seeds the view boxes (and random weights)
    crop_scale: tuple[float, float] = (0.08, 1.0)       # RandomResizedCrop area range
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)    # RandomResizedCrop aspect range
    temperature: float = 1.0            # softmax temperature of the stored probabilities

    input_size: int | None = None       # square input side; None = the model's
    interpolation: str | None = field(  # None = the model's
        default=None, metadata={"choices": ("bilinear", "bicubic", "nearest", "lanczos")})
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    crop_pct: float | None = None       # view 0: resize to input_size / crop_pct, center crop

    # images per forward pass, views included: batch_size // views rows per batch (at least
    # one, its views then forwarded batch_size at a time), so memory does not grow with views
    batch_size: int = 64
    device: str = "auto"                # auto = cuda when available
    # a registry name (imaging.decoders); auto: their rule (DALI on a GPU, PIL on the CPU)
    decoder: str = field(default="auto", metadata={"choices": DECODERS})
    # auto: bf16 autocast on a GPU, fp32 on the CPU (runtime.resolve_precision); softmax and
    # top-k stay float32
    precision: str = field(default="auto", metadata={"choices": PRECISIONS})
    channels_last: bool = False
    compile: bool = False               # torch.compile the forward
    num_workers: int | None = None      # DataLoader workers per rank; None = from the CPU count
    threads: int | None = None          # CPU threads per rank; None = the CPUs per rank
    # rows per store chunk (a rank's unit of work); None = labelstore.DEFAULT_CHUNK_ROWS
    chunk_rows: int | None = None
    embeddings: bool = False            # also store pooled pre-logit features of view 0
    store_logits: bool = False          # also store each view's top-k logits + log-partition

    # Replayed augmentation of views 1..V-1 (docs/format.md, "Augmentation records"): drawn
    # per view from (seed, key, view), applied, labeled and stored as explicit records.
    # Names are timm train.py's where it has them (its --aa, --reprob, --recount, --mixup,
    # --cutmix, --mixup-switch-prob; --mix-prob is its --mixup-prob).
    augment: str | None = None          # a RandAugment policy, e.g. rand-m9-n2-mstd0.5
    erase: float = 0.0                  # random-erasing probability per view
    erase_count: int = 1                # at most this many erased boxes per view
    mixup: float | None = None          # MixUp Beta(α, α); None: off
    cutmix: float | None = None         # CutMix Beta(α, α); None: off
    mix_prob: float = 1.0               # a view is mixed with this probability
    mixup_switch_prob: float = 0.5      # CutMix rather than MixUp when both are on
    overwrite: bool = False             # replace an existing store instead of resuming it
    progress: bool = True               # a bar on rank 0, on a terminal (labelstore.progress_bar)

    extra: dict[str, Any] = field(default_factory=dict)  # recorded verbatim in the store attrs

    def __post_init__(self) -> None:
        self.crop_scale = tuple(float(v) for v in self.crop_scale)
        self.crop_ratio = tuple(float(v) for v in self.crop_ratio)
        if self.mean is not None:
            self.mean = tuple(float(v) for v in self.mean)
        if self.std is not None:
            self.std = tuple(float(v) for v in self.std)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad value (called on construction)."""
        choices = {"decoder": DECODERS, "device": DEVICES, "precision": PRECISIONS,
                   "source": SOURCES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name} must be one of {', '.join(allowed)}; "
                                 f"got {getattr(self, name)!r}")
        if self.data is None and self.views_from is None:
            raise ValueError("no data: pass --data (or --views-from STORE to label its crops)")
        if sum([self.checkpoint is not None, self.pretrained, self.random_weights]) > 1:
            raise ValueError("give only one of --checkpoint, --pretrained, --random-weights")
        if not (self.checkpoint or self.pretrained or self.random_weights):
            raise ValueError("no teacher weights: pass --checkpoint FILE or --pretrained "
                             "(or --random-weights for tests and benchmarks)")
        for name in ("topk", "views", "batch_size", "input_size", "num_classes", "chunk_rows",
                     "threads"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"--num-workers must be >= 0, got {self.num_workers}")
        if not 0 < self.temperature < math.inf:
            raise ValueError(f"--temperature must be a finite number > 0, got "
                             f"{self.temperature}")
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"--crop-scale must satisfy 0 < MIN <= MAX <= 1, got {low:g} "
                             f"{high:g}")
        low, high = self.crop_ratio
        if not 0 < low <= high < math.inf:
            raise ValueError(f"--crop-ratio must satisfy 0 < MIN <= MAX, got {low:g} {high:g}")
        if self.crop_pct is not None and not 0 < self.crop_pct <= 1:
            raise ValueError(f"--crop-pct must be in (0, 1], got {self.crop_pct}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and len(value) != 3:
                raise ValueError(f"--{name} needs 3 values (R G B), got {len(value)}")
            if value is not None and not all(math.isfinite(v) for v in value):
                # NaN would only surface after inference, as NaN probabilities
                raise ValueError(f"--{name} must be finite numbers, got "
                                 f"{' '.join(str(v) for v in value)}")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"--std must be > 0, got {' '.join(str(v) for v in self.std)}")
        spec = self.augment_spec()  # refuses a bad policy, probability or alpha, by option
        if spec.enabled and self.views_from is not None:
            raise ValueError("--views-from replays the reference store's views, records "
                             "included: leave out --augment, --erase, --mixup and --cutmix")
        if spec.enabled and self.views < 2:
            spec.check_store(rows=2, views=self.views, chunk_rows=2)

    def augment_spec(self, fill: tuple[int, int, int] | None = None):
        """The augmentation settings (``imaging.augment.AugmentSpec``) these options ask for;
        ``fill``: the teacher's mean in 0..255 (``augment.fill_from_mean``)."""
        from .imaging.augment.policy import AugmentSpec

        extra = {} if fill is None else {"fill": tuple(fill)}
        return AugmentSpec(augment=self.augment, erase=self.erase,
                           erase_count=self.erase_count, mixup=self.mixup, cutmix=self.cutmix,
                           mix_prob=self.mix_prob, switch_prob=self.mixup_switch_prob, **extra)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
