"""The student trainer's configuration: one dataclass, every knob with its default and why.

``ssld train-student`` builds a :class:`TrainConfig` from its options and calls
``student_train.train(cfg)``; notebooks and ``ssld quickstart`` build one directly. The resolved
configuration is written to ``RUN_DIR/config.json`` and stored in every checkpoint, which is what
``--resume`` compares against.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from teacher_infer.imaging import decoder_names
from teacher_infer.runtime import DEVICES, PRECISIONS

from .loss_registry import LOSS_SPECS, loss_help

VIEWS = ("auto", "replay", "global")
BAD_IMAGES = ("skip", "stop")   # student_train.failures.POLICIES (that module imports torch)
DECODERS = decoder_names()  # the registry's names, "auto" first
EVAL_BATCH_SIZE = 256   # ssld eval's images per step (here: its module imports torch)

# Options that may change between a run and its --resume without changing the result:
# where the work runs and how many processes decode, not what is computed.
RESUMABLE_CHANGES = frozenset({"resume", "num_workers", "threads", "bad_images", "progress",
                               "store_roots"})


# The method's learning rate for 256 images per step (the SSLD paper's recipes: MobileNetV1
# 1.6 for 4,096, ResNet50-vd 0.4 for 1,024), found with PaddleClas's loss, a symmetrised KL.
BASE_LR = 0.1


def default_lr(loss: str, supervised: bool) -> float:
    """The lr (for 256 images) a run gets without ``--lr``: :data:`BASE_LR` for hard labels;
    for a distillation loss, ``BASE_LR`` divided by its gradient scale near agreement
    relative to KL's (student_train/loss_registry.py: 1 for the KL-like losses, 0.25 for JS,
    so 0.4), so that the default step is the one the method's lr was found with."""
    if supervised or loss not in LOSS_SPECS:  # an unknown loss: validate() says so
        return BASE_LR
    return BASE_LR / LOSS_SPECS[loss].gradient_scale


@dataclass
class TrainConfig:
    """Everything ``train(cfg)`` needs. ``None`` means "the model's / the data's default"."""

    student: str                          # timm name or PaddleClas name (MobileNetV3_large_x1_0)
    out: str                              # run directory: config.json, metrics.csv, *.pt, train.log
    stores: tuple[str, ...] = ()          # label stores; several form one training set
    store_roots: tuple[str, ...] = ()     # their images' roots: none (each store's recorded
                                          # dataset.root), one for all, or one per store
    data: Optional[str] = None            # image source for --supervised / --teacher without stores
    root: Optional[str] = None            # root of a list-file --data
    val: Optional[str] = None             # validation source (class folder, list file, shards)
    val_root: Optional[str] = None        # root of a list-file --val
    val_every: int = 1                    # validate every N epochs (and after the last one)

    epochs: int = 120                     # SSLD trains students 120-360 epochs
    batch_size: int = 256                 # images per process and step (global = × world size)
    lr: Optional[float] = None            # for 256 images per step; scaled to the global batch.
                                          # None: default_lr(loss, supervised)
    warmup_epochs: float = 5.0            # linear warmup, then cosine to 0 (per step); at
                                          # most all epochs
    weight_decay: float = 1e-5            # the method's l2_decay (MobileNets); never on norm/bias
    momentum: float = 0.9
    nesterov: bool = False

    # the names of student_train/loss_registry.py (js, skl: PaddleClas's JSDivLoss, kl, soft-ce)
    loss: str = field(default="js", metadata={"choices": tuple(LOSS_SPECS),
                                              "help": loss_help()})
    temperature: float = field(           # only for the losses that take one (--loss kl)
        default=1.0, metadata={"help": "For --loss " + " or ".join(
            name for name, spec in LOSS_SPECS.items() if spec.temperature) + "."})
    label_weight: float = 0.0             # + α·CE on ground truth where known (SSLD: 0)
    supervised: bool = False              # hard labels + label smoothing instead of a teacher
    label_smoothing: float = 0.1          # --supervised only
    teacher: Optional[str] = None         # online distillation: teacher forward each step
    teacher_checkpoint: Optional[str] = None

    # replay stored views | global RandomResizedCrop; auto: replay when the stores hold > 1 view
    views: str = field(default="auto", metadata={"choices": VIEWS})
    autoaugment: Optional[str] = None     # timm policy after the crop, e.g. rand-m9-mstd0.5
    input_size: Optional[int] = None      # None: the student's pretrained-config input size
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range (global views)

    lr_mult: Optional[tuple[float, ...]] = None  # 5 multipliers: stem, stage 1..4 (fine-tuning)
    init: Optional[str] = None            # start from these student weights (fine-tune stage)
    freeze_backbone: bool = False         # train the classifier only, eval preprocessing (FixRes)
    ema: Optional[float] = None           # EMA decay of the weights, e.g. 0.9998

    device: str = "auto"                  # cuda when available
    decoder: str = "auto"                 # the registry's rule: dali on a GPU, pil on the CPU
    # bf16 autocast on GPUs, fp32 on the CPU
    precision: str = field(default="auto", metadata={"choices": PRECISIONS})
    channels_last: Optional[bool] = None  # None: on for GPUs
    num_workers: Optional[int] = None     # DataLoader workers per process; None: cores / processes
    threads: Optional[int] = None         # CPU threads per process; None: the CPUs per rank
    resume: bool = False                  # continue RUN_DIR/last.pt exactly
    seed: int = 0                         # model init, sample order, views, augmentation
    # an image that cannot be read: skip (leave it out, list it in RUN_DIR/failed.txt) | stop
    bad_images: str = field(default="skip", metadata={"choices": BAD_IMAGES})
    progress: bool = True                 # progress bars (rank 0, on a terminal)

    def __post_init__(self) -> None:
        if self.lr is None:
            self.lr = default_lr(self.loss, self.supervised)
        self.stores = tuple(str(s) for s in self.stores)
        if self.lr_mult is not None:
            self.lr_mult = tuple(float(m) for m in self.lr_mult)
        self.crop_scale = tuple(float(s) for s in self.crop_scale)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first option that cannot work."""
        for name, value, allowed in (("views", self.views, VIEWS), ("device", self.device, DEVICES),
                                     ("decoder", self.decoder, DECODERS),
                                     ("precision", self.precision, PRECISIONS),
                                     ("loss", self.loss, tuple(LOSS_SPECS)),
                                     ("bad_images", self.bad_images, BAD_IMAGES)):
            if value not in allowed:
                raise ValueError(f"--{name} must be one of {', '.join(allowed)}, got {value!r}")
        numbers = {"lr": self.lr, "weight_decay": self.weight_decay, "momentum": self.momentum,
                   "warmup_epochs": self.warmup_epochs, "temperature": self.temperature,
                   "label_weight": self.label_weight, "label_smoothing": self.label_smoothing,
                   "ema": self.ema, "crop_scale": self.crop_scale, "lr_mult": self.lr_mult}
        for name, value in numbers.items():  # click's float type accepts "nan" and "inf"
            values = value if isinstance(value, tuple) else (value,)
            if any(v is not None and not math.isfinite(v) for v in values):
                raise ValueError(f"--{name.replace('_', '-')} must be finite, got {value}")
        for name in ("epochs", "batch_size", "val_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got "
                                 f"{getattr(self, name)!r}")
        for name in ("lr", "weight_decay", "warmup_epochs"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got "
                                 f"{getattr(self, name)}")
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"--crop-scale must be 0 < MIN <= MAX <= 1, got "
                             f"{self.crop_scale[0]:g} {self.crop_scale[1]:g}")
        if not 0 <= self.label_smoothing < 1:  # no flag: the --supervised baseline's 0.1
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.input_size is not None and self.input_size < 8:
            raise ValueError(f"--input-size must be >= 8 pixels, got {self.input_size}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ValueError(f"--num-workers must be >= 0, got {self.num_workers}")
        if self.temperature != 1.0 and not LOSS_SPECS[self.loss].temperature:
            tempered = " or ".join(n for n, spec in LOSS_SPECS.items() if spec.temperature)
            raise ValueError(f"--temperature {self.temperature} only applies to --loss "
                             f"{tempered}, not {self.loss}")
        if self.supervised and self.teacher:
            raise ValueError("--supervised and --teacher are two different baselines; give one")
        if (self.teacher is None) != (self.teacher_checkpoint is None):
            raise ValueError("online distillation needs both --teacher NAME and "
                             "--teacher-checkpoint FILE")
        if self.supervised and self.label_weight:
            raise ValueError("--label-weight adds CE to a distillation loss; --supervised is CE "
                             "already")
        if not self.stores and not self.data:
            raise ValueError("no training data: give --store STORE (distillation) or --data SRC "
                             "(with --supervised or --teacher)")
        if self.stores and self.data:
            raise ValueError("give the training images either as --store or as --data, not both")
        if self.store_roots and not self.stores:
            raise ValueError("--store-root says where a --store's images are; --data images "
                             "are found through --data and --root")
        if self.store_roots and len(self.store_roots) not in (1, len(self.stores)):
            raise ValueError(f"{len(self.store_roots)} --store-root for {len(self.stores)} "
                             "--store: give one root for all stores, or one per --store, in "
                             "the same order")
        if self.data and not (self.supervised or self.teacher):
            raise ValueError("--data has no teacher labels: distil from --store, or train "
                             "--supervised / with an online --teacher")
        if self.views == "replay" and (self.supervised or self.teacher or self.freeze_backbone):
            raise ValueError("--views replay shows the stored teacher views; it does not apply "
                             "to --supervised, --teacher or --freeze-backbone")

    @property
    def distill_from_stores(self) -> bool:
        """True for offline distillation: targets are the stores' teacher distributions."""
        return not (self.supervised or self.teacher)

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training option(s) {', '.join(unknown)}")
        return cls(**values)


def changed_options(saved: dict[str, Any], current: TrainConfig) -> list[str]:
    """Options whose value differs from the checkpoint's (as ``name: old -> new``).

    Paths are compared after ``abspath`` so ``runs/a`` and ``./runs/a`` are the same run.
    """
    now = current.to_dict()
    changes = []
    for name in sorted(set(saved) | set(now)):
        if name in RESUMABLE_CHANGES:
            continue
        # an option added after the checkpoint was written counts as its default there
        old, new = saved.get(name, _DEFAULTS.get(name)), now.get(name)
        if _normalised(name, old) != _normalised(name, new):
            changes.append(f"{name}: {old!r} -> {new!r}")
    return changes


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)
             if f.default is not dataclasses.MISSING}
_PATH_OPTIONS = {"out", "data", "root", "val", "val_root", "init", "teacher_checkpoint"}


def _normalised(name: str, value: Any) -> Any:
    if value is None:
        return None
    if name in _PATH_OPTIONS and "://" not in str(value):
        return os.path.abspath(str(value))
    if name in ("stores", "store_roots"):
        return [os.path.abspath(str(v)) if "://" not in str(v) else str(v) for v in value]
    if isinstance(value, tuple):
        return list(value)
    return value


__all__ = ["TrainConfig", "changed_options", "RESUMABLE_CHANGES"]
