"""Visual Genome 500 (VG-500) in the layout distributed by SSGRL (Chen et al., ICCV 2019).

The same three files are used by C-Tran, Query2Label and later work (SSGRL ships them in
its ``data/VG`` folder)::

    <root>/train_list_500.txt                  one image file name per line (98,249 images)
    <root>/test_list_500.txt                   the same for the test split (10,000 images)
    <root>/vg_category_500_labels_index.json   {"<image file name>": [label index, ...], ...}
    <root>/VG_100K/, <root>/VG_100K_2/         the Visual Genome 1.2 images (either folder)

The label file covers both splits (one image's entry is looked up by its file name), and
label indices are 0..499: the 500 most frequent object names of Visual Genome, in SSGRL's
order. The distribution names no classes, so classes are called ``"0"`` ... ``"499"``
unless a category file is given (``categories_file``): a JSON list of names in index order,
a JSON object ``{name: index}`` (SSGRL's ``vg_category_*.json`` style), or a text file with
one name per line.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mlic.data import Annotations, no_label_warnings, read_json
from mlic.errors import DataError
from mlic.files import path_inside, read_regular_text

__all__ = ["VG500_IMAGE_DIRS", "VG500_LABELS", "VG500_LIST", "load_vg500", "read_categories"]

#: List file of a split name (``train`` -> ``train_list_500.txt``).
VG500_LIST = "{split}_list_500.txt"
#: Image name -> label indices, shared by both splits.
VG500_LABELS = "vg_category_500_labels_index.json"
#: Image folders searched in order (Visual Genome ships its images in two zip files).
VG500_IMAGE_DIRS = ("VG_100K", "VG_100K_2")


def read_categories(path: Path, num_classes: int) -> list[str]:
    """Class names in index order from a JSON list, a JSON ``{name: index}`` or a text file."""
    if not path.exists():
        raise DataError(f"{path}: VG category file not found")
    if path.suffix == ".json":
        data = read_json(path)
        if isinstance(data, dict):
            names = [""] * len(data)
            for name, idx in data.items():
                if not isinstance(idx, int) or not 0 <= idx < len(data) or names[idx]:
                    raise DataError(
                        f"{path}: category {name!r} has index {idx!r}; indices must be 0..{len(data) - 1}, each once"
                    )
                names[idx] = str(name)
        elif isinstance(data, list):
            names = [str(n) for n in data]
        else:
            raise DataError(f"{path}: expected a JSON list of names or {{name: index}}")
    else:
        names = [
            ln.strip()
            for ln in read_regular_text(path, "annotation file").splitlines()
            if ln.strip()
        ]
    if len(names) != num_classes:
        raise DataError(f"{path}: {len(names)} category names, expected {num_classes}")
    return names


def _list_file(root: Path, split: str) -> Path:
    if split.endswith(".txt"):
        return root / split
    return root / VG500_LIST.format(split=split)


def load_vg500(
    root: str | Path,
    split: str,
    labels_file: str = VG500_LABELS,
    categories_file: str | None = None,
    image_dirs: Sequence[str] | None = None,
    num_classes: int = 500,
) -> Annotations:
    """Read one VG-500 split.

    Args:
        root: the folder holding the list and label files (SSGRL's ``data/VG``).
        split: ``train`` or ``test`` (-> ``<split>_list_500.txt``), or a list-file name
            ending in ``.txt``, relative to ``root``.
        labels_file: the image -> label-indices JSON, relative to ``root``.
        categories_file: optional class names (see the module docstring), relative to ``root``.
        image_dirs: image folders relative to ``root``, searched in order (default
            ``VG_100K``, ``VG_100K_2``). An image in none of them is indexed under the
            first, so the image check reports it as missing.
        num_classes: label indices must be below this (500).

    Raises DataError naming the file (and line) for a missing file, a duplicate image, an
    image without an entry in the label file, or a label index out of range.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: VG-500 folder not found")
    list_path = _list_file(root, split)
    if not list_path.exists():
        avail = sorted(p.name for p in root.glob("*_list_500.txt"))
        raise DataError(f"{list_path}: VG-500 split {split!r} not found; available: {avail}")
    label_path = root / labels_file
    if not label_path.exists():
        raise DataError(f"{label_path}: VG-500 label file not found")
    labels = read_json(label_path)
    if not isinstance(labels, dict):
        raise DataError(f"{label_path}: expected a JSON object {{image name: [label index, ...]}}")
    names = (
        read_categories(root / categories_file, num_classes)
        if categories_file
        else [str(i) for i in range(num_classes)]
    )
    dirs = [root / d for d in (image_dirs or VG500_IMAGE_DIRS)]
    listings = [set(os.listdir(d)) if d.is_dir() else set() for d in dirs]

    image_names: list[str] = []
    seen: dict[str, int] = {}
    for line_no, raw in enumerate(read_regular_text(list_path, "annotation file").splitlines(), 1):
        name = raw.strip()
        if not name:
            continue
        if name in seen:
            raise DataError(
                f"{list_path}:{line_no}: duplicate image {name!r} (first on line {seen[name]})"
            )
        seen[name] = line_no
        image_names.append(name)
    targets = np.zeros((len(image_names), num_classes), dtype=np.int8)
    images: list[Path] = []
    for row, name in enumerate(image_names):
        if name not in labels:
            raise DataError(
                f"{list_path}:{seen[name]}: image {name!r} has no entry in {label_path.name}"
            )
        idx = labels[name]
        if not isinstance(idx, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in idx
        ):
            raise DataError(
                f"{label_path}: entry {name!r} must be a list of label indices, got {idx!r}"
            )
        bad = [i for i in idx if not 0 <= i < num_classes]
        if bad:
            raise DataError(
                f"{label_path}: entry {name!r} has label index {bad[0]} outside 0..{num_classes - 1}"
            )
        targets[row, idx] = 1
        folder = next((d for d, ls in zip(dirs, listings, strict=True) if name in ls), dirs[0])
        images.append(path_inside(folder, name, f"{list_path}: entry {name[:120]!r}"))
    ann = Annotations(names=names, images=images, targets=targets, source=str(list_path))
    ann.warnings = no_label_warnings(image_names, targets)
    return ann
