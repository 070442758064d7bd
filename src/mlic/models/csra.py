"""CSRA: class-specific residual attention (Zhu & Wu, "Residual Attention: A Simple but
Effective Method for Multi-Label Recognition", ICCV 2021).

A 1x1 convolution (no bias) applies each class's classifier m_c at every position of the
backbone's last map, giving score maps ``s_c(j) = <m_c, x_j> / ||m_c||``. The logit adds to
the usual average-pooled score a class-specific attention-pooled score::

    base_c = mean_j s_c(j)                              (= a GAP classifier)
    a_c(j) = softmax_j(T * s_c(j))                      (class-specific spatial attention)
    att_c  = sum_j a_c(j) * s_c(j)                      (T -> inf: max_j s_c(j))
    logit_c = base_c + lam * att_c

Multi-head CSRA runs H such heads, each with its own classifier and temperature, and sums
their logits. The paper's temperatures per head count (T = 99 stands for infinity, i.e.
max pooling): 1: [1], 2: [1, 99], 4: [1, 2, 4, 99], 6: [1, 2, 3, 4, 5, 99],
8: [1, 2, ..., 7, 99].

Paper / official-code settings (ResNet-101, 448 px): BCE loss; SGD momentum 0.9, wd 1e-4,
lr 0.01 for the backbone and 10x (0.1) for the classifier, 2 warm-up epochs then step decay;
30 epochs, batch 16; random flip + resized crop. VOC 2007: 1 head, lam 0.1; COCO 2014:
4 heads, lam 0.5. Published results: the ``csra`` registry entry (``mlic models --paper``).

Choices that are OURS, and why:
- Heads are combined by summing their logits, as in the paper's multi-head equation and the
  official code (not averaging; each head's classifier is learnt, so the scale is absorbed).
- ``temperatures`` may be given explicitly; T = 99 (the paper's notation) or inf means exact
  max pooling, implemented as a one-hot attention on the arg-max so that every head returns
  an attention map. Any other T, however large, is a softmax.
- ``normalize=True`` divides the scores by each class's classifier norm, as the official
  code does; False gives raw classifier scores.
- ``return_attention`` maps: the first head's attention ``softmax(T_1 * s)`` [B, C, h, w]
  (T_1 = 1 in every paper setting); each map sums to 1 over positions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from mlic.errors import ConfigError
from mlic.models._base import MultiLabelModel
from mlic.models._papers import PaperResult
from mlic.models._registry import register_model

__all__ = [
    "CSRA",
    "CSRAHead",
    "PAPER_TEMPERATURES",
    "MAX_POOL_TEMPERATURE",
    "CSRA_PUBLISHED",
]

# Head count -> per-head softmax temperatures (Zhu & Wu 2021, Sec. 3.3 / official code).
PAPER_TEMPERATURES: dict[int, tuple[float, ...]] = {
    1: (1.0,),
    2: (1.0, 99.0),
    4: (1.0, 2.0, 4.0, 99.0),
    6: (1.0, 2.0, 3.0, 4.0, 5.0, 99.0),
    8: (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 99.0),
}
# The paper writes T = 99 for T -> infinity: the attention logit becomes the spatial max.
MAX_POOL_TEMPERATURE = 99.0


class CSRAHead(nn.Module):
    """One CSRA head: 1x1-conv class score maps, average pooling + lam * attention pooling."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        temperature: float = 1.0,
        lam: float = 0.1,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        if not temperature > 0:
            raise ConfigError(f"CSRA temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.max_pool = temperature in (MAX_POOL_TEMPERATURE, math.inf)
        self.lam = lam
        self.normalize = normalize
        self.classifier = nn.Conv2d(in_channels, num_classes, kernel_size=1, bias=False)

    def score_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Class score maps s [B, C, h, w]: each class's classifier applied at every position."""
        s = self.classifier(x)  # [B, C, h, w]
        if self.normalize:
            norm = self.classifier.weight.flatten(1).norm(dim=1)  # [C]
            s = s / norm[None, :, None, None]  # [B, C, h, w]
        return s

    def attention(self, s: torch.Tensor) -> torch.Tensor:
        """Class-specific spatial attention over flattened positions, [B, C, hw] summing to 1."""
        if self.max_pool:
            return F.one_hot(s.argmax(dim=-1), s.shape[-1]).to(s.dtype)  # [B, C, hw]
        return torch.softmax(s * self.temperature, dim=-1)  # [B, C, hw]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: [B, D, h, w] -> logits [B, C], attention [B, C, h, w]
        s = self.score_maps(x)  # [B, C, h, w]
        flat = s.flatten(2)  # [B, C, hw]
        base = flat.mean(dim=-1)  # [B, C]
        attn = self.attention(flat)  # [B, C, hw]
        att_logit = (attn * flat).sum(dim=-1)  # [B, C]
        return base + self.lam * att_logit, attn.view_as(s)


class CSRA(MultiLabelModel):
    """Backbone + (multi-head) class-specific residual attention classifier."""

    paper = {
        "loss": "bce",
        "optimizer": "sgd",
        "momentum": 0.9,
        "lr": 0.01,
        "head_lr_mult": 10.0,
        "weight_decay": 1e-4,
        "warmup_epochs": 2,
        "schedule": "step",
        "epochs": 30,
        "batch_size": 16,
        "voc2007": {"num_heads": 1, "lam": 0.1},
        "coco2014": {"num_heads": 4, "lam": 0.5},
    }

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet101",
        pretrained: bool | str = False,
        num_heads: int = 1,
        lam: float = 0.1,
        temperatures: Sequence[float] | None = None,
        normalize: bool = True,
        drop_path_rate: float = 0.0,
    ) -> None:
        """
        Args:
            num_heads: number of heads H (their logits are summed).
            lam: weight of the attention logit against the average-pooled one.
            temperatures: one softmax temperature per head (99 or inf: max pooling); None
                takes the paper's setting for ``num_heads`` (1, 2, 4, 6 or 8).
            normalize: divide the score maps by each class's classifier norm (official code).
        """
        super().__init__(num_classes, backbone, pretrained, (-1,), drop_path_rate)
        if temperatures is None:
            if num_heads not in PAPER_TEMPERATURES:
                raise ConfigError(
                    f"csra has paper temperatures for num_heads in {sorted(PAPER_TEMPERATURES)}, "
                    f"got {num_heads}; pass temperatures=[...] explicitly"
                )
            temperatures = PAPER_TEMPERATURES[num_heads]
        temperatures = [float(t) for t in temperatures]
        if len(temperatures) != num_heads:
            raise ConfigError(
                f"csra got {len(temperatures)} temperatures for num_heads={num_heads}"
            )
        channels = self.backbone.channels[-1]
        self.heads = nn.ModuleList(
            CSRAHead(channels, num_classes, t, lam, normalize) for t in temperatures
        )

    def forward_head(
        self, features: list[torch.Tensor], return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = features[-1]  # [B, D, h, w]
        logits = None
        maps = None
        for head in self.heads:
            head_logits, attn = head(x)  # [B, C], [B, C, h, w]
            logits = head_logits if logits is None else logits + head_logits  # [B, C]
            if maps is None:
                maps = attn  # the first head's attention [B, C, h, w]
        if not return_attention:
            return logits
        return logits, maps


_SOURCE = (
    "CSRA (Zhu & Wu, ICCV 2021, arXiv:2108.02456), the official README's model zoo "
    "(github.com/Kevinz-code/CSRA)"
)
CSRA_PUBLISHED = (
    PaperResult("voc2007", 94.7, f"{_SOURCE}: ResNet-101, 1 head", epochs=30),
    PaperResult(
        "coco2014",
        83.3,
        f"{_SOURCE}: ResNet-101, 4 heads",
        epochs=30,
        note="83.5 with 6 heads (same source).",
    ),
)


@register_model(published=CSRA_PUBLISHED)
def csra(
    num_classes: int,
    labels=None,
    backbone: str = "resnet101",
    pretrained: bool | str = False,
    **options,
) -> CSRA:
    """CSRA: class-specific residual attention head (labels unused)."""
    return CSRA(num_classes, backbone=backbone, pretrained=pretrained, **options)
