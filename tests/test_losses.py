"""Properties of the distillation losses, checked against float64 numpy hand computations."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from student_train.losses import (
    LOSSES,
    DistillationLoss,
    js_divergence,
    kl_divergence,
    soft_cross_entropy,
    symmetric_kl,
)

NUM_CLASSES = 10
ALL_LOSSES = sorted(LOSSES)


def _random_teacher(rng: np.random.Generator, rows: int, classes: int = NUM_CLASSES) -> np.ndarray:
    """Dirichlet rows, then exact zeros in some rows and one-hot rows, like a top-k store."""
    probs = rng.dirichlet(np.full(classes, 0.5), size=rows)
    probs[1, :3] = 0.0  # a row with exact zeros
    probs[2] = np.eye(classes)[4]  # one-hot teachers
    probs[3] = np.eye(classes)[0]
    return probs / probs.sum(axis=1, keepdims=True)


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(8, NUM_CLASSES))
    return logits, _random_teacher(rng, 8)


def _softmax64(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def _kl64(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Row-wise KL(p ‖ q) with 0 log 0 = 0."""
    ratio = np.where(p > 0, p / np.where(q > 0, q, 1.0), 1.0)
    return np.sum(np.where(p > 0, p * np.log(ratio), 0.0), axis=1)


def _reference(name: str, logits: np.ndarray, teacher: np.ndarray, temperature: float = 1.0):
    student = _softmax64(logits)
    if name == "js":
        mixture = 0.5 * (student + teacher)
        return float(np.mean(0.5 * _kl64(teacher, mixture) + 0.5 * _kl64(student, mixture)))
    if name == "kl":
        tempered = np.where(teacher > 0, teacher, 0.0) ** (1.0 / temperature)
        tempered /= tempered.sum(axis=1, keepdims=True)
        return float(temperature**2 * np.mean(_kl64(tempered, _softmax64(logits / temperature))))
    if name == "soft-ce":
        return float(np.mean(-np.sum(teacher * np.log(student), axis=1)))
    if name == "skl":
        return _paddle_jsdiv(logits, teacher)
    raise AssertionError(name)


def _paddle_jsdiv(logits: np.ndarray, teacher: np.ndarray) -> float:
    """PaddleClas ppcls/utils/loss.py Loss._jsdiv, transcribed to numpy float64."""
    eps = 1.0e-10
    class_dim = logits.shape[1]

    def _kldiv(input_, target):
        return target * np.log((target + eps) / (input_ + eps)) * class_dim

    student = _softmax64(logits)
    cost = (_kldiv(student, teacher) + _kldiv(teacher, student)) / 2
    return float(np.mean(cost))


def _tensor(array: np.ndarray, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(array, dtype=dtype)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_equals_float64_hand_computation(name, batch):
    logits, teacher = batch
    got = LOSSES[name](_tensor(logits), _tensor(teacher))
    assert got.dtype == torch.float32 and got.shape == ()
    assert got.item() == pytest.approx(_reference(name, logits, teacher), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("temperature", [0.5, 2.0, 4.0])
def test_kl_tempered_equals_hand_computation(temperature, batch):
    logits, teacher = batch
    got = kl_divergence(_tensor(logits), _tensor(teacher), temperature=temperature)
    expected = _reference("kl", logits, teacher, temperature)
    assert got.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_symmetric_kl_equals_paddleclas_formula():
    rng = np.random.default_rng(1)
    logits = rng.normal(scale=4.0, size=(16, 100))
    teacher = _random_teacher(rng, 16, classes=100)
    got = symmetric_kl(_tensor(logits), _tensor(teacher)).item()
    assert got == pytest.approx(_paddle_jsdiv(logits, teacher), rel=1e-5)


@pytest.mark.parametrize("name", ["js", "kl", "skl"])
def test_nonnegative_on_random_inputs(name):
    # soft-ce is left out on purpose: it is KL plus the teacher entropy, > 0 but not a divergence
    generator = torch.Generator().manual_seed(2)
    for _ in range(20):
        logits = torch.randn(32, NUM_CLASSES, generator=generator) * 5
        teacher = torch.softmax(torch.randn(32, NUM_CLASSES, generator=generator) * 5, dim=1)
        assert LOSSES[name](logits, teacher).item() >= 0.0


def test_soft_cross_entropy_is_kl_plus_teacher_entropy(batch):
    logits, teacher = batch
    entropy = -_kl64(teacher, np.ones_like(teacher))  # KL to the all-ones measure is -H
    got = soft_cross_entropy(_tensor(logits), _tensor(teacher)).item()
    expected = kl_divergence(_tensor(logits), _tensor(teacher)).item() + entropy.mean()
    assert got == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("name", ["js", "kl", "skl"])
def test_zero_when_student_equals_teacher(name):
    generator = torch.Generator().manual_seed(3)
    teacher = torch.softmax(torch.randn(16, NUM_CLASSES, generator=generator) * 3, dim=1)
    logits = torch.log(teacher) + 7.0  # softmax ignores the constant shift
    assert abs(LOSSES[name](logits, teacher).item()) < 1e-6


@pytest.mark.parametrize("name", ["js", "skl"])
def test_symmetric_under_swapping_distributions(name):
    generator = torch.Generator().manual_seed(4)
    first = torch.softmax(torch.randn(16, NUM_CLASSES, generator=generator) * 3, dim=1)
    second = torch.softmax(torch.randn(16, NUM_CLASSES, generator=generator) * 3, dim=1)
    forward = LOSSES[name](torch.log(first), second).item()
    backward = LOSSES[name](torch.log(second), first).item()
    assert forward == pytest.approx(backward, rel=1e-5)
    assert forward > 1e-3  # the two distributions really differ


def test_kl_is_not_symmetric():
    # guards the symmetry test above: the same construction must detect an asymmetric loss
    generator = torch.Generator().manual_seed(4)
    first = torch.softmax(torch.randn(16, NUM_CLASSES, generator=generator) * 3, dim=1)
    second = torch.softmax(torch.randn(16, NUM_CLASSES, generator=generator) * 3, dim=1)
    forward = kl_divergence(torch.log(first), second).item()
    backward = kl_divergence(torch.log(second), first).item()
    assert forward != pytest.approx(backward, rel=1e-3)


def test_js_bounded_by_ln2():
    # disjoint supports reach the bound: one-hot teacher, student sure of another class
    teacher = torch.eye(NUM_CLASSES)
    logits = torch.roll(torch.eye(NUM_CLASSES), 1, dims=1) * 1e4
    value = js_divergence(logits, teacher).item()
    assert value <= math.log(2) + 1e-6
    assert value == pytest.approx(math.log(2), rel=1e-6)
    generator = torch.Generator().manual_seed(5)
    for _ in range(20):
        logits = torch.randn(32, NUM_CLASSES, generator=generator) * 20
        teacher = torch.softmax(torch.randn(32, NUM_CLASSES, generator=generator) * 20, dim=1)
        assert js_divergence(logits, teacher).item() <= math.log(2) + 1e-6


def test_kl_at_t1_equals_torch_kl_div():
    generator = torch.Generator().manual_seed(6)
    logits = torch.randn(16, NUM_CLASSES, generator=generator) * 3
    teacher = torch.softmax(torch.randn(16, NUM_CLASSES, generator=generator), dim=1)  # > 0
    expected = F.kl_div(F.log_softmax(logits, dim=1), teacher, reduction="batchmean")
    assert kl_divergence(logits, teacher).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("name", ALL_LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_finite_gradients_one_hot_and_extreme_logits(name, dtype):
    teacher = torch.eye(NUM_CLASSES)[[0, 3, 5, 9]]
    teacher[3] = torch.tensor([0.5, 0.5] + [0.0] * (NUM_CLASSES - 2))
    logits = torch.zeros(4, NUM_CLASSES)
    logits[0, 0] = 1e4  # agrees with the one-hot teacher, extremely sure
    logits[1, 0] = 1e4  # extremely sure of a class the teacher gives 0
    logits[2] = -1e4
    logits[2, 1] = 1e4
    logits[3, 2:] = 1e4  # all mass where the teacher has none
    logits = logits.to(dtype).requires_grad_(True)
    loss = LOSSES[name](logits, teacher.to(dtype))
    loss.backward()
    assert torch.isfinite(loss)
    assert logits.grad.dtype == dtype
    assert torch.isfinite(logits.grad.float()).all()


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_autocast_computes_in_float32(name, batch):
    logits, teacher = batch
    expected = LOSSES[name](_tensor(logits), _tensor(teacher))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = LOSSES[name](_tensor(logits), _tensor(teacher))
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_rejects_mismatched_shapes(name):
    with pytest.raises(ValueError, match="shape"):
        LOSSES[name](torch.zeros(4, 10), torch.zeros(4, 9))
    with pytest.raises(ValueError, match="shape"):
        LOSSES[name](torch.zeros(10), torch.zeros(10))


def test_kl_rejects_nonpositive_temperature():
    with pytest.raises(ValueError, match="temperature"):
        kl_divergence(torch.zeros(2, 3), torch.full((2, 3), 1 / 3), temperature=0.0)


def test_distillation_loss_label_term(batch):
    logits, teacher = batch
    logits, teacher = _tensor(logits), _tensor(teacher)
    labels = torch.tensor([3, -1, 0, -1, 7, 7, -1, 2])
    distill = js_divergence(logits, teacher)
    labeled = labels >= 0
    hard = F.cross_entropy(logits[labeled], labels[labeled])

    criterion = DistillationLoss("js", label_weight=0.5)
    assert criterion(logits, teacher, labels).item() == pytest.approx(
        (distill + 0.5 * hard).item(), rel=1e-6
    )
    assert criterion(logits, teacher).item() == pytest.approx(distill.item())
    unlabeled = torch.full_like(labels, -1)
    assert criterion(logits, teacher, unlabeled).item() == pytest.approx(distill.item())
    # weight 0 ignores labels entirely
    assert DistillationLoss("js")(logits, teacher, labels).item() == pytest.approx(distill.item())


def test_distillation_loss_gradient_reaches_labeled_rows_only_through_ce(batch):
    logits, teacher = batch
    logits = _tensor(logits).requires_grad_(True)
    labels = torch.tensor([3, -1, 0, -1, 7, 7, -1, 2])
    DistillationLoss("soft-ce", label_weight=1.0)(logits, _tensor(teacher), labels).backward()
    with_labels = logits.grad.clone()
    logits.grad = None
    DistillationLoss("soft-ce")(logits, _tensor(teacher), labels).backward()
    changed = (with_labels - logits.grad).abs().sum(dim=1) > 0
    assert torch.equal(changed, labels >= 0)


def test_distillation_loss_kl_uses_temperature(batch):
    logits, teacher = batch
    got = DistillationLoss("kl", temperature=4.0)(_tensor(logits), _tensor(teacher))
    assert got.item() == pytest.approx(_reference("kl", logits, teacher, 4.0), rel=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "jsd"}, "unknown loss 'jsd'"),
        ({"name": "js", "temperature": 2.0}, "only applies to loss 'kl'"),
        ({"name": "kl", "temperature": -1.0}, "temperature must be > 0"),
        ({"name": "js", "label_weight": -0.1}, "label_weight must be >= 0"),
    ],
)
def test_distillation_loss_rejects_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DistillationLoss(**kwargs)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_gradient_near_agreement_is_the_registry_scale(name):
    """The reason for each loss's default lr (config.default_lr divides the method's lr by the
    loss's gradient scale in student_train/loss_registry.py): near agreement every KL-like
    loss has KL's gradient and JS a quarter of it. Reference: KL's gradient w.r.t. the student
    logits, p_s - p_t, computed by hand in float64."""
    from student_train.config import BASE_LR, default_lr
    from student_train.loss_registry import LOSS_SPECS

    g = torch.Generator().manual_seed(0)
    teacher = torch.softmax(torch.randn(64, 10, generator=g, dtype=torch.float64), dim=-1)
    for eps, tol in ((1e-2, 0.03), (1e-3, 0.005)):
        logits = (teacher.log() + eps * torch.randn(64, 10, generator=g, dtype=torch.float64))
        logits.requires_grad_(True)
        reference = (torch.softmax(logits.detach(), -1) - teacher) / len(teacher)
        (grad,) = torch.autograd.grad(LOSSES[name](logits, teacher), logits)
        scale = float((grad.double() * reference).sum() / (reference * reference).sum())
        assert scale == pytest.approx(LOSS_SPECS[name].gradient_scale, rel=tol)
    assert default_lr(name, supervised=False) == pytest.approx(
        BASE_LR / LOSS_SPECS[name].gradient_scale)
    assert default_lr(name, supervised=True) == BASE_LR == 0.1
    if name == "js":   # README: 0.4 by default with --loss js
        assert default_lr(name, supervised=False) == pytest.approx(0.4)


def test_a_new_loss_is_one_registry_entry(monkeypatch, tmp_path):
    """Adding a loss: one entry in the table and its pure function. The config's validation,
    the temperature rule, the default lr and the training module all follow from the entry."""
    import student_train.losses as losses
    from student_train.config import BASE_LR, TrainConfig
    from student_train.loss_registry import LOSS_SPECS, LossSpec

    def squared_error(student_logits, teacher_probs):   # 1/2 sum (p_s - p_t)^2
        return 0.5 * (torch.softmax(student_logits.float(), -1)
                      - teacher_probs.float()).pow(2).sum(-1).mean()

    monkeypatch.setattr(losses, "squared_error", squared_error, raising=False)
    monkeypatch.setitem(LOSS_SPECS, "se", LossSpec("squared_error", 0.5, False, "test loss"))
    cfg = TrainConfig(student="m", out=str(tmp_path), stores=("s.zarr",), loss="se")
    assert cfg.lr == pytest.approx(BASE_LR / 0.5)
    with pytest.raises(ValueError, match="only applies to --loss kl, not se"):
        TrainConfig(student="m", out=str(tmp_path), stores=("s.zarr",), loss="se",
                    temperature=2.0)
    logits, teacher = torch.randn(4, 5), torch.softmax(torch.randn(4, 5), -1)
    assert DistillationLoss("se")(logits, teacher).item() == pytest.approx(
        squared_error(logits, teacher).item())
    with pytest.raises(ValueError, match="loss must be one of"):
        TrainConfig(student="m", out=str(tmp_path), stores=("s.zarr",), loss="nope")
