"""``mlic data stats``: what a data config holds, as ``stats.md`` and two plots.

Images, classes, label cardinality and density per split, positives per class, the
training split's co-occurrence, and the image check of :func:`mlic.data.check.data_check`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mlic.data import Annotations
from mlic.data.check import CheckReport, data_check
from mlic.files import savefig, write_text

__all__ = ["plot_class_frequency", "write_stats"]


def plot_class_frequency(
    names: Sequence[str], counts: dict[str, np.ndarray], path: Path, max_named: int = 60
) -> Path:
    """Bar chart of positives per class (one series per split), most frequent first.

    With more than ``max_named`` classes, step lines without names on a log axis replace
    the bars (500 VG classes cannot be labelled legibly; stats.md has the table).
    """
    import matplotlib.pyplot as plt

    import mlic.viz  # noqa: F401  (selects the non-interactive backend)

    first = next(iter(counts.values()))
    order = np.argsort(-first, kind="stable")
    n = len(names)
    fig, ax = plt.subplots(figsize=(min(max(6, 0.25 * n + 2), 16), 4))
    width = 0.8 / max(len(counts), 1)
    x = np.arange(n)
    for k, (split, c) in enumerate(counts.items()):
        if n <= max_named:
            ax.bar(x + k * width, np.asarray(c)[order], width=width, label=split)
        else:  # too many bars to draw apart: a step line per split
            ax.plot(x, np.asarray(c)[order], drawstyle="steps-mid", label=split)
    if n <= max_named:
        ax.set_xticks(x + 0.4 - width / 2, [names[i] for i in order], rotation=90, fontsize=7)
    else:
        ax.set_yscale("symlog")
        ax.set_xlabel(f"{n} classes, most frequent (in {next(iter(counts))}) first")
    ax.set_ylabel("images with the class")
    ax.set_title("Class frequency")
    ax.legend(fontsize=8)
    fig.tight_layout()
    savefig(fig, path, dpi=110)
    plt.close(fig)
    return path


def _split_stats(ann: Annotations) -> dict[str, float]:
    pos = ann.targets == 1
    per_image = pos.sum(axis=1)
    return {
        "images": len(ann),
        "cardinality": float(per_image.mean()) if len(ann) else 0.0,
        "max": int(per_image.max()) if len(ann) else 0,
        "no_labels": int((per_image == 0).sum()),
        "ignored": int((ann.targets == -1).sum()),
        "density": float(per_image.mean() / max(ann.num_classes, 1)) if len(ann) else 0.0,
    }


def _overview(
    stats: dict[str, dict[str, float]], names: list[str], report: CheckReport, no_pos: list[str]
) -> list[str]:
    """The table of splits, and the classes without training positives."""
    lines = [
        "| split | images | classes | labels / image | max labels | density | images without labels | ignored entries | broken images |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in stats.items():
        lines.append(
            f"| {name} | {s['images']} | {len(names)} | {s['cardinality']:.3f} | {s['max']} | "
            f"{s['density']:.4f} | {s['no_labels']} | {s['ignored']} | {len(report.problems[name])} |"
        )
    lines += [
        "",
        "Label cardinality is the mean number of positive labels per image; density is it divided by the number of classes.",
    ]
    if no_pos:
        lines += [
            "",
            f"**Classes with no training positives** (left out of mAP): {', '.join(no_pos)}",
        ]
    return lines


def _frequency_section(names: list[str], counts: dict[str, np.ndarray], shown: int) -> list[str]:
    """Positives per class and split, most frequent first, then the co-occurrence plot."""
    lines = ["", "## Class frequency", "", "![class frequency](class_frequency.png)", ""]
    lines += ["| class | " + " | ".join(counts) + " |", "|---|" + "---:|" * len(counts)]
    for i in np.argsort(-counts["train"], kind="stable"):
        lines.append(
            f"| {names[i]} | " + " | ".join(str(int(c[i])) for c in counts.values()) + " |"
        )
    which = "" if shown == len(names) else f" ({shown} most frequent classes)"
    lines += ["", f"## Co-occurrence P(column | row), training split{which}", ""]
    return lines + ["![co-occurrence](cooccurrence.png)", ""]


def _check_section(report: CheckReport, full: bool) -> list[str]:
    """Broken images and annotation warnings per split (the first ten warnings)."""
    kind = "Full decode" if full else "Header-only"
    lines = ["## Check", "", f"{kind} image check, {report.seconds:.1f} s.", ""]
    for name, ann in report.splits.items():
        probs = report.problems[name]
        lines.append(
            f"**{name}** ({ann.source}): {len(probs)} broken image(s), {len(ann.warnings)} annotation warning(s)."
        )
        lines.append("")
        lines += [f"- broken: `{p}`" for p in probs]
        lines += [f"- warning: {w}" for w in ann.warnings[:10]]
        if len(ann.warnings) > 10:
            lines.append(f"- ... and {len(ann.warnings) - 10} more warnings")
        lines.append("")
    return lines


def write_stats(
    cfg: Any,
    output: str | Path,
    full: bool = True,
    workers: int | None = None,
    max_heatmap_classes: int = 40,
) -> tuple[Path, str, CheckReport]:
    """Write ``stats.md``, ``class_frequency.png`` and ``cooccurrence.png`` into ``output``.

    Covers both splits of ``cfg.data``: images, classes, label cardinality (mean positive
    labels per image), per-class frequency, co-occurrence (training split; with more than
    ``max_heatmap_classes`` classes, the most frequent ones) and the check report (broken
    images, annotation warnings). Returns ``(stats.md path, printed summary, check report)``.
    """
    from mlic.viz import plot_cooccurrence

    report = data_check(cfg, full=full, workers=workers)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    train = report.splits["train"]
    names = train.names
    counts = {name: (ann.targets == 1).sum(axis=0) for name, ann in report.splits.items()}
    plot_class_frequency(names, counts, out / "class_frequency.png")
    top = np.sort(np.argsort(-counts["train"], kind="stable")[:max_heatmap_classes])
    plot_cooccurrence([names[i] for i in top], train.targets[:, top], out / "cooccurrence.png")
    stats = {name: _split_stats(ann) for name, ann in report.splits.items()}
    no_pos = [names[i] for i in np.flatnonzero(counts["train"] == 0)]

    lines = [f"# Data statistics: {cfg.data.format} ({cfg.data.root})", ""]
    lines += _overview(stats, names, report, no_pos)
    lines += _frequency_section(names, counts, len(top))
    lines += _check_section(report, full)
    path = out / "stats.md"
    write_text(path, "\n".join(lines) + "\n")

    summary = [
        f"{name}: {s['images']} images, {len(names)} classes, {s['cardinality']:.2f} labels/image, "
        f"{s['no_labels']} without labels, {len(report.problems[name])} broken"
        for name, s in stats.items()
    ]
    if no_pos:
        summary.append(
            f"{len(no_pos)} class(es) with no training positives: {', '.join(no_pos[:10])}"
        )
    summary.append(f"written: {path}, {out / 'class_frequency.png'}, {out / 'cooccurrence.png'}")
    return path, "\n".join(summary), report
