"""Generic CSV: ``image,labels`` with ``;``-separated label names per row.

The header row is required (``image,labels``). Class order is the sorted set of names seen,
unless ``class_names`` is given (then an unknown name is an error naming the line); names
that differ only by case or surrounding whitespace are refused. A row
with an empty label list is an image with no labels: kept, and named in
``Annotations.warnings``.
"""

from __future__ import annotations

import csv as _csv
import io
import os
from pathlib import Path

import numpy as np

from mlic.data import Annotations, no_label_warnings
from mlic.data.labels import check_class_names
from mlic.errors import DataError
from mlic.files import path_inside, read_regular_text

__all__ = ["load_csv"]


def load_csv(
    csv_path: str | Path, image_dir: str | Path, class_names: list[str] | None = None
) -> Annotations:
    """Read ``csv_path``; image paths are relative to ``image_dir``."""
    path = Path(csv_path)
    if not path.exists():
        raise DataError(f"{path}: CSV file not found")
    image_dir = Path(image_dir)
    text = read_regular_text(path, "CSV file")
    rows: list[tuple[str, list[str]]] = []
    reader = _csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
    except _csv.Error as e:
        raise DataError(f"{path}:1: malformed CSV ({e})") from None
    if header is None or [h.strip().lower() for h in header[:2]] != ["image", "labels"]:
        raise DataError(f"{path}:1: expected header 'image,labels', got {header}")
    seen: dict[str, int] = {}  # normalised image path -> line
    first_line = reader.line_num + 1
    while True:
        try:
            row = next(reader, None)
        except _csv.Error as e:
            raise DataError(f"{path}:{first_line}: malformed CSV ({e})") from None
        if row is None:
            break
        line, first_line = first_line, reader.line_num + 1
        if reader.line_num > line or any("\n" in c or "\r" in c for c in row):
            # a quoted field ran over line ends: an unbalanced quote
            raise DataError(
                f"{path}:{line}: a quoted field runs on to line {reader.line_num} "
                "(unbalanced quote?); quote fields that contain commas, close every quote"
            )
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != 2:
            raise DataError(
                f"{path}:{line}: expected 2 columns (image,labels), got {len(row)}: {row}"
            )
        image, labels = row[0].strip(), row[1].strip()
        if not image:
            raise DataError(f"{path}:{line}: empty image path")
        path_inside(image_dir, image, f"{path}:{line}")  # no absolute or ../ names
        key = os.path.normpath(image)  # img/a.jpg and ./img/a.jpg are one file
        if key in seen:
            raise DataError(f"{path}:{line}: duplicate image {image!r} (first on line {seen[key]})")
        seen[key] = line
        names = [n.strip() for n in labels.split(";") if n.strip()]
        rows.append((image, names))
        if class_names is not None:
            for n in names:
                if n not in class_names:
                    raise DataError(f"{path}:{line}: unknown label {n!r}")
    names = (
        list(class_names) if class_names is not None else sorted({n for _, ns in rows for n in ns})
    )
    names = check_class_names(names, str(path))  # "Person" and "person": refused, both named
    col = {n: i for i, n in enumerate(names)}
    targets = np.zeros((len(rows), len(names)), dtype=np.int8)
    for r, (_, ns) in enumerate(rows):
        for n in ns:
            targets[r, col[n]] = 1
    ann = Annotations(
        names=names, images=[image_dir / img for img, _ in rows], targets=targets, source=str(path)
    )
    ann.warnings = no_label_warnings(
        [f"{img} (line {seen[os.path.normpath(img)]})" for img, _ in rows], targets
    )
    return ann
