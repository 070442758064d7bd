"""PASCAL VOC 2007/2012: ``VOCdevkit/VOC20xx`` with XML annotations.

A class is 1 when the image has at least one non-difficult object of it, -1 (ignore) when
all its objects are marked ``difficult``, and 0 otherwise -- the standard VOC protocol.
An image with no (non-difficult) object is kept and named in ``Annotations.warnings``.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from mlic.data import Annotations, no_label_warnings
from mlic.errors import DataError
from mlic.files import (
    MAX_ANNOTATION_BYTES,
    path_inside,
    read_regular_bytes,
    read_regular_text,
)

__all__ = ["VOC_CLASSES", "load_voc", "parse_voc_xml"]

VOC_CLASSES = [
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
]


def parse_voc_xml(path: Path) -> tuple[str | None, list[tuple[str, bool, int]]]:
    """Read one VOC XML: ``(filename, [(class name, difficult, line), ...])``.

    Raises DataError naming the file (and line, for syntax errors) when malformed.
    """
    try:
        root = ET.fromstring(read_regular_bytes(path, "annotation file", MAX_ANNOTATION_BYTES))
    except ET.ParseError as e:
        line = e.position[0] if e.position else "?"
        raise DataError(f"{path}:{line}: malformed XML ({e})") from e
    except OSError as e:
        raise DataError(f"{path}: cannot read annotation ({e.strerror})") from e
    if root.tag != "annotation":
        raise DataError(f"{path}: root element is <{root.tag}>, expected <annotation>")
    filename = root.findtext("filename")
    objects = []
    for i, obj in enumerate(root.iter("object")):
        name = obj.findtext("name")
        if name is None or not name.strip():
            raise DataError(f"{path}: object #{i + 1} has no <name>")
        diff = (obj.findtext("difficult") or "0").strip()
        if diff not in ("0", "1"):
            raise DataError(
                f"{path}: object #{i + 1} ({name}) has <difficult>{diff}</difficult>, expected 0 or 1"
            )
        objects.append((name.strip(), diff == "1", i + 1))
    return filename, objects


def _read_class_list(root: Path) -> list[str] | None:
    labels = root / "labels.txt"
    if labels.exists():
        names = [
            n.strip() for n in read_regular_text(labels, "class list").splitlines() if n.strip()
        ]
        return names or None
    return None


def load_voc(root: str | Path, split: str, class_names: list[str] | None = None) -> Annotations:
    """Load a VOC split.

    Args:
        root: the ``VOC2007``/``VOC2012`` folder (holding ``Annotations``, ``JPEGImages``,
            ``ImageSets/Main``).
        split: an image-set name in ``ImageSets/Main`` (``train``, ``val``, ``trainval``, ``test``).
        class_names: class order; default: ``labels.txt`` in ``root`` when present (datasets
            in VOC layout such as the demo set), else the 20 standard VOC classes.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: VOC folder not found (expected VOCdevkit/VOC2007 or VOC2012)")
    set_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if not set_file.exists():
        avail = sorted(
            p.stem for p in (root / "ImageSets" / "Main").glob("*.txt") if "_" not in p.stem
        )
        raise DataError(f"{set_file}: split {split!r} not found; available: {avail}")
    names = class_names or _read_class_list(root) or list(VOC_CLASSES)
    index = {n: i for i, n in enumerate(names)}
    ids = [
        ln.split()[0]
        for ln in read_regular_text(set_file, "image-set file").splitlines()
        if ln.strip()
    ]
    seen: dict[str, int] = {}
    for line_no, image_id in enumerate(ids, 1):
        if image_id in seen:
            raise DataError(
                f"{set_file}:{line_no}: duplicate image id {image_id!r} (first on line {seen[image_id]})"
            )
        seen[image_id] = line_no
    targets = np.zeros((len(ids), len(names)), dtype=np.int8)
    images: list[Path] = []
    for row, image_id in enumerate(ids):
        xml_path = root / "Annotations" / f"{image_id}.xml"
        filename, objects = parse_voc_xml(xml_path)
        name = filename or f"{image_id}.jpg"
        images.append(path_inside(root / "JPEGImages", name, f"{xml_path}: <filename>"))
        for name, difficult, obj_no in objects:
            col = index.get(name)
            if col is None:
                raise DataError(
                    f"{xml_path}: object #{obj_no} has unknown class {name!r}; known: {names}"
                )
            if not difficult:
                targets[row, col] = 1
            elif targets[row, col] == 0:
                targets[row, col] = -1
    ann = Annotations(names=names, images=images, targets=targets, source=str(set_file))
    ann.warnings = no_label_warnings(ids, targets)
    return ann
