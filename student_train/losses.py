"""Distillation losses between student logits and stored teacher probabilities (docs/commands.md,
"ssld train-student and ssld eval": the losses and their defaults).

Every loss takes ``(student_logits, teacher_probs)``, the logits shaped ``(B, C)``, and returns a
scalar tensor: the per-row divergence averaged over the batch. ``teacher_probs`` are the teacher
distributions, sparse as the label store holds them (:class:`~student_train.targets.SparseTargets`,
what :class:`~student_train.dataset.StoreDataset` yields: the dense rows are made here, on the
logits' device, bit for bit ``labelstore.densify``'s) or dense ``(B, C)`` (rows sum to 1; exact
zeros allowed, one-hot rows allowed). Either gives the same value and gradient: the student
side needs all C classes anyway, so the loss costs O(B·C) whatever the targets' form. Inputs are
cast to float32 inside, so the losses are safe to call on bf16/fp16 logits or under
``torch.autocast``; the student distribution is always taken with ``log_softmax`` (never the log
of a probability that may have underflowed) and 0 · log 0 = 0.

References
----------
- J. Lin, "Divergence measures based on the Shannon entropy", IEEE Trans. Inf. Theory, 1991.
- G. Hinton, O. Vinyals, J. Dean, "Distilling the Knowledge in a Neural Network", 2015.
- PaddleClas SSLD: "Beyond Self-Supervision: A Simple Yet Effective Network Distillation
  Alternative to Improve Backbones" (Cui et al., 2021) and ``ppcls/utils/loss.py``.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .loss_registry import LOSS_SPECS, loss_spec
from .targets import SparseTargets

Targets = Union[Tensor, SparseTargets]

__all__ = [
    "js_divergence",
    "symmetric_kl",
    "kl_divergence",
    "soft_cross_entropy",
    "LOSSES",
    "DistillationLoss",
    "loss_function",
]

_LN2 = math.log(2.0)
# PaddleClas's epsilon inside the log of its "JSDivLoss"; kept identical so `--loss skl`
# reproduces their numbers.
_PADDLE_EPS = 1e-10


def _teacher(student_logits: Tensor, teacher_probs: Targets) -> Tensor:
    """The dense ``(B, C)`` teacher rows (sparse targets scattered on the logits' device),
    checked against the logits' shape."""
    if isinstance(teacher_probs, SparseTargets):
        teacher_probs = teacher_probs.to(student_logits.device, non_blocking=True).dense()
    _check_shapes(student_logits, teacher_probs)
    return teacher_probs


def _check_shapes(student_logits: Tensor, teacher_probs: Tensor) -> None:
    if student_logits.ndim != 2:
        raise ValueError(
            f"student_logits must be (batch, classes), got shape {tuple(student_logits.shape)}"
        )
    if teacher_probs.shape != student_logits.shape:
        raise ValueError(
            f"teacher_probs shape {tuple(teacher_probs.shape)} does not match "
            f"student_logits shape {tuple(student_logits.shape)}"
        )


def _masked_log(probs: Tensor) -> Tensor:
    """log(probs) with -inf at exact zeros and a NaN-free backward.

    Taking ``log`` of a masked-out value and discarding it with ``where`` still sends
    ``0 * inf = NaN`` into the backward pass, so zeros are replaced by 1 before the log.
    """
    positive = probs > 0
    safe = torch.log(torch.where(positive, probs, torch.ones_like(probs)))
    return torch.where(positive, safe, torch.full_like(probs, -math.inf))


def _plogp_minus(probs: Tensor, log_probs: Tensor, log_other: Tensor) -> Tensor:
    """Elementwise p · (log p − log q) with the convention 0 · log 0 = 0."""
    positive = probs > 0
    # log_probs is -inf where probs == 0; zero it before multiplying so that neither the
    # forward (0 · -inf) nor the backward produces NaN.
    log_ratio = torch.where(positive, log_probs - log_other, torch.zeros_like(probs))
    return probs * log_ratio


def js_divergence(student_logits: Tensor, teacher_probs: Targets) -> Tensor:
    """Jensen–Shannon divergence ½ KL(p_t ‖ m) + ½ KL(p_s ‖ m) with m = ½(p_t + p_s).

    The true JS divergence (Lin 1991), in nats: symmetric, ≥ 0 and bounded by ln 2, so a few
    confidently wrong rows cannot dominate the batch. This is the default ``--loss js``.

    Parameters
    ----------
    student_logits : Tensor
        ``(B, C)`` raw student outputs, any float dtype.
    teacher_probs : SparseTargets or Tensor
        The batch's teacher distributions: sparse, or dense ``(B, C)`` (rows sum to 1;
        zeros allowed).

    Returns
    -------
    Tensor
        float32 scalar, the mean over the ``B`` rows.
    """
    teacher_probs = _teacher(student_logits, teacher_probs)
    log_student = F.log_softmax(student_logits.float(), dim=-1)
    student = log_student.exp()
    teacher = teacher_probs.float()
    log_teacher = _masked_log(teacher)
    # log m = log(½ p_s + ½ p_t) in log space: stays finite and exact even where p_s has
    # underflowed to 0 in linear space (extreme logits), because log p_s is always finite.
    log_mixture = torch.logaddexp(log_student, log_teacher) - _LN2
    per_class = _plogp_minus(teacher, log_teacher, log_mixture) + _plogp_minus(
        student, log_student, log_mixture
    )
    return 0.5 * per_class.sum(dim=-1).mean()


def symmetric_kl(student_logits: Tensor, teacher_probs: Targets) -> Tensor:
    """PaddleClas's "JSDivLoss" (DMLLoss at T = 1): a symmetrised KL, ``--loss skl``.

    ``C · mean_c[½ p_s log((p_s+ε)/(p_t+ε)) + ½ p_t log((p_t+ε)/(p_s+ε))]``, ε = 1e-10, then
    the mean over rows. Use it to reproduce PaddleClas SSLD runs; prefer :func:`js_divergence`.

    Parameters
    ----------
    student_logits : Tensor
        ``(B, C)`` raw student outputs, any float dtype.
    teacher_probs : SparseTargets or Tensor
        The batch's teacher distributions: sparse, or dense ``(B, C)`` (rows sum to 1;
        zeros allowed).

    Returns
    -------
    Tensor
        float32 scalar, the mean over the ``B`` rows.
    """
    # What PaddleClas computes (ppcls/utils/loss.py, Loss._jsdiv): both inputs go through
    # softmax, then cost = (_kldiv(s, t) + _kldiv(t, s)) / 2 with
    # _kldiv(input, target) = target * log((target + eps) / (input + eps)) * class_dim, and
    # avg_cost = mean over all B*C elements -- so "× C then mean over classes" is a sum over
    # classes followed by a batch mean. The result is ½[KL(p_t‖p_s) + KL(p_s‖p_t)] (half
    # Jeffreys' divergence, as in Deep Mutual Learning), not Jensen–Shannon: there is no
    # mixture m, it is unbounded (ε only caps it at about log(1/ε) per class), and ε
    # perturbs the value near zeros. We keep the formula verbatim, ε included.
    teacher_probs = _teacher(student_logits, teacher_probs)
    student = F.softmax(student_logits.float(), dim=-1)
    teacher = teacher_probs.float()
    num_classes = student.shape[-1]
    log_ratio = torch.log(student + _PADDLE_EPS) - torch.log(teacher + _PADDLE_EPS)
    per_class = 0.5 * student * log_ratio + 0.5 * teacher * (-log_ratio)
    return (num_classes * per_class.mean(dim=-1)).mean()


def kl_divergence(
    student_logits: Tensor, teacher_probs: Targets, temperature: float = 1.0
) -> Tensor:
    """Hinton knowledge distillation: ``T² · KL(p_t^(T) ‖ p_s^(T))``.

    ``p_s^(T) = softmax(s / T)``. The store holds teacher *probabilities*, not logits, so the
    teacher is re-tempered as ``p_t^(T) = softmax(log p_t / T)``: ``log p_t`` equals the
    teacher logits up to a per-row constant, which softmax ignores, so this is exactly the
    tempered teacher (for the top-k + residual reconstruction, of that reconstruction). The T²
    factor keeps gradient magnitudes comparable across temperatures (Hinton et al. 2015).

    Parameters
    ----------
    student_logits : Tensor
        ``(B, C)`` raw student outputs, any float dtype.
    teacher_probs : SparseTargets or Tensor
        The batch's teacher distributions: sparse, or dense ``(B, C)`` (rows sum to 1;
        zeros allowed).
    temperature : float
        T > 0; 1 means plain KL(p_t ‖ p_s).

    Returns
    -------
    Tensor
        float32 scalar, the mean over the ``B`` rows.
    """
    teacher_probs = _teacher(student_logits, teacher_probs)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    # Zero-probability classes stay at -inf (probability 0) at every temperature.
    log_teacher = F.log_softmax(_masked_log(teacher_probs.float()) / temperature, dim=-1)
    teacher = log_teacher.exp()
    per_row = _plogp_minus(teacher, log_teacher, log_student).sum(dim=-1)
    return temperature**2 * per_row.mean()


def soft_cross_entropy(student_logits: Tensor, teacher_probs: Targets) -> Tensor:
    """Soft-target cross-entropy ``−Σ_c p_t log p_s`` (as in FKD and ReLabel).

    Equals KL(p_t ‖ p_s) plus the teacher entropy, which has no gradient w.r.t. the student.

    Parameters
    ----------
    student_logits : Tensor
        ``(B, C)`` raw student outputs, any float dtype.
    teacher_probs : SparseTargets or Tensor
        The batch's teacher distributions: sparse, or dense ``(B, C)`` (rows sum to 1;
        zeros allowed).

    Returns
    -------
    Tensor
        float32 scalar, the mean over the ``B`` rows.
    """
    teacher_probs = _teacher(student_logits, teacher_probs)
    log_student = F.log_softmax(student_logits.float(), dim=-1)
    teacher = teacher_probs.float()
    # where-mask so a -inf student logit on a zero-probability class gives 0, not NaN.
    per_class = torch.where(teacher > 0, teacher * log_student, torch.zeros_like(teacher))
    return -per_class.sum(dim=-1).mean()


def loss_function(name: str) -> Callable[..., Tensor]:
    """The pure function of the registry entry ``name`` (student_train/loss_registry.py)."""
    return globals()[loss_spec(name).function]


# name → pure function, from the one table
LOSSES: dict[str, Callable[..., Tensor]] = {name: loss_function(name) for name in LOSS_SPECS}


class DistillationLoss(nn.Module):
    """A distillation loss from :data:`LOSSES` plus an optional hard-label cross-entropy term.

    ``loss = divergence(logits, teacher_probs) + label_weight · CE(logits, labels)``
    where the CE is averaged over the rows whose label is ≥ 0 (``-1`` marks an unlabeled pool
    image, as in the store's ``labels`` array); with no labeled row in the batch the CE term
    is 0.

    Parameters
    ----------
    name : str
        A name of :data:`LOSSES` (``"js"``, ``"skl"``, ``"kl"``, ``"soft-ce"``).
    temperature : float
        Only for the losses whose registry entry takes one (``"kl"``); the others are defined
        at T = 1 and reject anything else.
    label_weight : float
        Weight ≥ 0 of the hard-label term; 0 disables it.
    """

    def __init__(self, name: str, temperature: float = 1.0, label_weight: float = 0.0):
        super().__init__()
        spec = loss_spec(name)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        if temperature != 1.0 and not spec.temperature:
            # Silently ignoring --temperature would make a run look tempered when it is not.
            tempered = [n for n, s in LOSS_SPECS.items() if s.temperature]
            raise ValueError(f"temperature={temperature!r} only applies to loss "
                             f"{', '.join(repr(n) for n in tempered)}, not {name!r}")
        if not label_weight >= 0:
            raise ValueError(f"label_weight must be >= 0, got {label_weight!r}")
        self.name = name
        self.temperature = float(temperature)
        self.label_weight = float(label_weight)
        self._divergence = loss_function(name)
        self._tempered = spec.temperature

    def forward(
        self, student_logits: Tensor, teacher_probs: Targets, labels: Optional[Tensor] = None
    ) -> Tensor:
        if self._tempered:
            loss = self._divergence(student_logits, teacher_probs, self.temperature)
        else:
            loss = self._divergence(student_logits, teacher_probs)
        if labels is None or self.label_weight == 0.0:
            return loss
        if labels.shape != student_logits.shape[:1]:
            raise ValueError(
                f"labels shape {tuple(labels.shape)} does not match batch size "
                f"{student_logits.shape[0]}"
            )
        labeled = labels >= 0
        if not bool(labeled.any()):
            return loss
        hard = F.cross_entropy(student_logits[labeled].float(), labels[labeled].long())
        return loss + self.label_weight * hard

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, temperature={self.temperature}, "
            f"label_weight={self.label_weight}"
        )
