"""Open Images (V4-V7) human-verified image-level labels.

Files, as Open Images distributes them::

    <split>-annotations-human-imagelabels.csv   ImageID,Source,LabelName,Confidence
                                                000002b66c9c498e,verification,/m/014sv8,1
    class-descriptions.csv (or oidv7-class-descriptions.csv, class-descriptions-boxable.csv)
                                                LabelName,DisplayName  (header optional)
                                                /m/01g317,Person
    <image_dir>/<ImageID>.jpg

Targets: ``Confidence`` 1 (verified present) -> 1, 0 (verified absent) -> 0, and every label
no human verified for the image -> -1 (ignore): Open Images labels are sparse, so an
unverified class is unknown, not absent. Two verdicts that disagree for the same image and
label (rare; different verification sources) also give -1, with a warning.

The class list fixes the label space: rows whose ``LabelName`` is not in it are left out
(counted in a warning), because the label files cover ~20k classes while a class list such
as the 600 boxable classes is a deliberate subset. Class names are the ``DisplayName``\\ s;
a display name used by two label names gets its label name appended (``Bat (/m/01h44)``).
"""

from __future__ import annotations

import csv as _csv
from array import array
from pathlib import Path

import numpy as np

from mlic.data import Annotations, no_label_warnings
from mlic.errors import DataError
from mlic.files import path_inside, require_regular_file

__all__ = ["load_openimages", "read_class_descriptions"]

_REQUIRED = ("ImageID", "LabelName", "Confidence")
_CONFIDENCE = {"1": 1, "0": 0}
_CLASS_HEADER = ["labelname", "displayname"]  # optional first row of class-descriptions files


def _parse_confidence(text: str, where: str) -> int:
    """0 or 1 from a Confidence cell written another way (``1.0``); anything else is an error."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if value not in (0.0, 1.0):
        raise DataError(f"{where}: Confidence must be 0 or 1 (human-verified labels), got {text!r}")
    return int(value)


def read_class_descriptions(path: str | Path) -> tuple[list[str], list[str]]:
    """``(label names, display names)`` in file order from a class-descriptions CSV."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: Open Images class-descriptions file not found")
    mids: list[str] = []
    display: list[str] = []
    seen: set[str] = set()
    require_regular_file(path, "annotation file")  # streamed: no size bound
    with path.open(newline="", encoding="utf-8") as f:
        reader = _csv.reader(f)
        for row in reader:
            line = f"{path}:{reader.line_num}"
            if not row or all(not c.strip() for c in row):
                continue
            if reader.line_num == 1 and [c.strip().lower() for c in row] == _CLASS_HEADER:
                continue
            if len(row) != 2 or not row[0].strip():
                raise DataError(f"{line}: expected 'LabelName,DisplayName', got {row}")
            mid, name = row[0].strip(), row[1].strip() or row[0].strip()
            if mid in seen:
                raise DataError(f"{line}: duplicate label name {mid!r}")
            seen.add(mid)
            mids.append(mid)
            display.append(name)
    if not mids:
        raise DataError(f"{path}: no classes")
    counts: dict[str, int] = {}
    for n in display:
        counts[n] = counts.get(n, 0) + 1
    display = [n if counts[n] == 1 else f"{n} ({m})" for m, n in zip(mids, display, strict=True)]
    return mids, display


def load_openimages(
    labels_csv: str | Path,
    image_dir: str | Path,
    classes_csv: str | Path | None = None,
    class_names: list[str] | None = None,
) -> Annotations:
    """Read a human-verified image-labels CSV.

    Args:
        labels_csv: ``ImageID,Source,LabelName,Confidence`` rows (header required; column
            order free; ``Source`` optional).
        image_dir: folder of ``<ImageID>.jpg``.
        classes_csv: class-descriptions CSV fixing classes and order; without it the classes
            are ``class_names`` (label names, e.g. those of the training split) or else the
            sorted label names of this file.
        class_names: see ``classes_csv``; ignored when ``classes_csv`` is given.

    Images appear in first-seen order. Raises DataError naming file and line for a missing
    column, an empty ImageID or LabelName, or a Confidence other than 0 or 1.
    """
    path = Path(labels_csv)
    if not path.exists():
        raise DataError(f"{path}: Open Images label file not found")
    image_dir = Path(image_dir)
    # Streamed into compact arrays: the V7 training file has tens of millions of rows.
    image_code: dict[str, int] = {}
    label_code: dict[str, int] = {}
    rows, labels = array("l"), array("l")
    values = array("b")
    require_regular_file(path, "annotation file")  # streamed: no size bound
    with path.open(newline="", encoding="utf-8") as f:
        reader = _csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        missing = [c for c in _REQUIRED if c not in header]
        if missing:
            raise DataError(
                f"{path}:1: missing column(s) {missing}; expected header "
                f"'ImageID,Source,LabelName,Confidence', got {header}"
            )
        ci, cl, cc = (header.index(c) for c in _REQUIRED)
        width = len(header)
        for row in reader:
            if len(row) != width:
                if not row or all(not c.strip() for c in row):
                    continue
                raise DataError(
                    f"{path}:{reader.line_num}: expected {width} columns, got {len(row)}: {row}"
                )
            image_id, label, conf = row[ci].strip(), row[cl].strip(), row[cc].strip()
            if not image_id or not label:
                raise DataError(f"{path}:{reader.line_num}: empty ImageID or LabelName: {row}")
            value = _CONFIDENCE.get(conf)
            if value is None:
                value = _parse_confidence(conf, f"{path}:{reader.line_num}")
            rows.append(image_code.setdefault(image_id, len(image_code)))
            labels.append(label_code.setdefault(label, len(label_code)))
            values.append(value)

    if classes_csv is not None:
        mids, names = read_class_descriptions(classes_csv)
    elif class_names is not None:
        mids, names = list(class_names), list(class_names)
    else:
        mids = sorted(label_code)
        names = list(mids)
    col_of = {m: i for i, m in enumerate(mids)}
    code_to_col = np.array([col_of.get(m, -1) for m in label_code], dtype=np.int64)
    r = np.asarray(rows, dtype=np.int64)
    c = code_to_col[np.asarray(labels, dtype=np.int64)]
    v = np.asarray(values, dtype=np.int8)
    known = c >= 0
    # verdict bits per (image, class): 1 = verified present, 2 = verified absent
    verdict = np.zeros((len(image_code), len(mids)), dtype=np.int8)
    np.bitwise_or.at(verdict, (r[known], c[known]), np.where(v[known] == 1, 1, 2).astype(np.int8))
    targets = np.full(verdict.shape, -1, dtype=np.int8)
    targets[verdict == 1] = 1
    targets[verdict == 2] = 0  # 3: both verdicts -> stays -1 (ignore)
    ids = list(image_code)
    warnings = []
    if (~known).any():
        codes = np.asarray(labels, dtype=np.int64)[~known]
        label_names = list(label_code)
        unknown = sorted({label_names[k] for k in np.unique(codes)})
        first = ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        warnings.append(
            f"{path}: {int((~known).sum())} row(s) with {len(unknown)} label name(s) not in "
            f"the class list left out ({first})"
        )
    for i, j in zip(*np.nonzero(verdict == 3), strict=True):
        warnings.append(f"{ids[i]}: conflicting verdicts for {mids[j]} (set to ignore)")
    warnings += no_label_warnings(ids, targets)
    ann = Annotations(
        names=names,
        images=[path_inside(image_dir, f"{i}.jpg", f"{path}: ImageID") for i in ids],
        targets=targets,
        source=str(path),
    )
    ann.warnings = warnings
    return ann
