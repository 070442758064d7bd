"""``mlic eval``: a checkpoint (or a run folder) on a dataset split -> metrics.json + report.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from mlic.config import load_config
from mlic.data.dataset import MultiLabelDataset, SeededSampler, build_loader, load_split
from mlic.data.sources import STREAM_FORMATS
from mlic.data.transforms import build_transform
from mlic.engine.checkpoint import load_checkpoint, update_metadata
from mlic.engine.precision import resolve_precision
from mlic.engine.trainer import evaluate, resolve_device, uint8_batch_to_device
from mlic.errors import ConfigError
from mlic.files import save_npy, savefig, write_text
from mlic.metrics import best_f1_thresholds, multilabel_metrics

__all__ = ["evaluate_checkpoint", "resolve_target"]


def resolve_target(target: str | Path) -> tuple[Path, Path | None]:
    """``(checkpoint, run config or None)`` for a run folder, a checkpoint path or an
    ``hf-hub:ORG/NAME`` repository (its ``model.safetensors`` and ``config.yaml``)."""
    from mlic.hub import is_hub_id, resolve_checkpoint, resolve_hub_file

    if is_hub_id(target):
        return resolve_checkpoint(target), resolve_hub_file(str(target), "config.yaml", False)
    t = Path(target)
    if t.is_dir():
        ckpt = t / "best.safetensors"
        if not ckpt.exists():
            raise ConfigError(f"{t}: run folder has no best.safetensors")
        cfg = t / "config.yaml"
        return ckpt, cfg if cfg.exists() else None
    if not t.exists():
        raise ConfigError(f"{t}: no such run folder or checkpoint")
    run_cfg = t.parent / "config.yaml"
    return t, run_cfg if run_cfg.exists() else None


def evaluate_checkpoint(
    target: str | Path,
    overrides: list[str] | None = None,
    output: str | Path | None = None,
    split: str = "val",
    tune_thresholds: bool = False,
    precision: str = "auto",
) -> dict[str, Any]:
    """Evaluate ``target`` on ``split`` of its run's data config (or the ``data.*`` overrides).

    ``tune_thresholds``: choose per-class thresholds maximising each class's F1 on this split
    and store them in the checkpoint's metadata (``mlic predict`` then uses them).
    ``precision``: ``auto``, ``fp32`` or ``bf16`` (see :mod:`mlic.engine.precision`); the
    choice and its reason are in the returned ``"precision"``.
    """
    from mlic.hub import is_hub_id

    hub = is_hub_id(target)
    if hub and tune_thresholds:
        raise ConfigError(
            f"{target}: --tune-thresholds writes into the checkpoint; evaluate a local copy"
        )
    ckpt, run_cfg = resolve_target(target)
    cfg = load_config(run_cfg, overrides)
    model, meta = load_checkpoint(ckpt)
    device = resolve_device(cfg.train.device)
    model.to(device)
    names = list(meta["label_names"])
    size = int(meta["input_size"][-1])
    tf = build_transform(size, meta["mean"], meta["std"], train=False, normalize=False)
    batch_size = cfg.data.eval_batch_size or cfg.data.batch_size
    images: list[Path] = []  # for the report's thumbnails; shards / HF sets have no files
    if cfg.data.format in STREAM_FORMATS:
        from mlic.data.sources import open_eval_source

        loader, _ = open_eval_source(cfg.data, split, names, tf, size, batch_size, cfg.data.workers)
    else:
        ann = load_split(cfg.data, split, class_names=names)
        images = ann.images
        ds = MultiLabelDataset(ann, tf, draft_size=size)  # uint8 batches, normalised on the device
        loader = build_loader(ds, batch_size, SeededSampler(len(ds), shuffle=False, pad=False),
                              cfg.data.workers)  # fmt: skip
    prepare = uint8_batch_to_device(meta["mean"], meta["std"], device, channels_last=False)
    chosen = resolve_precision(precision, device)
    results, per_class, scores, targets = evaluate(model, loader, device, amp=chosen,
                                                   progress=cfg.run.progress, prepare=prepare)  # fmt: skip
    # the checkpoint's calibrated thresholds (chosen at training time on other data), or,
    # with tune_thresholds, new ones tuned on this very split (optimistic on it: meant for a
    # dev split, then used on other data)
    stored = meta.get("thresholds")
    thresholds = None if stored is None else np.asarray(stored, dtype=np.float64)
    thresholds_from = meta.get("thresholds_from")
    if tune_thresholds:
        thresholds = best_f1_thresholds(scores, targets)
        thresholds_from = f"{cfg.data.format}:{split} (mlic eval --tune-thresholds)"
        update_metadata(
            ckpt,
            thresholds=[round(float(t), 6) for t in thresholds],
            thresholds_from=thresholds_from,
        )
        tuned = multilabel_metrics(scores, targets, threshold=thresholds)
        results = {**results, **{f"tuned_{k}": v for k, v in tuned.items() if k != "mAP"}}
    elif thresholds is not None:
        cal = multilabel_metrics(scores, targets, threshold=thresholds)
        results = {**results, **{f"cal_{k}": v for k, v in cal.items() if k != "mAP"}}
    default = (
        Path(f"eval-{str(target).rsplit('/', 1)[-1]}-{split}")
        if hub
        else ckpt.parent / f"eval-{split}"
    )
    out = Path(output) if output else default  # never inside the Hugging Face cache
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "checkpoint": str(ckpt),
        "split": split,
        "num_images": len(scores),
        "precision": str(chosen),
        "metrics": results,
        "per_class_ap": {
            n: (None if np.isnan(a) else float(a)) for n, a in zip(names, per_class, strict=True)
        },
    }
    write_text(out / "metrics.json", json.dumps(payload, indent=1))
    save_npy(out / "scores.npy", scores.astype(np.float32))
    from mlic.viz import write_report

    sections = report_sections(out, names, scores, targets, images, thresholds)
    report = write_report(
        out, title=f"{meta['model']} evaluated on {cfg.data.format} {split}", names=names,
        scores=scores, targets=targets, per_class_ap=per_class, results=results,
        extra={"checkpoint": ckpt, "images": len(scores), "input size": size,
               "precision": str(chosen)}, sections=sections,
        thresholds=thresholds, thresholds_from=thresholds_from,
    )  # fmt: skip
    return {"metrics": results, "per_class_ap": per_class, "report": report, "output": out,
            "precision": chosen}  # fmt: skip


def _thumbnail_strip(items: list[tuple[Path, str]], path: Path, size: int = 160) -> Path | None:
    """A row of labelled thumbnails (image path, caption) saved as one PNG."""
    import matplotlib.pyplot as plt

    from mlic.data.transforms import load_image

    if not items:
        return None
    fig, axes = plt.subplots(1, len(items), figsize=(2.4 * len(items), 2.8), squeeze=False)
    for ax, (img_path, caption) in zip(axes[0], items, strict=True):
        ax.axis("off")
        try:
            img = load_image(img_path, draft_size=size)
            img.thumbnail((size, size))
            ax.imshow(img)
        except Exception:  # a report must not fail on one unreadable thumbnail
            ax.text(0.5, 0.5, "unreadable", ha="center")
        ax.set_title(caption, fontsize=7)
    fig.tight_layout()
    savefig(fig, path, dpi=100)
    plt.close(fig)
    return path


def report_sections(
    out: Path,
    names: list[str],
    scores: np.ndarray,
    targets: np.ndarray,
    images: list[Path],
    thresholds: np.ndarray | None,
    k: int = 6,
) -> list[str]:
    """Extra report blocks: co-occurrence heat map, most confident false positives/negatives."""
    from mlic.viz import plot_cooccurrence

    plot_cooccurrence(names, targets, out / "cooccurrence.png")
    sections = ["## Label co-occurrence (this split)", "", "![co-occurrence](cooccurrence.png)", ""]
    if not images:  # no image files to show (shards, HF datasets)
        return sections
    thr = np.full(len(names), 0.5) if thresholds is None else np.asarray(thresholds)
    fp = np.argwhere((targets == 0) & (scores >= thr))  # [n, 2] (image, class)
    fn = np.argwhere((targets == 1) & (scores < thr))
    fp = fp[np.argsort(-scores[fp[:, 0], fp[:, 1]])][:k] if len(fp) else fp
    fn = fn[np.argsort(scores[fn[:, 0], fn[:, 1]])][:k] if len(fn) else fn
    for title, rows, fname in (
        ("Most confident false positives", fp, "false_positives.png"),
        ("Most confident false negatives", fn, "false_negatives.png"),
    ):
        items = [
            (images[i], f"{names[c]} p={scores[i, c]:.2f}\n{Path(images[i]).name}") for i, c in rows
        ]
        sections += [f"## {title}", ""]
        if _thumbnail_strip(items, out / fname) is None:
            sections += ["None at this threshold.", ""]
        else:
            sections += [f"![{title}]({fname})", ""]
    return sections
