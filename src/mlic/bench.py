"""Model size and speed measurements: parameters, forward FLOPs (``torch.utils.flop_counter``)."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from mlic.data.labels import LabelSet

__all__ = ["count_params", "forward_flops", "model_summary", "random_labelset"]


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()  # not inference_mode: FlopCounterMode trips over parameters returned as outputs
def forward_flops(model: torch.nn.Module, image_size: int, batch: int = 1) -> float:
    """FLOPs of one forward pass per image (a multiply-add counts 2)."""
    model.eval()
    x = torch.zeros(batch, 3, image_size, image_size)
    counter = FlopCounterMode(display=False)
    with counter:
        model(x)
    return counter.get_total_flops() / batch


def random_labelset(num_classes: int, seed: int = 0) -> LabelSet:
    """A plausible LabelSet (random sparse targets + random 300-d word vectors) for sizing models."""
    g = torch.Generator().manual_seed(seed)
    targets = (torch.rand(1000, num_classes, generator=g) < 0.05).to(torch.int8).numpy()
    labels = LabelSet.from_targets([f"class_{i}" for i in range(num_classes)], targets)
    labels.word_vectors = torch.randn(num_classes, 300, generator=g).numpy()
    return labels


def model_summary(
    name: str,
    backbone: str = "resnet101",
    image_size: int = 448,
    num_classes: int = 80,
    flops: bool = True,
) -> dict[str, Any]:
    """Parameter count (M) and forward GFLOPs per image of a registered model."""
    from mlic.models.registry import create_model

    model = create_model(
        name, num_classes, labels=random_labelset(num_classes), backbone=backbone, pretrained=False
    )
    return {
        "model": name,
        "backbone": backbone,
        "image_size": image_size,
        "num_classes": num_classes,
        "params_m": count_params(model) / 1e6,
        "gflops": forward_flops(model, image_size) / 1e9 if flops else None,
    }
