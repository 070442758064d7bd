"""Baseline: backbone + global average pooling + linear classifier.

The standard strong baseline of the multi-label literature (e.g. the ResNet-101 rows of
ML-GCN, Q2L and CSRA; the registry entry records ML-GCN's, ``mlic models --paper``). With ``return_attention=True`` it gives class activation maps
(Zhou et al., CVPR 2016): the classifier applied at every position of the last feature map.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from mlic.models._base import MultiLabelModel
from mlic.models._papers import PaperResult
from mlic.models._registry import register_model

__all__ = ["Baseline", "BASELINE_PUBLISHED"]


class Baseline(MultiLabelModel):
    paper = {"loss": "asl", "optimizer": "adamw", "lr": 1e-4, "epochs": 40}

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet101",
        pretrained: bool | str = False,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__(num_classes, backbone, pretrained, (-1,), drop_path_rate)
        channels = self.backbone.channels[-1]
        self.dropout = nn.Dropout(drop_rate)
        self.fc = nn.Linear(channels, num_classes)

    def forward_head(
        self, features: list[torch.Tensor], return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = features[-1]  # [B, D, h, w]
        logits = self.fc(self.dropout(x.mean(dim=(2, 3))))  # [B, C]
        if not return_attention:
            return logits
        cam = torch.einsum("bdhw,cd->bchw", x, self.fc.weight)  # [B, C, h, w]
        return logits, cam


_SOURCE = "ML-GCN (Chen et al., CVPR 2019)"
BASELINE_PUBLISHED = (
    PaperResult(
        "coco2014",
        77.3,
        f"{_SOURCE}, Table 1: ResNet-101 with global average pooling",
        CF1=72.8,
        OF1=76.8,
    ),
    PaperResult(
        "voc2007",
        91.7,
        f"{_SOURCE}, the official README: Res-101 GAP",
        note="The paper's Table 2 prints 89.9 for ResNet-101.",
    ),
)


@register_model(published=BASELINE_PUBLISHED)
def baseline(num_classes: int, labels=None, **kwargs) -> Baseline:
    """Backbone + GAP + linear (labels unused)."""
    return Baseline(num_classes, **kwargs)
