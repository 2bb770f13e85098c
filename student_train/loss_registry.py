"""The distillation losses, one table: adding a loss is one entry here, its pure function in
``student_train/losses.py`` and its tests (the float64 gradient test in tests/test_losses.py
among them).

From this table come ``TrainConfig``'s ``--loss`` choices and help, which losses take
``--temperature``, the default lr (:func:`student_train.config.default_lr` divides the
method's lr by the loss's gradient scale) and what ``losses.DistillationLoss`` computes. It
imports nothing but the standard library, so the configs (and ``ssld --help``) stay free of
torch; ``losses.py`` looks the functions up by name.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LossSpec:
    """One loss: how to compute it and what follows from it."""

    function: str             # name of its pure function in student_train/losses.py
    gradient_scale: float     # its gradient near agreement relative to KL(p_t || p_s)'s
    temperature: bool         # takes --temperature (every other loss is defined at T = 1)
    summary: str              # one line for --help


# Gradient scales: to second order in d = p_s - p_t, KL, the symmetrised KL (skl) and soft
# cross-entropy are all 1/2 sum(d^2 / p_t) (soft-ce up to a constant); kl at temperature T is
# scaled by T^2 to stay comparable; Jensen-Shannon is a quarter of it, 1/8 sum(d^2 / p_t): at
# the same lr, --loss js takes steps four times shorter.
LOSS_SPECS: dict[str, LossSpec] = {
    "js": LossSpec("js_divergence", 0.25, False, "Jensen-Shannon divergence (the default)"),
    "skl": LossSpec("symmetric_kl", 1.0, False, "PaddleClas's JSDivLoss, a symmetrised KL"),
    "kl": LossSpec("kl_divergence", 1.0, True, "Hinton's T^2 KL(p_t || p_s) at --temperature"),
    "soft-ce": LossSpec("soft_cross_entropy", 1.0, False, "soft-target cross-entropy"),
}


def loss_spec(name: str) -> LossSpec:
    """The entry of ``name`` (ValueError naming the choices for any other name)."""
    if name not in LOSS_SPECS:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSS_SPECS)}")
    return LOSS_SPECS[name]


def loss_help() -> str:
    """``--loss``'s help: every loss and what it is."""
    return "; ".join(f"{name}: {spec.summary}" for name, spec in LOSS_SPECS.items()) + "."


__all__ = ["LOSS_SPECS", "LossSpec", "loss_help", "loss_spec"]
