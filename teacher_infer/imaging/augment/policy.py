"""What to augment: timm's RandAugment grammar, random erasing and MixUp/CutMix settings,
checked, and recorded in (and read back from) a store's ``augment`` attribute.

Option names are timm ``train.py``'s where it has them (``--aa`` is ssld's ``--augment``,
``--reprob`` ssld's ``--erase``): ``--augment``, ``--erase``, ``--mixup``, ``--cutmix``,
``--mix-prob``, ``--mixup-switch-prob``. Every bad value is a ``ValueError`` whose one
line names the option and the value. Nothing here imports torch.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any, Mapping

from .table import (LEVEL_DENOM, MAX_LEVEL, RAND_INCREASING_OPS, RAND_OPS, TABLE_VERSION,
                    op_ids, resolve_table, table_attrs)

ATTRS_VERSION = 1             # layout of the ``augment`` attribute itself
_TOKEN = re.compile(r"(\D*)(.*)")  # timm: the name is what precedes the first digit


@dataclass(frozen=True)
class RandAugmentPolicy:
    """A parsed ``rand-...`` policy, with timm's defaults for the tokens not given."""

    text: str                       # the policy as given
    magnitude: int = 10             # m: timm's 0..10 scale (10 = full strength)
    num_ops: int = 2                # n: ops per view, chosen with replacement
    prob: float = 0.5               # p: each chosen op is applied with this probability
    magnitude_std: float = 0.0      # mstd: Gaussian noise on m; inf (mstd > 100): uniform [0, m]
    magnitude_max: int = 10         # mmax: the noisy magnitude is clipped to [0, mmax]
    increasing: bool = False        # inc: timm's "increasing" op set

    @property
    def op_names(self) -> tuple[str, ...]:
        return RAND_INCREASING_OPS if self.increasing else RAND_OPS

    @cached_property
    def op_ids(self) -> tuple[int, ...]:
        """Ids in the ops table of the ops a draw chooses from."""
        return op_ids(self.op_names)


def _number(where: str, token: str, digits: str, kind: type) -> Any:
    try:
        return kind(digits)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise ValueError(f"{where}: token {token!r} needs {what} after its name") from None


def parse_policy(text: str, option: str = "--augment") -> RandAugmentPolicy:
    """Parse timm's RandAugment grammar ``rand-mM-nN-pP-mstdS-mmaxX-incI`` (tokens in any
    order, each at most once; the ones left out keep timm's defaults).

    >>> parse_policy("rand-m9-n2-mstd0.5-inc1").magnitude_std
    0.5
    """
    where = f"{option} {text!r}"
    if not isinstance(text, str) or not text:
        raise ValueError(f"{option}: expected a RandAugment policy such as 'rand-m9-n2-mstd0.5', "
                         f"got {text!r}")
    head, *tokens = text.split("-")
    if head != "rand":
        raise ValueError(f"{where}: only RandAugment policies ('rand-...') are replayed, not "
                         f"{head!r}")
    values: dict[str, Any] = {}
    for token in tokens:
        match = _TOKEN.fullmatch(token)
        name = match.group(1)
        if token.startswith("t"):
            raise ValueError(f"{where}: token {token!r}: other op sets (timm's t...) are not in "
                             f"ops table version {TABLE_VERSION}")
        if name not in ("m", "n", "p", "mstd", "mmax", "inc") or not match.group(2):
            raise ValueError(f"{where}: unknown token {token!r} (known: m<int>, n<int>, "
                             "p<prob>, mstd<std>, mmax<int>, inc<0|1>)")
        if name in values:
            raise ValueError(f"{where}: token {name!r} is given twice")
        kind = float if name in ("p", "mstd") else int
        values[name] = _number(where, token, match.group(2), kind)
    magnitude_max = values.get("mmax", int(LEVEL_DENOM))
    if not 0 <= magnitude_max <= MAX_LEVEL:
        raise ValueError(f"{where}: mmax must be in [0, {MAX_LEVEL}] (levels are stored as int8 "
                         f"tenths), got {magnitude_max}")
    magnitude = values.get("m", int(LEVEL_DENOM))
    if magnitude < 0:
        raise ValueError(f"{where}: m must be >= 0, got {magnitude}")
    num_ops = values.get("n", 2)
    if num_ops < 1:
        raise ValueError(f"{where}: n must be >= 1 op per view, got {num_ops}")
    prob = values.get("p", 0.5)
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"{where}: p must be a probability in [0, 1], got {prob}")
    std = values.get("mstd", 0.0)
    if not std >= 0.0:
        raise ValueError(f"{where}: mstd must be >= 0, got {std}")
    if std > 100:
        std = math.inf  # timm: mstd above 100 means a uniform magnitude in [0, m]
    increasing = values.get("inc", 0)
    if increasing not in (0, 1):
        raise ValueError(f"{where}: inc must be 0 or 1, got {increasing}")
    return RandAugmentPolicy(text=text, magnitude=magnitude, num_ops=num_ops, prob=prob,
                             magnitude_std=std, magnitude_max=magnitude_max,
                             increasing=bool(increasing))


def fill_from_mean(mean: tuple[float, ...]) -> tuple[int, int, int]:
    """timm's ``img_mean`` fill of the geometric ops: the normalisation mean in 0..255."""
    red, green, blue = (min(255, round(255 * float(value))) for value in mean)
    return red, green, blue


def _probability(value: float, option: str) -> float:
    if not 0.0 <= value <= 1.0:  # also refuses NaN
        raise ValueError(f"{option} {value}: a probability must be in [0, 1]")
    return float(value)


def _alpha(value: float | None, option: str) -> float | None:
    if value is None:
        return None
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{option} {value}: the Beta(α, α) parameter must be > 0 and finite "
                         f"(leave {option} out to turn it off)")
    return float(value)


def _range(value: tuple[float, float], name: str, upper: float) -> tuple[float, float]:
    low, high = (float(v) for v in value)
    if not 0 < low <= high <= upper:
        raise ValueError(f"{name} {value}: expected 0 < low <= high <= {upper:g}")
    return low, high


@dataclass(frozen=True)
class AugmentSpec:
    """How the augmented views (1..V-1) of every image are drawn; view 0 stays the
    evaluation view. Recorded in the store's ``augment`` attribute (:meth:`attrs`)."""

    augment: str | None = None                  # --augment: a RandAugment policy
    erase: float = 0.0                          # --erase: random-erasing probability per view
    erase_scale: tuple[float, float] = (0.02, 1 / 3)  # erased area / view area (timm)
    erase_ratio: tuple[float, float] = (0.3, 1 / 0.3)  # aspect ratio range (timm)
    erase_count: int = 1                        # --erase-count (timm --recount): at most
    mixup: float | None = None                  # --mixup: MixUp Beta(α, α)
    cutmix: float | None = None                 # --cutmix: CutMix Beta(α, α)
    mix_prob: float = 1.0                       # --mix-prob: a view is mixed with this probability
    switch_prob: float = 0.5                    # --mixup-switch-prob: CutMix when both are set
    fill: tuple[int, int, int] = (124, 116, 104)  # geometric ops' and erasing's fill (uint8)
    policy: RandAugmentPolicy | None = field(default=None, init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "policy",
                           None if self.augment is None else parse_policy(self.augment))
        _probability(self.erase, "--erase")
        _probability(self.mix_prob, "--mix-prob")
        _probability(self.switch_prob, "--mixup-switch-prob")
        _alpha(self.mixup, "--mixup")
        _alpha(self.cutmix, "--cutmix")
        _range(self.erase_scale, "erase_scale", 1.0)
        _range(self.erase_ratio, "erase_ratio", math.inf)
        if int(self.erase_count) != self.erase_count or self.erase_count < 1:
            raise ValueError(f"--erase-count {self.erase_count}: expected an integer >= 1")
        if len(self.fill) != 3 or not all(0 <= int(v) <= 255 for v in self.fill):
            raise ValueError(f"fill {self.fill}: expected three values in 0..255")

    @property
    def mixing(self) -> bool:
        return self.mixup is not None or self.cutmix is not None

    @property
    def mix_option(self) -> str:
        """The option(s) that turned mixing on, for messages."""
        return "/".join(name for name, value in (("--mixup", self.mixup),
                                                 ("--cutmix", self.cutmix)) if value is not None)

    @property
    def enabled(self) -> bool:
        return self.policy is not None or self.erase > 0 or self.mixing

    def dims(self) -> dict[str, int]:
        """Sizes of the record dimensions in the store (``labelstore.create(augment_dims=)``):
        ``op`` ops per view, ``erase`` boxes per view, ``mix`` 1 when views are mixed; a
        size of 0 leaves those arrays out."""
        return {"op": self.policy.num_ops if self.policy is not None else 0,
                "erase": int(self.erase_count) if self.erase > 0 else 0,
                "mix": int(self.mixing)}

    def check_store(self, *, rows: int, views: int, chunk_rows: int) -> None:
        """ValueError unless a store of this shape can hold these records."""
        if not self.enabled:
            return
        if views < 2:
            raise ValueError("--augment/--erase/--mixup/--cutmix change views 1..V-1 (view 0 "
                             f"is the evaluation view): --views {views} has none to change")
        if views > 255 and self.mixing:
            raise ValueError(f"{self.mix_option}: the partner's view is stored as uint8; "
                             f"--views {views} is more than 255")
        if self.mixing and rows < 2:
            raise ValueError(f"{self.mix_option}: a store of {rows} row has no other row to "
                             "mix with")
        if self.mixing and chunk_rows < 2:
            raise ValueError(f"{self.mix_option}: partners are drawn within a chunk; "
                             f"chunk_rows {chunk_rows} leaves none (use 2 or more)")

    def attrs(self) -> dict[str, Any]:
        """The store's ``augment`` attribute: these settings and the ops table."""
        settings = {name: value for name, value in asdict(self).items() if name != "policy"}
        settings.update(erase_scale=list(self.erase_scale), erase_ratio=list(self.erase_ratio),
                        fill=[int(v) for v in self.fill])
        return {"version": ATTRS_VERSION, **settings, "ops_table": table_attrs()}

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any] | None,
                   where: str = "the store") -> "AugmentSpec | None":
        """The settings a store was written with (None: a crop-only store); ValueError when
        this ssld cannot replay its records (another attribute layout or ops table)."""
        if attrs is None:
            return None
        if attrs.get("version") != ATTRS_VERSION:
            raise ValueError(f"{where} has augmentation attributes version "
                             f"{attrs.get('version')!r}; this ssld reads version {ATTRS_VERSION}")
        resolve_table(attrs.get("ops_table"), where)
        names = ("augment", "erase", "erase_scale", "erase_ratio", "erase_count", "mixup",
                 "cutmix", "mix_prob", "switch_prob", "fill")
        values = {name: attrs[name] for name in names if name in attrs}
        for name in ("erase_scale", "erase_ratio", "fill"):
            if name in values:
                values[name] = tuple(values[name])
        return cls(**values)
