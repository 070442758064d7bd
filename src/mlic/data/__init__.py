"""Dataset sources in their real formats, label statistics and transforms.

Every source returns an :class:`Annotations`: the ordered class names, the image paths
and a target matrix with 1 (present), 0 (absent) and -1 (ignore, e.g. VOC "difficult").
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlic.errors import DataError

__all__ = ["Annotations", "NO_LABELS", "no_label_warnings", "read_json"]

#: Text of the warning readers attach to an image without any positive label.
NO_LABELS = "no labels"


@dataclass
class Annotations:
    """Image list and labels of one split.

    Attributes:
        names: class names, in target column order.
        images: one path per image.
        targets: int8 matrix [N, C]; 1 present, 0 absent, -1 ignore.
        source: where the annotations came from (for error messages and reports).
    """

    names: list[str]
    images: list[Path]
    targets: np.ndarray
    source: str = ""
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.images = [Path(p) for p in self.images]
        self.targets = np.asarray(self.targets, dtype=np.int8)
        if self.targets.ndim != 2:
            raise DataError(
                f"{self.source}: targets must be 2-D [N, C], got shape {self.targets.shape}"
            )
        n, c = self.targets.shape
        if n != len(self.images):
            raise DataError(f"{self.source}: {len(self.images)} images but {n} target rows")
        if c != len(self.names):
            raise DataError(f"{self.source}: {len(self.names)} class names but {c} target columns")
        bad = set(np.unique(self.targets).tolist()) - {-1, 0, 1}
        if bad:
            raise DataError(f"{self.source}: targets must be 1/0/-1, found {sorted(bad)}")
        if len(set(self.names)) != len(self.names):
            dup = sorted({n for n in self.names if self.names.count(n) > 1})
            raise DataError(f"{self.source}: duplicate class names {dup}")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def subset(self, indices: np.ndarray | list[int]) -> Annotations:
        """Rows ``indices`` as a new Annotations with the same classes."""
        idx = np.asarray(indices, dtype=np.int64)
        return Annotations(
            names=list(self.names),
            images=[self.images[i] for i in idx],
            targets=self.targets[idx],
            source=self.source,
        )


def read_json(path: Path) -> Any:
    """Parse a JSON file; a syntax error is a DataError naming the file and line."""
    try:
        from mlic.files import read_regular_text

        return json.loads(read_regular_text(path, "JSON file"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from e


def no_label_warnings(ids: Sequence[str], targets: np.ndarray) -> list[str]:
    """One warning per image with no positive label: ``"<image id>: no labels ..."``.

    Such images are kept (as all-negative examples, which is what they are for a closed
    label set), but a reader that finds many of them usually reads the wrong files.
    """
    empty = np.flatnonzero(~(np.asarray(targets) == 1).any(axis=1))
    return [f"{ids[i]}: {NO_LABELS} (kept as an all-negative image)" for i in empty]
