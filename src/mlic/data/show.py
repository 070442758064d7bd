"""``mlic data show``: a grid of training images as the model sees them, titled with their labels.

The images go through the training transform the trainer builds
(:func:`~mlic.data.transforms.config_transforms`: resize or crop, flip, RandAugment, random
erasing), so what the augmentation does to the data can be looked at before a run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mlic.config import DEFAULT_IMAGE_SIZE
from mlic.data.dataset import load_split
from mlic.data.transforms import apply_seeded, config_transforms, decode_image
from mlic.errors import ConfigError, DataError
from mlic.viz import image_grid

__all__ = ["MAX_SHOWN", "show_batch", "grid_shape", "label_title"]

MAX_SHOWN = 64  # a grid of more is unreadable, and each image is decoded here
#: the mean and std of ImageNet: only the fill colour of random erasing depends on them
_MEAN, _STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def grid_shape(n: int) -> tuple[int, int]:
    """``(rows, columns)`` of a near-square grid for ``n`` images."""
    cols = max(1, math.ceil(math.sqrt(n)))
    return math.ceil(n / cols), cols


def label_title(names: Sequence[str], target: np.ndarray, width: int = 28) -> str:
    """The names of an image's labels (target 1), comma-separated, wrapped to ``width``;
    ``(no labels)`` for an image without any."""
    present = [names[i] for i in np.nonzero(np.asarray(target) == 1)[0]]
    if not present:
        return "(no labels)"
    lines, line = [], ""
    for name in present:
        candidate = f"{line}, {name}" if line else name
        if line and len(candidate) > width:
            lines.append(line + ",")
            candidate = name
        line = candidate
    return "\n".join([*lines, line])


def show_batch(
    data: Any,
    output: str | Path,
    split: str = "train",
    n: int = 16,
    image_size: int | None = None,
    seed: int = 0,
) -> tuple[Path, list[str]]:
    """Write a PNG grid of the first ``n`` images of ``split`` after the training transform
    of the ``data`` config section; returns ``(path, titles)`` (one title per image, in grid
    order). ``image_size``: the side the trainer would use (default ``data.image_size``, else
    448). The augmentation is seeded by ``seed`` and the image's index: the same grid twice."""
    if not 1 <= n <= MAX_SHOWN:
        raise ConfigError(f"--n {n}: must be in [1, {MAX_SHOWN}]")
    class_names = load_split(data, "train").names if split == "val" else None
    ann = load_split(data, split, class_names=class_names)
    if len(ann) == 0:
        raise DataError(f"{ann.source or 'data config'}: the {split} split has no images")
    size = int(image_size or data.image_size or DEFAULT_IMAGE_SIZE)
    train_tf, _ = config_transforms(data, size, _MEAN, _STD)  # uint8 out: no normalisation
    count = min(n, len(ann))
    titles, images = [], []
    for i in range(count):
        img = decode_image(ann.images[i], size)  # [3, H, W] uint8
        shown = apply_seeded(train_tf, img, seed * 1_000_003 + i)  # [3, S, S] uint8
        images.append(shown.permute(1, 2, 0).numpy())  # [S, S, 3] for imshow
        titles.append(label_title(ann.names, ann.targets[i]))
    _, cols = grid_shape(len(images))
    image_grid(images, titles, Path(output), columns=cols, side=2.4, fontsize=8, dpi=90)
    return Path(output), titles
