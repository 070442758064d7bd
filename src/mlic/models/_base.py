"""``MultiLabelModel``: the base of every mlic model (a timm backbone, a head, ``default_cfg``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from mlic.config import DEFAULT_IMAGE_SIZE
from mlic.errors import ConfigError
from mlic.models._backbone import create_backbone

__all__ = ["MultiLabelModel", "make_default_cfg", "class_log_odds"]


def make_default_cfg(
    image_size: int, mean: Sequence[float], std: Sequence[float], **paper: Any
) -> dict[str, Any]:
    """The data-as-defaults dict every model exposes as ``model.default_cfg``."""
    return {
        "input_size": (3, image_size, image_size),
        "mean": tuple(mean),
        "std": tuple(std),
        "paper": dict(paper),
    }


class MultiLabelModel(nn.Module):
    """Base of every mlic model: a timm backbone + ``default_cfg``.

    Subclasses implement ``forward_head(features, return_attention)`` taking the list of
    backbone maps (shallow to deep, as selected by ``out_indices``) and returning logits
    [B, C] (and maps [B, C, h, w] when asked).
    """

    default_image_size: int = DEFAULT_IMAGE_SIZE
    paper: dict[str, Any] = {}
    #: optional learnable per-class logit offset [C] (``add_prior_bias``); None: none
    prior_bias: nn.Parameter | None

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet101",
        pretrained: bool | str = False,
        out_indices: Sequence[int] = (-1,),
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.register_parameter("prior_bias", None)  # a Parameter only after add_prior_bias
        self.backbone = create_backbone(
            backbone, pretrained=pretrained, out_indices=out_indices, drop_path_rate=drop_path_rate
        )
        dc = self.backbone.data_config
        self.default_cfg = make_default_cfg(
            self.default_image_size, dc["mean"], dc["std"], **self.paper
        )

    @property
    def has_attention(self) -> bool:
        """True when ``forward(x, return_attention=True)`` gives label-wise maps."""
        return True

    def forward_head(
        self, features: list[torch.Tensor], return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def classify(
        self, features: list[torch.Tensor], return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``forward_head`` plus the class-prior offset when the model has one."""
        out = self.forward_head(features, return_attention=return_attention)
        if self.prior_bias is None:
            return out
        if isinstance(out, tuple):
            return out[0] + self.prior_bias, out[1]  # [B, C], maps unchanged
        return out + self.prior_bias  # [B, C]

    def forward(
        self, x: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        # x: [B, 3, H, W] -> logits [B, C] (, maps [B, C, h, w])
        return self.classify(self.backbone(x), return_attention=return_attention)

    def add_prior_bias(self, labels: Any | None) -> None:
        """Add a learnable per-class logit offset that starts at each class's prior log-odds.

        Why: with a zero-mean pooled feature (EfficientNet's linear bottleneck) a head can
        express a class prior only through a bias, and heads without one (CSRA, ML-GCN's
        generated classifiers) or with a bias at PyTorch's near-zero default start every
        class at p ~ 0.5, where VOC's typical prior is ~0.07; AdamW then needs thousands of
        steps to move the bias there (BENCHMARKS section 9.4). The prior initialisation of
        RetinaNet (Lin et al., ICCV 2017), per class: ``log(p_c / (1 - p_c))`` with
        ``p_c = (n_c + 0.5) / (N + 1)`` from the training split's ``labels`` (a LabelSet);
        zeros without labels (a model rebuilt from a checkpoint, whose state fills it).
        """
        if labels is None:
            init = torch.zeros(self.num_classes)
        else:
            init = class_log_odds(labels.counts, labels.num_images)
            if init.numel() != self.num_classes:
                raise ConfigError(
                    f"prior_bias: labels have {init.numel()} classes, model {self.num_classes}"
                )
        self.prior_bias = nn.Parameter(init)

    def param_groups(
        self,
        lr: float,
        backbone_lr_mult: float,
        weight_decay: float,
        decay_norm_and_bias: bool = False,
    ) -> list[dict]:
        """Backbone vs head parameter groups; no weight decay on norms and biases (every 1-D
        parameter) unless ``decay_norm_and_bias``, which decays every parameter as ML-GCN's
        SGD and Query2Label's AdamW did (``optim.decay_norm_and_bias``)."""
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            is_backbone = name.startswith("backbone.")
            no_decay = not decay_norm_and_bias and (p.ndim <= 1 or name.endswith(".bias"))
            groups.setdefault((is_backbone, no_decay), []).append(p)
        out = []
        for (is_backbone, no_decay), params in groups.items():
            out.append(
                {
                    "params": params,
                    "lr": lr * (backbone_lr_mult if is_backbone else 1.0),
                    "weight_decay": 0.0 if no_decay else weight_decay,
                }
            )
        return out


def class_log_odds(counts: Sequence[int] | Any, num_images: int) -> torch.Tensor:
    """[C] log-odds of each class being present, smoothed: ``p = (n + 0.5) / (N + 1)``.

    The half-count keeps a class absent from (or present in every image of) the split at a
    finite value instead of -inf (+inf).
    """
    if num_images <= 0:
        raise ConfigError(f"class prior: num_images={num_images}, need a non-empty split")
    n = torch.as_tensor(counts, dtype=torch.float64)  # [C]
    p = (n + 0.5) / (num_images + 1.0)
    return torch.log(p / (1.0 - p)).float()
