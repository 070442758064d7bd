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

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mlic.config import DEFAULT_IMAGE_SIZE  # noqa: E402
from mlic.data.dataset import load_split  # noqa: E402
from mlic.data.transforms import apply_seeded, config_transforms, decode_image  # noqa: E402
from mlic.errors import ConfigError, DataError  # noqa: E402
from mlic.files import savefig  # noqa: E402

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
    _draw(images, titles, Path(output))
    return Path(output), titles


def _draw(images: list[np.ndarray], titles: list[str], path: Path) -> None:
    """The grid, each panel titled; the unused panels of the last row left blank."""
    rows, cols = grid_shape(len(images))
    lines = max(t.count("\n") + 1 for t in titles)  # room for the longest title
    fig, axes = plt.subplots(
        rows, cols, figsize=(2.4 * cols, (2.4 + 0.18 * lines) * rows), squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, title in zip(axes.flat, images, titles, strict=False):
        ax.imshow(img)
        ax.set_title(title, fontsize=8)
    fig.tight_layout()
    try:
        savefig(fig, path, dpi=90)
    finally:
        plt.close(fig)
