"""NUS-WIDE (Chua et al., CIVR 2009), 81 concepts, in the layout of its official download::

    <root>/Concepts81.txt                          concept names, one per line (label order)
    <root>/ImageList/TrainImagelist.txt            161,789 relative image paths, Windows style
    <root>/ImageList/TestImagelist.txt             107,859    (``actor\\0001_2124494179.jpg``)
    <root>/ImageList/Imagelist.txt                 all 269,648 (for split ``all``)
    <root>/Groundtruth/TrainTestLabels/Labels_<concept>_Train.txt   one 0/1 per line, aligned
    <root>/Groundtruth/TrainTestLabels/Labels_<concept>_Test.txt    with the image list
    <root>/Groundtruth/AllLabels/Labels_<concept>.txt               (for split ``all``)
    <root>/Flickr/<folder>/<image>.jpg            the images (``\\`` in the list becomes ``/``)

Images with none of the 81 concepts (about a fifth of NUS-WIDE) are kept as all-negative
rows and reported as warnings; many papers drop them, which a user can do by filtering the
image list files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mlic.data import Annotations, no_label_warnings
from mlic.errors import DataError
from mlic.files import path_inside, read_regular_text

__all__ = ["load_nuswide"]

# split -> (image list, label folder, label file name pattern)
_SPLITS = {
    "train": ("ImageList/TrainImagelist.txt", "Groundtruth/TrainTestLabels", "Labels_{}_Train.txt"),
    "test": ("ImageList/TestImagelist.txt", "Groundtruth/TrainTestLabels", "Labels_{}_Test.txt"),
    "all": ("ImageList/Imagelist.txt", "Groundtruth/AllLabels", "Labels_{}.txt"),
}


def _read_column(path: Path, n: int) -> np.ndarray:
    """One concept's 0/1 column [n] from ``path``; errors name the file and line."""
    if not path.exists():
        raise DataError(f"{path}: NUS-WIDE label file not found")
    text = read_regular_text(path, "annotation file")
    values = np.array(text.split())  # fast path; the slow one below only names a bad line
    ok = (values == "0") | (values == "1")
    if not ok.all() or len(values) != n:
        rows = [(i, ln.strip()) for i, ln in enumerate(text.splitlines(), 1) if ln.strip()]
        for line_no, v in rows:
            if v not in ("0", "1"):
                raise DataError(f"{path}:{line_no}: label must be 0 or 1, got {v!r}")
        raise DataError(f"{path}: {len(rows)} labels but the image list has {n} images")
    return (values == "1").astype(np.int8)


def load_nuswide(
    root: str | Path,
    split: str,
    image_dir: str = "Flickr",
    concepts_file: str = "Concepts81.txt",
) -> Annotations:
    """Read the official ``train`` / ``test`` split (or ``all``) of NUS-WIDE.

    Args:
        root: the NUS-WIDE folder (holding ``Concepts81.txt``, ``ImageList``, ``Groundtruth``).
        split: ``train``, ``test`` or ``all`` (case-insensitive; ``Train``/``Test`` as in the
            file names work too).
        image_dir: image folder relative to ``root``.
        concepts_file: the concept list, relative to ``root``; its order is the label order.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: NUS-WIDE folder not found")
    key = split.lower()
    if key not in _SPLITS:
        raise DataError(f"NUS-WIDE split {split!r} not known; choose one of {list(_SPLITS)}")
    list_rel, label_rel, pattern = _SPLITS[key]
    concepts_path = root / concepts_file
    if not concepts_path.exists():
        raise DataError(f"{concepts_path}: NUS-WIDE concept list not found")
    names = [
        ln.strip()
        for ln in read_regular_text(concepts_path, "annotation file").splitlines()
        if ln.strip()
    ]
    if not names:
        raise DataError(f"{concepts_path}: no concept names")
    list_path = root / list_rel
    if not list_path.exists():
        raise DataError(f"{list_path}: NUS-WIDE image list not found")
    rel_paths: list[str] = []
    seen: dict[str, int] = {}
    for line_no, raw in enumerate(read_regular_text(list_path, "annotation file").splitlines(), 1):
        rel = raw.strip().replace("\\", "/")
        if not rel:
            continue
        if rel in seen:
            raise DataError(
                f"{list_path}:{line_no}: duplicate image {rel!r} (first on line {seen[rel]})"
            )
        seen[rel] = line_no
        rel_paths.append(rel)
    label_dir = root / label_rel
    targets = (
        np.stack(
            [_read_column(label_dir / pattern.format(c), len(rel_paths)) for c in names], axis=1
        )
        if rel_paths
        else np.zeros((0, len(names)), dtype=np.int8)
    )
    images = [path_inside(root / image_dir, rel, f"{list_path}:{seen[rel]}") for rel in rel_paths]
    ann = Annotations(names=names, images=images, targets=targets, source=str(list_path))
    ann.warnings = no_label_warnings(rel_paths, targets)
    return ann
