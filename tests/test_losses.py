"""Loss tests: reductions to BCE, masking of ignored entries, stability, config errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from mlic.errors import ConfigError
from mlic.losses import AsymmetricLoss, BCELoss, FocalLoss, build_loss

ALL_LOSSES = [
    BCELoss(),
    AsymmetricLoss(),
    AsymmetricLoss(gamma_pos=1.0, gamma_neg=2.5, clip=0.0),
    AsymmetricLoss(gamma_pos=0.5, gamma_neg=1.5, clip=0.2),
    FocalLoss(),
    FocalLoss(gamma=0.5, alpha=None),
]


def _batch(seed: int = 0, ignore: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [8, 5] and 1/0/-1 targets [8, 5]."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(8, 5, generator=g, dtype=torch.float64) * 3
    targets = torch.randint(0, 2, (8, 5), generator=g).double()
    if ignore:
        targets[torch.rand(8, 5, generator=g) < 0.25] = -1
    return logits, targets


def _elementwise_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")


def test_bce_matches_torch() -> None:
    logits, targets = _batch(ignore=False)
    expected = F.binary_cross_entropy_with_logits(logits.float(), targets.float())
    torch.testing.assert_close(BCELoss()(logits, targets), expected)
    expected_sum = F.binary_cross_entropy_with_logits(
        logits.float(), targets.float(), reduction="sum"
    )
    torch.testing.assert_close(BCELoss(reduction="sum")(logits, targets), expected_sum)


def test_reductions_count_only_valid_entries() -> None:
    logits, targets = _batch()
    valid = targets != -1
    reference = torch.where(valid, _elementwise_bce(logits, targets.clamp(min=0)), 0.0)
    per_entry = BCELoss(reduction="none")(logits, targets)
    torch.testing.assert_close(per_entry, reference)
    torch.testing.assert_close(BCELoss(reduction="sum")(logits, targets), reference.sum())
    torch.testing.assert_close(BCELoss()(logits, targets), reference.sum() / valid.sum())


def test_asl_without_focusing_or_clip_is_bce() -> None:
    logits, targets = _batch()
    asl = AsymmetricLoss(gamma_pos=0.0, gamma_neg=0.0, clip=0.0, reduction="none")
    torch.testing.assert_close(asl(logits, targets), BCELoss(reduction="none")(logits, targets))


def test_asl_matches_its_formula() -> None:
    logits, targets = _batch(seed=1, ignore=False)
    p = torch.sigmoid(logits)  # float64 reference, written the naive way
    p_m = (p - 0.05).clamp(min=0)
    expected = -(
        targets * (1 - p) ** 1 * torch.log(p) + (1 - targets) * p_m**4 * torch.log(1 - p_m)
    )
    asl = AsymmetricLoss(gamma_pos=1.0, gamma_neg=4.0, clip=0.05, reduction="none")
    torch.testing.assert_close(asl(logits, targets), expected.float(), rtol=1e-5, atol=1e-7)


def test_asl_clip_discards_easy_negatives() -> None:
    logits = torch.tensor([[-4.0, -3.0, 2.0]], requires_grad=True)  # p = 0.018, 0.047, 0.88
    loss = AsymmetricLoss(clip=0.05, reduction="none")(logits, torch.zeros(1, 3))
    loss.sum().backward()
    assert loss[0, 0] == 0 and loss[0, 1] == 0 and loss[0, 2] > 0
    assert logits.grad[0, 0] == 0 and logits.grad[0, 1] == 0 and logits.grad[0, 2] > 0


def test_focal_without_focusing_is_bce() -> None:
    logits, targets = _batch()
    focal = FocalLoss(gamma=0.0, alpha=None, reduction="none")
    torch.testing.assert_close(focal(logits, targets), BCELoss(reduction="none")(logits, targets))


@pytest.mark.parametrize(("gamma", "alpha"), [(2.0, 0.25), (1.0, 0.6), (3.0, -1.0)])
def test_focal_matches_torchvision(gamma: float, alpha: float) -> None:
    logits, targets = _batch(seed=2, ignore=False)
    expected = sigmoid_focal_loss(logits.float(), targets.float(), alpha=alpha, gamma=gamma)
    focal = FocalLoss(gamma=gamma, alpha=None if alpha < 0 else alpha, reduction="none")
    torch.testing.assert_close(focal(logits, targets), expected)


@pytest.mark.parametrize("loss_fn", ALL_LOSSES, ids=repr)
def test_ignored_entries_change_nothing(loss_fn: torch.nn.Module) -> None:
    logits, targets = _batch(seed=3)
    ignored = targets == -1
    assert ignored.any()
    changed = torch.where(ignored, torch.randn_like(logits) * 50, logits)

    def loss_and_grad(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.clone().requires_grad_(True)
        loss = loss_fn(x, targets)
        loss.backward()
        return loss.detach(), x.grad

    loss_a, grad_a = loss_and_grad(logits)
    loss_b, grad_b = loss_and_grad(changed)
    assert loss_a == loss_b
    torch.testing.assert_close(grad_a, grad_b, rtol=0, atol=0)
    assert (grad_a[ignored] == 0).all()
    assert (grad_a[~ignored] != 0).any()


def test_all_ignored_gives_zero_mean() -> None:
    logits = torch.randn(2, 3, requires_grad=True)
    loss = AsymmetricLoss()(logits, torch.full((2, 3), -1.0))
    loss.backward()
    assert loss.item() == 0.0 and (logits.grad == 0).all()


@pytest.mark.parametrize("loss_fn", ALL_LOSSES, ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_logits_have_finite_loss_and_gradient(
    loss_fn: torch.nn.Module, dtype: torch.dtype
) -> None:
    logits = torch.tensor([[100.0, -100.0, 100.0, -100.0, 0.0]], dtype=dtype, requires_grad=True)
    targets = torch.tensor([[1.0, 0.0, 0.0, 1.0, -1.0]])
    loss = loss_fn(logits, targets)
    loss.backward()
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    # Confidently wrong entries (2 and 3) cost far more than confidently right ones.
    per_entry = type(loss_fn)(**_options(loss_fn), reduction="none")(logits, targets)
    assert per_entry[0, 2] > 1 and per_entry[0, 3] > 1
    assert per_entry[0, 0] < 1e-6 and per_entry[0, 1] < 1e-6


def _options(loss_fn: torch.nn.Module) -> dict[str, float | None]:
    """The hyper-parameters a loss was built with, to rebuild it with another reduction."""
    if isinstance(loss_fn, AsymmetricLoss):
        return {
            "gamma_pos": loss_fn.gamma_pos,
            "gamma_neg": loss_fn.gamma_neg,
            "clip": loss_fn.clip,
            "eps": loss_fn.eps,
        }
    if isinstance(loss_fn, FocalLoss):
        return {"gamma": loss_fn.gamma, "alpha": loss_fn.alpha}
    return {}


def test_build_loss() -> None:
    assert isinstance(build_loss("bce"), BCELoss)
    asl = build_loss("ASL", gamma_neg=2.0, clip=0.1)
    assert isinstance(asl, AsymmetricLoss) and asl.gamma_neg == 2.0 and asl.clip == 0.1
    focal = build_loss("focal", gamma=1.0, alpha=None, reduction="sum")
    assert isinstance(focal, FocalLoss) and focal.alpha is None and focal.reduction == "sum"


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("hinge", {}, "unknown loss 'hinge'; choose one of: asl, bce, focal"),
        ("asl", {"gama_neg": 4}, "gama_neg"),
        ("asl", {"clip": 1.5}, "clip"),
        ("focal", {"gamma": -1.0}, "gamma"),
        ("focal", {"alpha": 2.0}, "alpha"),
        ("bce", {"reduction": "avg"}, "reduction"),
    ],
)
def test_build_loss_rejects_bad_config(name: str, kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_loss(name, **kwargs)


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="does not match"):
        BCELoss()(torch.zeros(2, 3), torch.zeros(3, 2))
