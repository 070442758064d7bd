"""MS-COCO 2014/2017 ``instances_*.json``: image-level labels from instance annotations.

Classes are the file's categories in category-id order (person=1, bicycle=2, ...), the
order used by the published COCO multi-label results.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mlic.data import Annotations, no_label_warnings, read_json
from mlic.errors import DataError
from mlic.files import path_inside

__all__ = ["load_coco"]


def _require(obj: dict, key: str, where: str) -> object:
    if not isinstance(obj, dict) or key not in obj:
        raise DataError(f"{where}: missing key {key!r}")
    return obj[key]


def load_coco(annotation_json: str | Path, image_dir: str | Path) -> Annotations:
    """Load a COCO instances file; images without any annotation get an all-zero row.

    Such images (about 1% of COCO 2014 train) are kept and named in ``Annotations.warnings``.
    """
    path = Path(annotation_json)
    if not path.exists():
        raise DataError(f"{path}: COCO annotation file not found")
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise DataError(f"{image_dir}: COCO image folder not found")
    data = read_json(path)
    cats = _require(data, "categories", str(path))
    imgs = _require(data, "images", str(path))
    anns = _require(data, "annotations", str(path))
    cat_list = sorted(
        (
            (
                int(_require(c, "id", f"{path}: categories[{i}]")),
                str(_require(c, "name", f"{path}: categories[{i}]")),
            )
            for i, c in enumerate(cats)
        ),
    )
    ids_seen: dict[int, str] = {}
    for cid, name in cat_list:
        if cid in ids_seen:  # one id, two classes: annotations could not tell them apart
            raise DataError(
                f"{path}: duplicate category id {cid} ({ids_seen[cid]!r} and {name!r}); "
                "every category needs its own id"
            )
        ids_seen[cid] = name
    col_of = {cid: col for col, (cid, _) in enumerate(cat_list)}
    names = [n for _, n in cat_list]
    row_of: dict[int, int] = {}
    images: list[Path] = []
    ids: list[str] = []
    for i, img in enumerate(imgs):
        where = f"{path}: images[{i}]"
        iid = int(_require(img, "id", where))
        if iid in row_of:
            raise DataError(f"{where}: duplicate image id {iid}")
        row_of[iid] = len(images)
        file_name = str(_require(img, "file_name", where))
        images.append(path_inside(image_dir, file_name, f"{where}.file_name"))
        ids.append(f"{file_name} (image id {iid})")
    targets = np.zeros((len(images), len(names)), dtype=np.int8)
    for i, ann in enumerate(anns):
        where = f"{path}: annotations[{i}]"
        iid = int(_require(ann, "image_id", where))
        cid = int(_require(ann, "category_id", where))
        if cid not in col_of:
            raise DataError(f"{where}: category_id {cid} is not in the file's categories")
        if iid not in row_of:
            raise DataError(f"{where}: image_id {iid} is not in the file's images")
        targets[row_of[iid], col_of[cid]] = 1
    ann = Annotations(names=names, images=images, targets=targets, source=str(path))
    ann.warnings = no_label_warnings(ids, targets)
    return ann
