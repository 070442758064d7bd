"""``mlic predict``: files, folders and globs -> table / CSV / JSONL, with optional heat maps.

Unreadable files are reported by name and skipped; the rest are still predicted, and the
command's exit code says that some failed.
"""

from __future__ import annotations

import csv
import glob
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from mlic.data.transforms import load_image
from mlic.errors import DataError
from mlic.files import atomic_write, display_path
from mlic.inference import Prediction, Predictor

__all__ = ["IMAGE_EXTENSIONS", "expand_inputs", "run_predict", "write_heatmaps", "PredictSummary"]

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


def expand_inputs(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """Files, folders (recursive, image extensions only) and globs -> (image paths, problems)."""
    paths: list[Path] = []
    problems: list[str] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            paths += sorted(
                f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
            )
        elif p.exists():
            paths.append(p)
        elif glob.has_magic(item):
            found = sorted(Path(f) for f in glob.glob(item, recursive=True) if Path(f).is_file())
            if not found:
                problems.append(f"{item}: no file matches")
            paths += found
        else:
            problems.append(f"{item}: no such file or folder")
    return paths, problems


def write_heatmaps(pred: Prediction, out_dir: Path, stem: str) -> list[Path]:
    """Overlay PNG per predicted label + one labelled grid image for ``pred`` (needs image + attention)."""
    from mlic.viz import heatmap_grid, label_file_names, overlay_heatmap

    if pred.image is None or pred.attention is None:
        raise ValueError("prediction has no image or attention maps")
    out_dir.mkdir(parents=True, exist_ok=True)
    index = {n: i for i, n in enumerate(pred.scores)}
    # one distinct file per label, whatever the labels' accents, scripts or case
    parts = label_file_names(list(pred.scores), reserved=["grid"])
    written, overlays, titles = [], [], []
    for name in pred.labels:
        ov = overlay_heatmap(pred.image, pred.attention[index[name]])
        path = out_dir / f"{stem}__{parts[name]}.png"
        atomic_write(path, lambda tmp, im=ov: im.save(tmp, format="PNG"))
        written.append(path)
        overlays.append(ov)
        titles.append(f"{name} ({pred.scores[name]:.2f})")
    written.append(heatmap_grid(pred.image, overlays, titles, out_dir / f"{stem}__grid.png"))
    return written


@dataclass
class PredictSummary:
    predictions: list[Prediction] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def _decoded(paths: list[Path], size: int, failed: list[str]) -> Iterator[tuple[Path, object]]:
    for p in paths:
        try:
            yield p, load_image(p, draft_size=size)
        except DataError as e:
            failed.append(str(e))


def run_predict(
    predictor: Predictor,
    inputs: list[str],
    batch_size: int = 16,
    threshold: float | None = None,
    top_k: int | None = None,
    heatmaps: Path | None = None,
    progress: bool = True,
) -> PredictSummary:
    """Predict every image named by ``inputs``; unreadable ones are listed in ``failed``."""
    paths, problems = expand_inputs(inputs)
    summary = PredictSummary(failed=list(problems))
    bar = tqdm(total=len(paths), desc="predict", unit="img", disable=not progress, file=sys.stderr)
    batch: list[tuple[Path, object]] = []

    def flush() -> None:
        if not batch:
            return
        preds = predictor.predict(
            [im for _, im in batch],
            threshold=threshold,
            top_k=top_k,
            return_attention=heatmaps is not None,
            batch_size=len(batch),
            keep_images=heatmaps is not None,
        )
        for (path, _), pred in zip(batch, preds, strict=True):
            pred.source = str(path)
            if heatmaps is not None:
                from mlic.viz import file_slug

                stem = f"{len(summary.predictions):05d}_{file_slug(path.stem, max_chars=80)}"
                write_heatmaps(pred, heatmaps, stem)
                pred.image = None  # do not keep every decoded image in memory
                pred.attention = None
            summary.predictions.append(pred)
        bar.update(len(batch))
        batch.clear()

    for item in _decoded(paths, predictor.image_size, summary.failed):
        batch.append(item)
        if len(batch) == batch_size:
            flush()
    flush()
    bar.update(len(paths) - bar.n)
    bar.close()
    return summary


def write_predictions(preds: list[Prediction], names: list[str], output: Path) -> None:
    """``.csv``: image, labels (;-joined), one probability column per class, then the
    threshold each class was compared with (``threshold:<class>``). ``.jsonl``: one object
    per image with ``labels``, ``scores`` and ``thresholds``.

    Written to a temporary file and renamed: a full disk or a crash never leaves a
    half-written file, and an existing file is replaced only by a complete one.
    """
    output = Path(output)
    if output.suffix not in (".csv", ".jsonl"):
        raise DataError(f"{output}: output must end in .csv or .jsonl")

    def write(tmp: Path) -> None:
        # file names that are not UTF-8 are written with \\xNN escapes: the file stays UTF-8
        if output.suffix == ".jsonl":
            with tmp.open("w", encoding="utf-8") as f:
                for p in preds:
                    row = {
                        "image": display_path(p.source),
                        "labels": p.labels,
                        "scores": p.scores,
                        "thresholds": p.thresholds,
                    }
                    f.write(json.dumps(row) + "\n")
            return
        with tmp.open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["image", "labels", *names, *(f"threshold:{n}" for n in names)])
            for p in preds:
                scores = (f"{p.scores[n]:.6f}" for n in names)
                thresholds = (f"{p.thresholds[n]:.6f}" for n in names)
                w.writerow([display_path(p.source), ";".join(p.labels), *scores, *thresholds])

    atomic_write(output, write)


def format_table(preds: list[Prediction], max_scores: int = 3) -> str:
    """A plain terminal table: image, predicted labels, top probabilities, each with the
    threshold it was compared with (``dog 0.91/0.42``: probability / threshold)."""
    rows = [("image", "labels", "top scores (probability/threshold)")]
    for p in preds:
        top = sorted(p.scores.items(), key=lambda kv: -kv[1])[:max_scores]
        rows.append(
            (
                display_path(p.source),
                ", ".join(p.labels) or "-",
                "  ".join(f"{n} {v:.2f}/{p.thresholds.get(n, 0.5):.2f}" for n, v in top),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    return "\n".join(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]}" for r in rows)
