"""Baseline: backbone + global average pooling + linear classifier.

The standard strong baseline of the multi-label literature (e.g. the ResNet-101 rows of
ML-GCN, Q2L and CSRA). With ``return_attention=True`` it gives class activation maps
(Zhou et al., CVPR 2016): the classifier applied at every position of the last feature map.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from mlic.models.layers import MultiLabelModel
from mlic.models.registry import register_model

__all__ = ["Baseline"]


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


@register_model
def baseline(num_classes: int, labels=None, **kwargs) -> Baseline:
    """Backbone + GAP + linear (labels unused)."""
    return Baseline(num_classes, **kwargs)
