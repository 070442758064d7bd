"""Suspected label errors of a training split, from out-of-fold scores (``mlic data issues``).

Every training image is scored by a model that never saw it (K fold runs,
:mod:`mlic.engine.folds`); each (image, class) label is then judged by confident learning
(Northcutt, Jiang & Chuang, "Confident Learning: Estimating Uncertainty in Dataset Labels",
JAIR 70, 2021), applied one class at a time as a binary task -- the multi-label reduction
cleanlab's documentation describes. The few lines of ranking are written here: cleanlab is
AGPL-3.0 and mlic Apache-2.0, so it is neither a dependency nor a source.

Per class c, on its scored entries (target -1 and unscored images are ignored):

* ``t_pos[c]``: the mean out-of-fold probability of the class's given positives (their
  average self-confidence). A given 0 with ``p >= t_pos[c]`` -- the model is as sure of the
  class as on a typical labelled positive -- is a suspected **missing** label.
* ``t_neg[c]``: the mean probability of the class's given negatives, which is 1 - their
  average self-confidence (confident learning's threshold of the "absent" label). A given 1
  with ``p <= t_neg[c]`` -- scored like a typical negative -- is a suspected **extra** label.
* A class whose positives score no higher than its negatives on average (``t_pos <= t_neg``:
  the model learnt nothing of it) gets no suspects; confident learning would flag all of them.

Label quality = self-confidence: ``p`` for a given 1, ``1 - p`` for a given 0, in [0, 1],
lower = more suspect. Suspects are ranked by it over all classes (rank 1 = most suspect;
ties: image row, then class). Per class, the summary gives the suspects and an estimated
noise rate (suspects / given positives, suspects / images), and the separation
``t_pos - t_neg``: where it is small the fold models barely tell the class apart and its
suspects are mostly the models' noise (train the folds longer: ``--fold-epochs``).
"""

from __future__ import annotations

import csv
import html
import io
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlic.config import Config, to_dict
from mlic.data import Annotations
from mlic.data.dataset import image_folder, load_split
from mlic.engine.folds import OutOfFold, out_of_fold_scores
from mlic.errors import ConfigError, DataError
from mlic.files import (
    atomic_write,
    display_path,
    is_run_folder,
    read_regular_text,
    refuse_run_file,
    save_npy,
    write_text,
)

__all__ = [
    "LabelIssues",
    "IssuesResult",
    "rank_label_issues",
    "find_label_issues",
    "write_outputs",
    "write_fixed",
    "check_fixed_target",
    "image_names",
    "annotation_files",
]

log = logging.getLogger("mlic")

ISSUES_COLUMNS = ("image", "class", "given", "suggested", "score", "rank")
SUMMARY_COLUMNS = (
    *("class", "positives", "negatives", "images", "threshold", "threshold_negative", "separation"),
    *("suspected_missing", "suspected_extra", "suspects"),
    *("noise_rate_positives", "noise_rate_images"),
)
#: The page shows at most this many suspects per class and in all (thumbnails are files).
PAGE_PER_CLASS = 20
PAGE_TOTAL = 200
THUMB_SIZE = 160
#: Below this separation (``t_pos - t_neg``) a class's suspects are called unreliable.
WEAK_SEPARATION = 0.1
#: What ``output`` records of the setting its fold runs were made with (resume check).
RECORD = "issues.json"


@dataclass
class LabelIssues:
    """Suspected label errors in rank order (index 0 = rank 1) and a summary per class."""

    row: np.ndarray  # [S] image row in the split
    cls: np.ndarray  # [S] class column
    given: np.ndarray  # [S] 0/1: the label as annotated
    suggested: np.ndarray  # [S] 1 - given
    score: np.ndarray  # [S] label quality (self-confidence), ascending
    threshold_pos: np.ndarray  # [C] mean probability of each class's given positives
    threshold_neg: np.ndarray  # [C] mean probability of each class's given negatives
    summary: list[dict[str, Any]] = field(default_factory=list)  # one row per class

    def __len__(self) -> int:
        return len(self.row)

    @property
    def rank(self) -> np.ndarray:
        """``[S]`` 1..S."""
        return np.arange(1, len(self.row) + 1)


def _class_means(p: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean of ``p`` ``[N, C]`` over the rows where ``mask`` ``[N, C]`` holds, per column
    (NaN for a column without any)."""
    count = mask.sum(axis=0)  # [C]
    total = np.where(mask, p, 0.0).sum(axis=0)  # [C]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def rank_label_issues(
    scores: np.ndarray, targets: np.ndarray, names: list[str] | None = None
) -> LabelIssues:
    """Rank the suspected label errors of ``targets`` ``[N, C]`` (1, 0, -1 = ignore) from
    out-of-fold probabilities ``scores`` ``[N, C]`` (NaN rows: unscored, ignored). See the
    module docstring for the method."""
    p = np.asarray(scores, dtype=np.float64)  # [N, C]
    y = np.asarray(targets)  # [N, C]
    if p.shape != y.shape or p.ndim != 2:
        raise DataError(f"scores {p.shape} and targets {y.shape} must be the same [N, C]")
    valid = np.isfinite(p) & ((y == 0) | (y == 1))  # [N, C]
    pos, neg = valid & (y == 1), valid & (y == 0)
    t_pos, t_neg = _class_means(p, pos), _class_means(p, neg)  # [C], [C]
    learnt = np.isfinite(t_pos) & np.isfinite(t_neg) & (t_pos > t_neg)  # [C]
    missing = neg & learnt & (p >= np.where(learnt, t_pos, np.inf))  # [N, C]
    extra = pos & learnt & (p <= np.where(learnt, t_neg, -np.inf))  # [N, C]
    row, cls = np.nonzero(missing | extra)  # row-major: ties broken by row, then class
    given = y[row, cls].astype(np.int8)
    quality = np.where(given == 1, p[row, cls], 1.0 - p[row, cls])
    order = np.lexsort((cls, row, quality))  # score first; stable on (row, class)
    names = names or [str(c) for c in range(p.shape[1])]
    summary = []
    for c, name in enumerate(names):
        n_pos, n_img = int(pos[:, c].sum()), int(valid[:, c].sum())
        n_miss, n_extra = int(missing[:, c].sum()), int(extra[:, c].sum())
        summary.append(
            {
                "class": name,
                "positives": n_pos,
                "negatives": int(neg[:, c].sum()),
                "images": n_img,
                "threshold": float(t_pos[c]),
                "threshold_negative": float(t_neg[c]),
                "separation": float(t_pos[c] - t_neg[c]),
                "suspected_missing": n_miss,
                "suspected_extra": n_extra,
                "suspects": n_miss + n_extra,
                "noise_rate_positives": (n_miss + n_extra) / n_pos if n_pos else float("nan"),
                "noise_rate_images": (n_miss + n_extra) / n_img if n_img else float("nan"),
            }
        )
    return LabelIssues(
        row=row[order],
        cls=cls[order],
        given=given[order],
        suggested=(1 - given[order]).astype(np.int8),
        score=quality[order],
        threshold_pos=t_pos,
        threshold_neg=t_neg,
        summary=summary,
    )


# ----------------------------------------------------------------------------- data places
def image_names(data_cfg: Any, ann: Annotations) -> tuple[list[str], Path]:
    """Each image's name relative to the data's image folder (as its annotations name it),
    and that folder; images outside it: relative to their common folder instead."""
    base = image_folder(data_cfg, "train")
    if not all(p.is_relative_to(base) for p in ann.images):
        base = Path(os.path.commonpath([os.path.abspath(p.parent) for p in ann.images] or ["."]))
        images = [Path(os.path.abspath(p)) for p in ann.images]
    else:
        images = ann.images
    return [p.relative_to(base).as_posix() for p in images], base


def annotation_files(data_cfg: Any) -> list[Path]:
    """The training split's annotation files (never written), where the format has them."""
    root = Path(str(data_cfg.root))
    if data_cfg.format == "voc":
        return [root / "ImageSets" / "Main" / f"{data_cfg.train}.txt"]
    if data_cfg.format in ("csv", "coco", "openimages"):
        return [root / data_cfg.train]
    return []


def _data_folders(data_cfg: Any) -> list[Path]:
    """Folders ``mlic data issues`` never writes into: the data root and the image folder
    (unless one is the working folder or above it, as ``data.root=.`` makes it)."""
    here = Path.cwd().resolve()
    out = []
    for folder in {Path(str(data_cfg.root)).resolve(), image_folder(data_cfg, "train").resolve()}:
        if folder != here and folder not in here.parents:
            out.append(folder)
    return out


def _check_output(data_cfg: Any, output: Path) -> None:
    """Refuse an output folder inside the data, or a training run's folder or files."""
    if is_run_folder(output):
        raise ConfigError(
            f"--output {display_path(output)}: is a training run's folder (its folds/ are the "
            "run's own); choose another folder"
        )
    target = output.resolve()
    for folder in _data_folders(data_cfg):
        if target == folder or folder in target.parents:
            raise ConfigError(
                f"--output {display_path(output)}: is inside the data folder "
                f"{display_path(folder)}; mlic never writes there, choose another folder"
            )
    refuse_run_file(output / "issues.csv", "--output")


def _fingerprint(cfg: Config, folds: int, epochs: int) -> dict[str, Any]:
    """What decides the fold runs' scores: not where runs go, workers, eval batch size, nor
    what a fold run's config replaces (its epochs, calibration, evaluation schedule)."""
    d = to_dict(cfg)
    d.pop("run", None)
    d.pop("thresholds", None)
    for key in ("workers", "eval_batch_size", "folds", "fold"):
        d["data"].pop(key, None)
    for key in [k for k in d["data"] if k.startswith("calibration")]:
        d["data"].pop(key)
    for key in ("epochs", "eval_every", "select_on"):
        d["train"].pop(key, None)
    return json.loads(json.dumps({"folds": folds, "fold_epochs": epochs, "config": d}))


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b))
        return [d for k in keys for d in _differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def _check_record(output: Path, want: dict[str, Any], main: bool) -> None:
    """``output`` holds fold runs of this setting, or none yet (then record it)."""
    path = output / RECORD
    if path.exists():
        try:
            have = json.loads(read_regular_text(path, "issues record"))
        except ValueError as e:
            raise DataError(f"{path}: unreadable ({e}); delete {display_path(output)}") from None
        diff = _differences(have, want)
        if diff:
            keys = ", ".join(k.removeprefix("config.") for k in diff[:5])
            raise ConfigError(
                f"--output {display_path(output)}: holds fold runs made with other settings "
                f"({keys}); choose another --output or delete that folder to start over"
            )
    elif main:
        write_text(path, json.dumps(want, indent=1))


# ----------------------------------------------------------------------------- outputs
def _csv_text(rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def _write_tables(output: Path, issues: LabelIssues, names: list[str], classes: list[str]) -> None:
    rows: list[list[Any]] = [list(ISSUES_COLUMNS)]
    for r, c, g, s, q, k in zip(
        issues.row,
        issues.cls,
        issues.given,
        issues.suggested,
        issues.score,
        issues.rank,
        strict=True,
    ):
        rows.append([names[r], classes[c], int(g), int(s), f"{q:.6f}", int(k)])
    write_text(output / "issues.csv", _csv_text(rows))
    summary: list[list[Any]] = [list(SUMMARY_COLUMNS)]
    for s in issues.summary:
        summary.append(
            [f"{s[k]:.6f}" if isinstance(s[k], float) else s[k] for k in SUMMARY_COLUMNS]
        )
    write_text(output / "summary.csv", _csv_text(summary))


def _page_entries(issues: LabelIssues, num_classes: int) -> dict[int, list[int]]:
    """Suspect indices shown per class: the class's most suspect ones, in rank order."""
    per = min(PAGE_PER_CLASS, max(1, PAGE_TOTAL // max(num_classes, 1)))
    shown: dict[int, list[int]] = {}
    for i, c in enumerate(issues.cls):
        lst = shown.setdefault(int(c), [])
        if len(lst) < per:
            lst.append(i)
    return shown


def _thumbnail(src: Path, dst: Path) -> bool:
    """A small JPEG of ``src`` at ``dst``; False when the image can not be read."""
    from mlic.data.transforms import load_image

    try:
        img = load_image(src, draft_size=2 * THUMB_SIZE)
        img.thumbnail((THUMB_SIZE, THUMB_SIZE))
        atomic_write(dst, lambda tmp: img.save(tmp, format="JPEG", quality=85))
        return True
    except Exception as e:  # noqa: BLE001 -- a page must not fail on one unreadable picture
        log.debug("no thumbnail of %s: %s", src, e)
        return False


PAGE_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
.wide{overflow-x:auto}table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:2px 8px}
th{background:#f3f3f3}td.n{text-align:right}h2{margin-top:1.5em;border-bottom:1px solid #ddd}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{width:170px;border:1px solid #ddd;border-radius:6px;padding:5px;font-size:12px}
.card img{display:block;max-width:160px;max-height:160px;margin:auto}
.name{word-break:break-all;color:#555}.missing{color:#0a6}.extra{color:#c30}
.none{height:80px;display:flex;align-items:center;justify-content:center;background:#eee}
"""


def _card(issues: LabelIssues, i: int, names: list[str], thumbs: dict[int, bool]) -> str:
    r, g = int(issues.row[i]), int(issues.given[i])
    kind = "missing" if g == 0 else "extra"
    pic = (
        f'<img src="thumbs/{r}.jpg" alt="">'
        if thumbs.get(r)
        else '<div class="none">no preview</div>'
    )
    return (
        f'<div class="card">{pic}<div class="name">{html.escape(names[r])}</div>'
        f'<div class="{kind}">{kind} label: given {g}, suggested {1 - g}</div>'
        f"<div>score {issues.score[i]:.3f} &middot; rank {i + 1}</div></div>"
    )


def _write_page(
    output: Path, issues: LabelIssues, ann: Annotations, names: list[str], oof: OutOfFold
) -> None:
    shown = _page_entries(issues, len(ann.names))
    rows = sorted({int(issues.row[i]) for lst in shown.values() for i in lst})
    thumbs = {r: _thumbnail(ann.images[r], output / "thumbs" / f"{r}.jpg") for r in rows}
    e = html.escape
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>Suspected label errors</title>"
        f"<style>{PAGE_CSS}</style></head><body><h1>Suspected label errors</h1>",
        f"<p>{int(oof.scored.sum())} training images, each scored by one of {oof.folds} fold "
        f"runs ({oof.epochs} epoch(s) each) that never saw it; {len(issues)} suspected errors "
        "in <code>issues.csv</code>. <b>score</b> is the model's out-of-fold confidence in the "
        "given label (p for a given 1, 1 &minus; p for a given 0): lower is more suspect. "
        "<span class='missing'>missing</span>: not labelled, but scored like the class's "
        "labelled images; <span class='extra'>extra</span>: labelled, but scored like the "
        "images without it. Check each by eye before changing a label. A small "
        f"<b>separation</b> (below {WEAK_SEPARATION}) means the fold models barely tell the "
        "class apart: its suspects are mostly their noise.</p>",
        # the summary scrolls on its own where it is wider than the window
        "<div class='wide'><table><tr>"
        + "".join(f"<th>{e(k)}</th>" for k in SUMMARY_COLUMNS)
        + "</tr>",
    ]
    for s in issues.summary:
        cells = [f"<td>{e(s['class'])}</td>"]
        cells += [
            f"<td class='n'>{s[k]:.3f}</td>"
            if isinstance(s[k], float)
            else f"<td class='n'>{s[k]}</td>"
            for k in SUMMARY_COLUMNS[1:]
        ]
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</table></div>")
    for c in sorted(shown):
        total = issues.summary[c]["suspects"]
        parts.append(
            f"<h2>{e(ann.names[c])} <small>({len(shown[c])} of {total} shown)</small></h2>"
        )
        parts.append(
            '<div class="cards">'
            + "".join(_card(issues, i, names, thumbs) for i in shown[c])
            + "</div>"
        )
    parts.append("</body></html>\n")
    write_text(output / "index.html", "\n".join(parts))


# ----------------------------------------------------------------------------- the command
@dataclass
class IssuesResult:
    """What :func:`find_label_issues` found and wrote."""

    output: Path
    issues: LabelIssues
    oof: OutOfFold
    ann: Annotations  # the training split, as annotated
    names: list[str]  # each image's name relative to image_base
    image_base: Path
    seconds: float
    files: dict[str, Path] = field(default_factory=dict)


def _checked_split(oof: OutOfFold, ann: Annotations, output: Path) -> None:
    """The fold runs scored this split: same size, classes and labels."""
    redo = (
        f"the annotations changed since the fold runs; delete {display_path(output)} to redo them"
    )
    if len(oof.scores) != len(ann) or oof.names != ann.names:
        raise DataError(f"{display_path(output / 'folds')}: {redo}")
    scored = oof.scored
    if not np.array_equal(oof.targets[scored], ann.targets[scored]):
        raise DataError(f"{display_path(output / 'folds')}: {redo}")


def find_label_issues(
    cfg: Config,
    output: str | Path,
    folds: int,
    train_fn: Callable[..., dict[str, Any]],
    epochs: int | None = None,
) -> IssuesResult | None:
    """Score every training image of ``cfg`` out of fold (``folds`` fold runs in
    ``output/folds``, run, resumed or read) and write ``issues.csv``, ``summary.csv``,
    ``oof_scores.npy`` and ``index.html`` (+ ``thumbs/``) in ``output``. Returns None on the
    ranks of a torchrun other than 0 (they only train)."""
    if folds < 2:
        raise ConfigError(f"--folds {folds}: needs at least 2 folds")
    output = Path(output)
    _check_output(cfg.data, output)
    main = int(os.environ.get("RANK", "0")) == 0
    ann = load_split(cfg.data, "train")
    epochs = epochs or cfg.train.epochs
    _check_record(output, _fingerprint(cfg, folds, epochs), main)
    t0 = time.perf_counter()
    oof = out_of_fold_scores(cfg, output / "folds", train_fn, folds, epochs)
    if not main:
        return None
    _checked_split(oof, ann, output)
    names, base = image_names(cfg.data, ann)
    issues, files = write_outputs(output, oof, ann, names)
    return IssuesResult(output, issues, oof, ann, names, base, time.perf_counter() - t0, files)


def write_outputs(
    output: Path, oof: OutOfFold, ann: Annotations, names: list[str]
) -> tuple[LabelIssues, dict[str, Path]]:
    """Rank ``oof``'s scores against its labels and write the four outputs (+ ``thumbs/``)
    in ``output``; ``names``: each image of ``ann`` as the tables show it."""
    issues = rank_label_issues(oof.scores, oof.targets, ann.names)
    save_npy(output / "oof_scores.npy", oof.scores)
    _write_tables(output, issues, names, ann.names)
    _write_page(output, issues, ann, names, oof)
    files = {k: output / k for k in ("issues.csv", "summary.csv", "oof_scores.npy", "index.html")}
    return issues, files


# ----------------------------------------------------------------------------- corrected labels
def check_fixed_target(path: str | Path, inputs: list[Path]) -> None:
    """Refuse ``--write-fixed path`` before any work: an input annotation file, any existing
    file, or a training run's file."""
    path = Path(path)
    for given in inputs:
        if given.exists() and path.resolve() == given.resolve():
            raise ConfigError(
                f"--write-fixed {display_path(path)}: is the input annotation file; "
                "mlic never modifies it, choose a new file name"
            )
    if path.exists() or path.is_symlink():
        raise ConfigError(
            f"--write-fixed {display_path(path)}: exists; mlic writes the corrected labels "
            "only to a new file, choose another name"
        )
    refuse_run_file(path, "--write-fixed")


def write_fixed(
    path: str | Path,
    result: IssuesResult,
    top: int,
    inputs: list[Path] | None = None,
) -> tuple[Path, int]:
    """A copy of the training labels in mlic's CSV format (``image,labels``; names relative
    to ``result.image_base``) with the ``top`` most suspect labels flipped to their
    suggestion; returns the file and how many labels changed. ``-1`` (ignore) entries are
    written as absent: the CSV format has no "ignore"."""
    check_fixed_target(path, inputs if inputs is not None else [])
    if top < 0:
        raise ConfigError(f"--top {top}: must be >= 0")
    classes = result.ann.names
    bad = [c for c in classes if ";" in c or c != c.strip()]
    if bad:
        raise DataError(
            f"class name {bad[0]!r} can not be written in mlic's CSV format (';' or spaces)"
        )
    issues = result.issues
    n = min(top, len(issues))
    fixed = (result.ann.targets == 1).astype(np.int8)  # [N, C]
    fixed[issues.row[:n], issues.cls[:n]] = issues.suggested[:n]
    rows: list[list[Any]] = [["image", "labels"]]
    for name, labels in zip(result.names, fixed, strict=True):
        rows.append([name, ";".join(classes[c] for c in np.flatnonzero(labels))])
    write_text(path, _csv_text(rows))
    return Path(path), n
