"""The ops table: what a stored op id and level mean, versioned so that old stores replay.

A view's RandAugment record is a list of ``(op id, level)`` pairs (see
:mod:`.records`). The op id indexes the table of the store's ``augment.ops_table``
attribute (its ``version`` and the op names in id order); the level is the signed
magnitude after timm's ``mstd`` noise and clipping, stored as int8 in steps of 0.1
(``level = stored / LEVEL_SCALE``), negative where timm negates the argument. Each op
turns ``|level|`` and the sign into its kernel's argument with timm's formulas
(``timm/data/auto_augment.py``, ``_rotate_level_to_arg`` and friends, on timm's 0..10
magnitude scale).

Versioning: a table version fixes the op names, their ids, their argument formulas, the
resampling of the geometric ops and the level step. A later ssld that changes any of
these adds a version and keeps the old ones in :data:`TABLES`, so it still replays the
stores written before; a store whose version or op names this ssld does not know is
refused (:func:`resolve_table`), never replayed with other ops.

Nothing here imports torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

TABLE_VERSION = 1
LEVEL_SCALE = 10           # stored int8 = round(level * 10): steps of 0.1, |level| <= 12.7
LEVEL_DENOM = 10.0         # timm's magnitude scale: m10 is an op's full strength
MAX_LEVEL = 12             # the largest mmax a stored int8 level can hold
RESAMPLE = "bilinear"      # geometric ops; timm draws bilinear or bicubic per call, v1 fixes one


@dataclass(frozen=True)
class Op:
    """One op of the table: its kernel (:mod:`.kernels`), how a level becomes the
    kernel's argument, and whether timm negates the argument with probability 1/2."""

    name: str
    kernel: str
    arg: Callable[[float, float], float] | None = None  # (level >= 0, sign) -> argument
    signed: bool = False
    meaning: str = ""                      # the formula, recorded in the store's attributes

    def argument(self, stored_level: int) -> float | None:
        """The kernel's argument for a stored (signed, int8) level."""
        if self.arg is None:
            return None
        stored_level = int(stored_level)
        sign = -1.0 if self.signed and stored_level < 0 else 1.0
        return self.arg(abs(stored_level) / LEVEL_SCALE, sign)


def _fraction(level: float) -> float:
    return level / LEVEL_DENOM


def _enhance(level: float, _sign: float) -> float:
    return _fraction(level) * 1.8 + 0.1


def _enhance_increasing(level: float, sign: float) -> float:
    return max(0.1, 1.0 + sign * (_fraction(level) * 0.9))


def _posterize(level: float, _sign: float = 1.0) -> int:
    return int(_fraction(level) * 4)


def _solarize(level: float, _sign: float = 1.0) -> int:
    return min(256, int(_fraction(level) * 256))


def _scaled(full: float) -> Callable[[float, float], float]:
    """A signed argument that reaches ``full`` at magnitude 10 (rotate, shear, translate)."""
    return lambda level, sign: sign * (_fraction(level) * full)


# Version 1: timm's RandAugment op sets (``_RAND_TRANSFORMS`` and, for ``inc1``,
# ``_RAND_INCREASING_TRANSFORMS``) in one table, with timm's level-to-argument formulas;
# id 0 is "no op" (an op that timm's per-op probability ``p`` skipped). Ids are positions:
# never reorder or edit a version, add one.
_ENHANCE = "factor = level / 10 * 1.8 + 0.1"
_ENHANCE_INC = "factor = max(0.1, 1 + sign * level / 10 * 0.9)"
OPS_V1: tuple[Op, ...] = (
    Op("Identity", "identity"),
    Op("AutoContrast", "auto_contrast"),
    Op("Equalize", "equalize"),
    Op("Invert", "invert"),
    Op("Rotate", "rotate", _scaled(30.0), True, "degrees = sign * level / 10 * 30"),
    Op("Posterize", "posterize", _posterize, False, "bits kept = int(level / 10 * 4)"),
    Op("PosterizeIncreasing", "posterize", lambda level, _: 4 - _posterize(level), False,
       "bits kept = 4 - int(level / 10 * 4)"),
    Op("Solarize", "solarize", _solarize, False, "threshold = min(256, int(level / 10 * 256))"),
    Op("SolarizeIncreasing", "solarize", lambda level, _: 256 - _solarize(level), False,
       "threshold = 256 - min(256, int(level / 10 * 256))"),
    Op("SolarizeAdd", "solarize_add", lambda level, _: min(128, int(_fraction(level) * 110)),
       False, "add = min(128, int(level / 10 * 110)) to values below 128"),
    Op("Color", "color", _enhance, False, _ENHANCE),
    Op("ColorIncreasing", "color", _enhance_increasing, True, _ENHANCE_INC),
    Op("Contrast", "contrast", _enhance, False, _ENHANCE),
    Op("ContrastIncreasing", "contrast", _enhance_increasing, True, _ENHANCE_INC),
    Op("Brightness", "brightness", _enhance, False, _ENHANCE),
    Op("BrightnessIncreasing", "brightness", _enhance_increasing, True, _ENHANCE_INC),
    Op("Sharpness", "sharpness", _enhance, False, _ENHANCE),
    Op("SharpnessIncreasing", "sharpness", _enhance_increasing, True, _ENHANCE_INC),
    Op("ShearX", "shear_x", _scaled(0.3), True, "shear = sign * level / 10 * 0.3"),
    Op("ShearY", "shear_y", _scaled(0.3), True, "shear = sign * level / 10 * 0.3"),
    Op("TranslateXRel", "translate_x", _scaled(0.45), True,
       "shift = sign * level / 10 * 0.45 of the width"),
    Op("TranslateYRel", "translate_y", _scaled(0.45), True,
       "shift = sign * level / 10 * 0.45 of the height"),
)

TABLES: dict[int, tuple[Op, ...]] = {1: OPS_V1}

# timm's op sets by ``inc``: the names a RandAugment draw chooses from, in timm's order.
RAND_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize",
            "SolarizeAdd", "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY",
            "TranslateXRel", "TranslateYRel")
RAND_INCREASING_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
                       "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing",
                       "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
                       "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


def op_ids(names: tuple[str, ...], version: int = TABLE_VERSION) -> tuple[int, ...]:
    """Ids of ``names`` in table ``version``."""
    index = {op.name: i for i, op in enumerate(TABLES[version])}
    return tuple(index[name] for name in names)


def table_attrs(version: int = TABLE_VERSION) -> dict[str, Any]:
    """The table as JSON-able store attributes: what a reader needs to replay the ids."""
    return {"version": version, "level_scale": LEVEL_SCALE, "resample": RESAMPLE,
            "ops": [{"id": i, "name": op.name, "signed": op.signed, "argument": op.meaning}
                    for i, op in enumerate(TABLES[version])]}


def resolve_table(attrs: Any, where: str = "the store") -> tuple[Op, ...]:
    """The ops of a stored table, by stored id; ValueError (one line) when this ssld
    cannot replay it: an unknown version, or an op name the version does not have."""
    if not isinstance(attrs, dict) or "version" not in attrs or "ops" not in attrs:
        raise ValueError(f"{where} has augmentation records but no readable ops table "
                         "(augment.ops_table)")
    version = attrs["version"]
    if version not in TABLES:
        raise ValueError(f"{where} was written with augmentation ops table version {version!r}; "
                         f"this ssld replays versions {', '.join(map(str, sorted(TABLES)))}")
    known = {op.name: op for op in TABLES[version]}
    ops = []
    for entry in attrs["ops"]:
        name = entry.get("name") if isinstance(entry, dict) else None
        if name not in known:
            raise ValueError(f"{where}: op {name!r} (id {len(ops)}) is not in ops table "
                             f"version {version} of this ssld; it cannot be replayed")
        ops.append(known[name])
    if (attrs.get("level_scale"), attrs.get("resample")) != (LEVEL_SCALE, RESAMPLE):
        raise ValueError(f"{where}: ops table version {version} with level_scale "
                         f"{attrs.get('level_scale')!r} and resample {attrs.get('resample')!r} "
                         f"is not this ssld's version {version} ({LEVEL_SCALE}, {RESAMPLE!r})")
    return tuple(ops)
