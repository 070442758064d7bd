"""Label-wise heat maps for every model: its own attention, else Grad-CAM.

Models with label-wise spatial attention (and the pooled linear heads, whose
``return_attention`` gives class activation maps, Zhou et al. CVPR 2016) answer
``forward(x, return_attention=True)`` with maps [B, C, h, w]. A model without such maps
(``has_attention`` False, or no ``return_attention`` argument at all) gets Grad-CAM
(Selvaraju et al., ICCV 2017) on its backbone's last feature map: per class, the
spatially averaged gradient of the logit weights the channels, then ReLU. For a
GAP + linear head Grad-CAM is ReLU(CAM) / (h * w), which the tests check.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["label_maps", "grad_cam", "has_attention_maps"]


def has_attention_maps(model: nn.Module) -> bool:
    """True when ``model(x, return_attention=True)`` gives label-wise maps [B, C, h, w]."""
    return bool(getattr(model, "has_attention", False))


def grad_cam(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Grad-CAM of every class on the backbone's last map: (logits [B, C], maps [B, C, h, w]).

    ``model`` must be an mlic model (``backbone`` + ``classify``), so that the last
    feature map is the one every head reads. Runs with gradients whatever the caller's
    mode (one backward pass per class); the model's parameters get no ``.grad``.
    """
    if not (hasattr(model, "backbone") and hasattr(model, "classify")):
        raise TypeError(f"grad_cam needs an mlic model with a backbone, got {type(model).__name__}")
    with torch.inference_mode(False), torch.enable_grad():
        x = images.detach().clone()  # a normal tensor even if made under inference_mode
        feats = [f.detach().clone().requires_grad_(True) for f in model.backbone(x)]
        last = feats[-1]  # [B, D, h, w]
        logits = model.classify(feats)  # [B, C]
        if isinstance(logits, tuple):
            logits = logits[0]
        maps = []
        for c in range(logits.shape[1]):
            (grad,) = torch.autograd.grad(logits[:, c].sum(), last, retain_graph=True)
            weights = grad.mean(dim=(2, 3), keepdim=True)  # [B, D, 1, 1]
            maps.append(torch.relu((weights * last).sum(dim=1)))  # [B, h, w]
        cams = torch.stack(maps, dim=1)  # [B, C, h, w]
    return logits.detach(), cams.detach()


def label_maps(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [B, C], maps [B, C, h, w]) for any mlic model: its attention, else Grad-CAM."""
    if has_attention_maps(model):
        logits, maps = model(images, return_attention=True)
        if maps.ndim == 4 and maps.shape[:2] == logits.shape:
            return logits, maps
    return grad_cam(model, images)
