"""Multi-label losses on logits: binary cross-entropy, asymmetric loss (ASL) and focal loss.

Every loss here takes ``logits [B, C]`` (no sigmoid) and ``targets [B, C]`` with 1 = present,
0 = absent and -1 = ignore, and shares one convention so they can be swapped in a config:

* Ignored entries are masked out: they add nothing to the loss and get exactly zero gradient.
* ``reduction="mean"`` (default) divides the summed loss by the number of *valid* (non-ignored)
  entries, so with no ignored entries ``BCELoss`` equals
  ``F.binary_cross_entropy_with_logits(..., reduction="mean")`` and the loss scale does not
  change with the number of classes. ``reduction="sum"`` is the sum over valid entries, the
  scale used in the ASL paper (Ridnik et al. 2021); ``"none"`` returns ``[B, C]`` with zeros at
  ignored entries. With no valid entry at all, ``"mean"`` returns 0 (not NaN).
* Losses are computed in float32 even when the logits are bf16/fp16 (autocast), and from
  ``logsigmoid`` rather than ``log(sigmoid(x))``, so they stay finite for any finite logit.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mlic.errors import ConfigError

__all__ = ["AsymmetricLoss", "BCELoss", "FocalLoss", "LOSSES", "build_loss", "loss_from_config"]

_REDUCTIONS = ("mean", "sum", "none")


class _MaskedMultiLabelLoss(nn.Module):
    """Shared masking and reduction; subclasses implement :meth:`elementwise`."""

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ConfigError(
                f"unknown reduction {reduction!r}; choose one of: {', '.join(_REDUCTIONS)}"
            )
        self.reduction = reduction

    def elementwise(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-entry loss ``[B, C]`` for float32 logits and targets in {0, 1}."""
        raise NotImplementedError

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Masked, reduced loss; a scalar unless ``reduction="none"`` (then ``[B, C]``)."""
        if logits.shape != targets.shape:
            raise ValueError(
                f"logits shape {tuple(logits.shape)} does not match targets shape "
                f"{tuple(targets.shape)}"
            )
        logits = logits.float()  # [B, C]
        valid = targets != -1  # [B, C]
        clean = torch.where(valid, targets, torch.zeros_like(targets)).to(logits.dtype)  # [B, C]
        # torch.where (not multiplication) so a masked entry cannot leak inf/NaN into the result.
        loss = torch.where(valid, self.elementwise(logits, clean), logits.new_zeros(()))
        if self.reduction == "none":
            return loss  # [B, C]
        total = loss.sum()
        if self.reduction == "sum":
            return total
        return total / valid.sum().clamp(min=1).to(total.dtype)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


class BCELoss(_MaskedMultiLabelLoss):
    """Binary cross-entropy on logits, ``-[y log p + (1 - y) log(1 - p)]``, ignoring -1."""

    def elementwise(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # log p = logsigmoid(x), log(1 - p) = logsigmoid(-x): exact for large |x|.
        return -(targets * F.logsigmoid(logits) + (1 - targets) * F.logsigmoid(-logits))


class AsymmetricLoss(_MaskedMultiLabelLoss):
    """Asymmetric loss (ASL; Ridnik et al., ICCV 2021) for positive-negative imbalance.

    With ``p = sigmoid(x)`` and the shifted probability ``p_m = max(p - clip, 0)``:

    * positives: ``-(1 - p)^gamma_pos * log(p)``
    * negatives: ``-p_m^gamma_neg * log(1 - p_m)``

    ``gamma_neg > gamma_pos`` focuses less on the many easy negatives; the shift discards
    negatives with ``p <= clip`` entirely (zero loss and gradient) and lowers the weight of
    likely mislabelled ones. Gradients flow through the focusing weights, as in the paper's
    loss. With ``gamma_pos = gamma_neg = 0`` and ``clip = 0`` this is exactly :class:`BCELoss`.
    ``eps`` keeps ``p_m`` away from 0 inside the power so a fractional ``gamma_neg`` has a
    finite gradient; those entries have ``log(1 - p_m) = 0`` and contribute nothing.
    """

    def __init__(
        self,
        gamma_pos: float = 0.0,
        gamma_neg: float = 4.0,
        clip: float = 0.05,
        eps: float = 1e-8,
        reduction: str = "mean",
    ) -> None:
        super().__init__(reduction)
        if gamma_pos < 0 or gamma_neg < 0:
            raise ConfigError(f"ASL gammas must be >= 0; got {gamma_pos=}, {gamma_neg=}")
        if not 0.0 <= clip < 1.0:
            raise ConfigError(f"ASL clip must be in [0, 1); got {clip}")
        if eps <= 0:
            raise ConfigError(f"ASL eps must be > 0; got {eps}")
        self.gamma_pos = float(gamma_pos)
        self.gamma_neg = float(gamma_neg)
        self.clip = float(clip)
        self.eps = float(eps)

    def elementwise(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log_p = F.logsigmoid(logits)  # [B, C] log p
        log_1mp = F.logsigmoid(-logits)  # [B, C] log(1 - p)
        loss_pos = -log_p  # [B, C]
        if self.gamma_pos > 0:
            loss_pos = loss_pos * torch.exp(self.gamma_pos * log_1mp)  # (1 - p)^gamma_pos
        if self.clip > 0:
            # 1 - p_m = min(1 - p + clip, 1) >= clip, so its log is bounded.
            log_1m_pm = torch.log((torch.sigmoid(-logits) + self.clip).clamp(max=1.0))
            weight_neg = (torch.sigmoid(logits) - self.clip).clamp(min=self.eps)  # p_m
            weight_neg = weight_neg.pow(self.gamma_neg)
        else:
            log_1m_pm = log_1mp
            weight_neg = torch.exp(self.gamma_neg * log_p)  # p^gamma_neg
        loss_neg = -log_1m_pm * weight_neg  # [B, C]
        return targets * loss_pos + (1 - targets) * loss_neg

    def extra_repr(self) -> str:
        return (
            f"gamma_pos={self.gamma_pos}, gamma_neg={self.gamma_neg}, clip={self.clip}, "
            f"{super().extra_repr()}"
        )


class FocalLoss(_MaskedMultiLabelLoss):
    """Sigmoid focal loss (Lin et al., ICCV 2017), ``-alpha_t (1 - p_t)^gamma log(p_t)``.

    ``alpha`` weights positives and ``1 - alpha`` negatives (0.25 and gamma 2 are the paper's
    and ``torchvision.ops.sigmoid_focal_loss``'s defaults); ``alpha=None`` weights both 1.
    With ``gamma = 0`` and ``alpha = None`` this is exactly :class:`BCELoss`.
    """

    def __init__(
        self, gamma: float = 2.0, alpha: float | None = 0.25, reduction: str = "mean"
    ) -> None:
        super().__init__(reduction)
        if gamma < 0:
            raise ConfigError(f"focal gamma must be >= 0; got {gamma}")
        if alpha is not None and not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"focal alpha must be in [0, 1] or None; got {alpha}")
        self.gamma = float(gamma)
        self.alpha = None if alpha is None else float(alpha)

    def elementwise(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log_p = F.logsigmoid(logits)  # [B, C] log p
        log_1mp = F.logsigmoid(-logits)  # [B, C] log(1 - p)
        # (1 - p)^gamma and p^gamma via exp(gamma * log): finite gradients for any gamma >= 0.
        loss_pos = -log_p * torch.exp(self.gamma * log_1mp)  # [B, C]
        loss_neg = -log_1mp * torch.exp(self.gamma * log_p)  # [B, C]
        if self.alpha is not None:
            loss_pos = self.alpha * loss_pos
            loss_neg = (1.0 - self.alpha) * loss_neg
        return targets * loss_pos + (1 - targets) * loss_neg

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, alpha={self.alpha}, {super().extra_repr()}"


LOSSES: dict[str, type[_MaskedMultiLabelLoss]] = {
    "bce": BCELoss,
    "asl": AsymmetricLoss,
    "focal": FocalLoss,
}


def build_loss(name: str, **kwargs: Any) -> nn.Module:
    """Build a loss by config name (``"bce"``, ``"asl"``, ``"focal"``) and keyword options.

    Unknown names and unknown or invalid options raise :class:`ConfigError` naming what is
    allowed, so a typo in a YAML recipe fails before training starts.
    """
    key = name.lower()
    if key not in LOSSES:
        raise ConfigError(f"unknown loss {name!r}; choose one of: {', '.join(sorted(LOSSES))}")
    cls = LOSSES[key]
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as err:
        allowed = ", ".join(inspect.signature(cls).parameters)
        raise ConfigError(f"loss {key!r}: {err}; allowed options: {allowed}") from None
    return cls(**kwargs)


def loss_from_config(cfg: Any) -> nn.Module:
    """The loss a :class:`~mlic.config.LossConfig` names, with that loss's own options."""
    if cfg.name == "asl":
        return build_loss("asl", gamma_pos=cfg.gamma_pos, gamma_neg=cfg.gamma_neg, clip=cfg.clip)
    if cfg.name == "focal":
        return build_loss("focal", gamma=cfg.focal_gamma, alpha=cfg.focal_alpha)
    return build_loss(cfg.name)
