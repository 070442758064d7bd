"""Plots and the Markdown report: metric table, per-class AP bars, PR curves, co-occurrence.

Everything renders with matplotlib's Agg backend to PNG files beside ``report.md``, so
reports are made on headless machines.
"""

from __future__ import annotations

import hashlib
import math
import re
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from mlic.files import savefig, write_text  # noqa: E402
from mlic.thresholds import describe_stored  # noqa: E402

__all__ = [
    "METRIC_KEYS",
    "metric_table",
    "ap_axis_start",
    "per_class_ap_figure",
    "plot_per_class_ap",
    "cooccurrence_figure",
    "plot_pr_curves",
    "plot_cooccurrence",
    "precision_recall_curve",
    "write_report",
    "overlay_heatmap",
    "heatmap_grid",
    "file_slug",
    "label_file_names",
]

METRIC_KEYS = ["mAP", "CP", "CR", "CF1", "OP", "OR", "OF1"]
TOP3_KEYS = ["CP_top3", "CR_top3", "CF1_top3", "OP_top3", "OR_top3", "OF1_top3"]


def metric_table(results: dict[str, float], keys: Sequence[str] = METRIC_KEYS) -> str:
    """A Markdown table of the given metrics in percent (as papers report them)."""
    keys = [k for k in keys if k in results]
    head = "| " + " | ".join(keys) + " |"
    rule = "|" + "|".join(["---:"] * len(keys)) + "|"
    vals = "| " + " | ".join(f"{100 * results[k]:.2f}" for k in keys) + " |"
    return "\n".join([head, rule, vals])


def precision_recall_curve(
    scores: np.ndarray, targets: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall at every distinct score of one class (ignore entries dropped)."""
    keep = targets >= 0
    s, t = scores[keep], targets[keep] == 1
    order = np.argsort(-s, kind="stable")
    s, t = s[order], t[order]
    tp = np.cumsum(t)
    fp = np.cumsum(~t)
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # last index of each tie group
    tp, fp = tp[last], fp[last]
    precision = tp / np.maximum(tp + fp, 1)
    recall = tp / max(int(t.sum()), 1)
    return precision, recall


def ap_axis_start(ap_percent: np.ndarray) -> float:
    """Where the AP axis starts: a multiple of 5 a little below the lowest AP (0 when that
    is near 0), so that 91 against 98 shows as a difference, not as two full bars."""
    if len(ap_percent) == 0:
        return 0.0
    low, high = float(np.min(ap_percent)), float(np.max(ap_percent))
    start = 5 * math.floor((low - max(2.0, 0.15 * (high - low))) / 5)
    return float(max(0, start))


def per_class_ap_figure(names: Sequence[str], ap: np.ndarray) -> Figure:
    """Horizontal bars of per-class AP, best on top, each labelled with its value; classes
    without positives (NaN) are omitted. The axis starts a little below the lowest AP (the
    axis label says so when that is not 0)."""
    valid = ~np.isnan(ap)
    idx = np.argsort(-np.where(valid, ap, -1))[: int(valid.sum())]
    values = 100 * ap[idx][::-1]  # worst first: barh draws bottom-up
    start = ap_axis_start(values)
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.22 * len(idx) + 1)))
    bars = ax.barh([names[i] for i in idx][::-1], values - start, left=start, color="#3b75af")
    ax.bar_label(bars, labels=[f"{v:.1f}" for v in values], padding=2, fontsize=7)
    ax.set_xlabel("AP (%)" if start == 0 else f"AP (%); the axis starts at {start:.0f}, not 0")
    ax.set_xlim(start, 100 + 0.08 * (100 - start))  # room for the value of a 100 bar
    mean = f"{100 * np.nanmean(ap):.2f}" if valid.any() else "-"
    ax.set_title(f"Per-class AP (mAP {mean})")
    fig.tight_layout()
    return fig


def plot_per_class_ap(names: Sequence[str], ap: np.ndarray, path: Path) -> Path:
    """:func:`per_class_ap_figure` written to ``path`` (PNG)."""
    return _save(per_class_ap_figure(names, ap), path)


def plot_pr_curves(
    names: Sequence[str],
    scores: np.ndarray,
    targets: np.ndarray,
    ap: np.ndarray,
    path: Path,
    k: int = 3,
) -> Path:
    """Precision-recall curves of the ``k`` best and ``k`` worst classes by AP."""
    valid = np.nonzero(~np.isnan(ap))[0]
    order = valid[np.argsort(-ap[valid])]
    chosen = list(order[:k]) + [i for i in order[-k:] if i not in order[:k]]
    fig, ax = plt.subplots(figsize=(6, 5))
    for i in chosen:
        p, r = precision_recall_curve(scores[:, i], targets[:, i])
        style = "-" if i in order[:k] else "--"
        ax.step(
            np.r_[0, r],
            np.r_[1, p],
            style,
            where="post",
            label=f"{names[i]} (AP {100 * ap[i]:.1f})",
        )
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title("Precision-recall: best (solid) and worst (dashed) classes")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    savefig(fig, path, dpi=110)
    plt.close(fig)
    return path


#: the co-occurrence map writes its numbers in the cells up to this many classes
MAX_NUMBERED_CLASSES = 25


def cooccurrence_figure(names: Sequence[str], targets: np.ndarray) -> Figure:
    """Heat map of P(column | row) over the given targets (present = 1), in percent in
    each cell when there are at most :data:`MAX_NUMBERED_CLASSES` classes."""
    y = (np.asarray(targets) == 1).astype(np.float64)
    co = y.T @ y
    cond = co / np.maximum(np.diag(co)[:, None], 1)
    np.fill_diagonal(cond, np.nan)
    n = len(names)
    cell = 0.3 if n > MAX_NUMBERED_CLASSES else 0.42  # numbered cells need room for "100"
    fig, ax = plt.subplots(figsize=(max(4, cell * n + 2), max(3.5, cell * n + 1.5)))
    im = ax.imshow(cond, cmap="viridis", vmin=0, vmax=1)
    if n <= MAX_NUMBERED_CLASSES:
        for r, c in zip(*np.nonzero(~np.isnan(cond)), strict=True):
            colour = "black" if cond[r, c] > 0.6 else "white"  # readable on viridis
            ax.text(
                c, r, f"{100 * cond[r, c]:.0f}", ha="center", va="center", fontsize=6, color=colour
            )
    ax.set_xticks(range(n), names, rotation=90, fontsize=7)
    ax.set_yticks(range(n), names, fontsize=7)
    percent = " (%)" if n <= MAX_NUMBERED_CLASSES else ""
    ax.set_title(f"Label co-occurrence P(column | row){percent}")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def plot_cooccurrence(names: Sequence[str], targets: np.ndarray, path: Path) -> Path:
    """:func:`cooccurrence_figure` written to ``path`` (PNG)."""
    return _save(cooccurrence_figure(names, targets), path)


def threshold_lines(
    names: Sequence[str], scores: np.ndarray, targets: np.ndarray, meta: dict[str, Any]
) -> list[str]:
    """Markdown: the metrics at the stored per-class thresholds, where they came from, and a
    table of each class's threshold with the calibration positives it rests on."""
    from mlic.metrics import multilabel_metrics

    thr = np.asarray(meta["thresholds"], np.float64)  # [C]
    cal = multilabel_metrics(scores, targets, threshold=thr)
    lines = [
        f"At the per-class thresholds `mlic predict` and `serve` use ({describe_stored(meta)}):",
        "",
        metric_table({k: v for k, v in cal.items() if k != "mAP"}),
        "",
    ]
    n_pos = meta.get("threshold_n_pos") or [None] * len(thr)
    fallback = meta.get("threshold_fallback") or [False] * len(thr)
    fell = [n for n, f in zip(names, fallback, strict=False) if f]
    if fell:
        g = meta.get("threshold_global")
        lines += [
            f"Too few calibration positives, so the global threshold {g}: {', '.join(fell)}.",
            "",
        ]
    lines += ["| class | threshold | calibration positives |", "|---|---:|---:|"]
    for name, t, n, f in zip(names, thr, n_pos, fallback, strict=False):
        lines.append(f"| {name} | {t:.3f}{' (global)' if f else ''} | {'-' if n is None else n} |")
    return [*lines, ""]


def write_report(
    out_dir: str | Path,
    title: str,
    names: Sequence[str],
    scores: np.ndarray,
    targets: np.ndarray,
    per_class_ap: np.ndarray,
    history: list[dict[str, Any]] | None = None,
    extra: dict[str, Any] | None = None,
    results: dict[str, float] | None = None,
    sections: Sequence[str] = (),
    thresholds: dict[str, Any] | None = None,
) -> Path:
    """Write ``report.md`` with the metric table and plots into ``out_dir``; returns its path.

    ``thresholds``: the checkpoint's threshold metadata (``thresholds``, ``thresholds_from``
    and, since issue 28, the rule, objective and positives per class). Metrics are shown at
    those per-class thresholds first (what ``predict`` and ``serve`` give users), then at 0.5
    (the papers' convention). ``sections``: further Markdown blocks appended as they are.
    """
    from mlic.metrics import multilabel_metrics

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = results or multilabel_metrics(scores, targets)
    plot_per_class_ap(names, per_class_ap, out / "per_class_ap.png")
    plot_pr_curves(names, scores, targets, per_class_ap, out / "pr_curves.png")
    lines = [f"# {title}", ""]
    for k, v in (extra or {}).items():
        lines.append(f"- **{k}**: {v}")
    lines += [
        "",
        f"Validation set: {len(scores)} images, {len(names)} classes.",
        "",
        "## Metrics (%)",
        "",
    ]
    if thresholds and thresholds.get("thresholds") is not None:
        lines += threshold_lines(names, scores, targets, thresholds)
    lines += ["At threshold 0.5 (the papers' convention):", "", metric_table(results), ""]
    lines += ["Top-3:", "", metric_table(results, TOP3_KEYS), ""]
    if history:
        lines += [
            "## Training history",
            "",
            "| epoch | train loss | mAP | EMA mAP | time (s) |",
            "|---:|---:|---:|---:|---:|",
        ]
        for r in history:
            ema = f"{100 * r['ema_mAP']:.2f}" if "ema_mAP" in r else "-"
            lines.append(
                f"| {r['epoch']} | {r['train_loss']:.4f} | {100 * r['mAP']:.2f} | {ema} | {r['epoch_time_s']:.0f} |"
            )
        lines.append("")
    lines += ["## Per-class AP", "", "![per-class AP](per_class_ap.png)", ""]
    lines += ["## Precision-recall curves", "", "![PR curves](pr_curves.png)", ""]
    lines += list(sections)
    path = out / "report.md"
    write_text(path, "\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------- attention heat maps
def overlay_heatmap(
    image: Any, attention: np.ndarray, alpha: float = 0.5, cmap: str = "jet"
) -> Any:
    """Blend a label's attention map [h, w] (any scale) over a PIL image, as a PIL RGB image.

    The map is min-max normalised, upsampled bilinearly to the image size and coloured.
    """
    from PIL import Image

    a = np.asarray(attention, dtype=np.float64)
    a = (a - a.min()) / max(a.max() - a.min(), 1e-12)
    heat = Image.fromarray((a * 255).astype(np.uint8)).resize(image.size, Image.BILINEAR)
    colours = (matplotlib.colormaps[cmap](np.asarray(heat) / 255.0)[..., :3] * 255).astype(np.uint8)
    return Image.blend(image.convert("RGB"), Image.fromarray(colours), alpha)


def heatmap_grid(
    image: Any, overlays: Sequence[Any], titles: Sequence[str], path: Path, columns: int = 4
) -> Path:
    """One PNG: the original image and every labelled overlay, titled with label and probability."""
    return image_grid([image, *overlays], ["input", *titles], path, columns)


def image_grid(
    panels: Sequence[Any],
    titles: Sequence[str],
    path: Path,
    columns: int = 4,
    side: float = 3.0,
    fontsize: int = 9,
    dpi: int = 100,
) -> Path:
    """One PNG of images (PIL or [H, W, 3] arrays) in rows of ``columns``, each titled; the
    unused panels of the last row left blank."""
    cols = min(columns, len(panels))
    rows = int(np.ceil(len(panels) / cols))
    lines = max(t.count("\n") + 1 for t in titles)  # room for the longest title
    fig, axes = plt.subplots(
        rows, cols, figsize=(side * cols, (side + 0.18 * lines) * rows), squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    for ax, panel, title in zip(axes.flat, panels, titles, strict=False):
        ax.imshow(panel)
        ax.set_title(title, fontsize=fontsize)
    fig.tight_layout()
    _save(fig, path, dpi)
    return path


def _save(fig: Any, path: Path, dpi: int = 110) -> Path:
    """Write ``fig`` to ``path`` (atomically) and free it, also when the write fails."""
    try:
        savefig(fig, path, dpi=dpi)
    finally:
        plt.close(fig)
    return path


# ----------------------------------------------------------------------------- file names
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]


def file_slug(text: str, max_chars: int = 60) -> str:
    """A readable ASCII file-name part for ``text``: accents dropped (``café`` -> ``cafe``),
    anything else outside ``[A-Za-z0-9_.-]`` -> ``_``, at most ``max_chars``; when that
    changed ``text`` at all, ``-`` and a short hash of the exact text follow, so that two
    different texts never get the same slug (``ca fe`` -> ``ca_fe-1a2b3c4d``, ``ca_fe`` stays)."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    slug = _UNSAFE.sub("_", ascii_text).strip("_.")[:max_chars].rstrip("_.")
    if slug == text and slug:
        return slug
    return f"{slug or 'label'}-{_short_hash(text)}"


def label_file_names(names: Sequence[str], reserved: Sequence[str] = ()) -> dict[str, str]:
    """A file-name part per label, distinct even on case-insensitive file systems.

    Each label gets :func:`file_slug`; a slug that another label (or a ``reserved`` part
    such as ``grid``) shares when case is ignored gets the hash suffix as well, so
    ``cafe``/``Cafe``/``café``/``ca fe``/``ca_fe``/``猫``/``犬``/``🐱`` give eight files.
    """
    slugs = {n: file_slug(n) for n in names}
    reserved_lower = {r.lower() for r in reserved}
    taken = [s.lower() for s in slugs.values()] + sorted(reserved_lower)
    out = {}
    for name, slug in slugs.items():
        if taken.count(slug.lower()) > 1 and slug == name:
            slug = f"{slug}-{_short_hash(name)}"
        out[name] = slug
    final = {v.lower() for v in out.values()}
    if len(final) < len(out) or final & reserved_lower:
        # a label spelled exactly like another one's hashed slug: number them all
        out = {n: f"{i:04d}-{v}" for i, (n, v) in enumerate(out.items())}
    return out
