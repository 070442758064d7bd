"""``mlic eval``: a checkpoint (or a run folder) on a dataset split -> metrics.json + report.md."""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from mlic.config import load_config
from mlic.data.dataset import load_split
from mlic.data.sources import STREAM_FORMATS
from mlic.data.transforms import build_transform
from mlic.engine.calibration import threshold_rule
from mlic.engine.checkpoint import load_checkpoint, update_metadata
from mlic.engine.loaders import eval_loader, uint8_batch_to_device
from mlic.engine.precision import resolve_precision
from mlic.engine.trainer import evaluate, resolve_device
from mlic.errors import ConfigError
from mlic.files import RunLock, is_run_folder, refuse_run_file, save_npy, savefig, write_text
from mlic.metrics import multilabel_metrics
from mlic.thresholds import choose_thresholds

__all__ = ["evaluate_checkpoint", "resolve_target"]

log = logging.getLogger("mlic")


def resolve_target(target: str | Path) -> tuple[Path, Path | None]:
    """``(checkpoint, run config or None)`` for a run folder, a checkpoint path or an
    ``hf-hub:ORG/NAME`` repository (its ``model.safetensors`` and ``config.yaml``)."""
    from mlic.hub_files import is_hub_id, resolve_checkpoint, resolve_hub_file

    if is_hub_id(target):
        return resolve_checkpoint(target), resolve_hub_file(str(target), "config.yaml", False)
    t = Path(target)
    if t.is_dir():
        cfg = t / "config.yaml"
        return resolve_checkpoint(t), cfg if cfg.exists() else None
    if not t.exists():
        raise ConfigError(f"{t}: no such run folder or checkpoint")
    run_cfg = t.parent / "config.yaml"
    return t, run_cfg if run_cfg.exists() else None


def _output_folder(
    target: str | Path, ckpt: Path, output: str | Path | None, split: str, hub: bool
) -> Path:
    """Where ``mlic eval`` writes: ``--output``, else beside the checkpoint (a Hub model:
    the current folder, never the Hugging Face cache). A training run's folder as
    ``--output`` gets the eval in its ``eval-<split>/`` subfolder, as by default: the run's
    own ``report.md``, plots and metrics are never replaced."""
    if output is None:
        if hub:  # in the current folder, never inside the Hugging Face cache
            return Path(f"eval-{str(target).rstrip('/').rsplit('/', 1)[-1]}-{split}")
        return ckpt.parent / f"eval-{split}"
    out = Path(output)
    if is_run_folder(out):
        out = out / f"eval-{split}"
        log.info("%s is a training run's folder: the evaluation goes to %s", output, out)
    refuse_run_file(out / "report.md", "--output")  # e.g. RUN/labels, RUN/report.md
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output {output}: exists and is not a folder")
    return out


def evaluate_checkpoint(
    target: str | Path,
    overrides: list[str] | None = None,
    output: str | Path | None = None,
    split: str = "val",
    tune_thresholds: bool = False,
    precision: str = "auto",
) -> dict[str, Any]:
    """Evaluate ``target`` on ``split`` of its run's data config (or the ``data.*`` overrides).

    ``tune_thresholds``: choose per-class thresholds on this split by the config's
    ``thresholds.*`` (rule, objective: overrides such as ``thresholds.objective=precision:0.9``
    apply) and store them in the checkpoint's metadata (``predict``, ``serve``, ``export`` and
    the card then use them).
    ``precision``: ``auto``, ``fp32`` or ``bf16`` (see :mod:`mlic.engine.precision`); the
    choice and its reason are in the returned ``"precision"``.
    """
    from mlic.hub_files import check_downloaded_config, in_hub_cache, is_hub_id

    ckpt, run_cfg = resolve_target(target)
    # from the Hub, by id or by a path into the Hugging Face cache: someone else's files
    hub = is_hub_id(target) or in_hub_cache(ckpt)
    if hub and tune_thresholds:
        raise ConfigError(
            f"{target}: --tune-thresholds writes into the checkpoint; evaluate a local copy"
        )
    cfg = load_config(run_cfg, overrides)
    if hub:  # a downloaded config's data locations are never used
        check_downloaded_config(cfg.data, str(target), overrides)
    out = _output_folder(target, ckpt, output, split, hub)  # before any work
    model, meta = load_checkpoint(ckpt)
    device = resolve_device(cfg.train.device)
    model.to(device)
    loader, images = _split_loader(cfg, split, meta)
    prepare = uint8_batch_to_device(meta["mean"], meta["std"], device, channels_last=False)
    chosen = resolve_precision(precision, device)
    results, per_class, scores, targets = evaluate(
        model, loader, device, amp=chosen, progress=cfg.run.progress, prepare=prepare
    )
    tuned = None
    if tune_thresholds:
        tuned = _tune(ckpt, cfg, split, scores, targets, list(meta["label_names"]))
        meta = {**meta, **tuned}
    thresholds, at_thresholds = _at_thresholds(meta, scores, targets, tuned is not None)
    results = {**results, **at_thresholds}
    out.mkdir(parents=True, exist_ok=True)
    names, size = list(meta["label_names"]), int(meta["input_size"][-1])
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
    sections = _paper_section(meta["model"], cfg, results, size, split, model) + sections
    extra = {
        "checkpoint": ckpt,
        "images": len(scores),
        "input size": size,
        "precision": str(chosen),
    }
    title = f"{meta['model']} evaluated on {cfg.data.format} {split}"
    report = write_report(
        out,
        title=title,
        names=names,
        scores=scores,
        targets=targets,
        per_class_ap=per_class,
        results=results,
        extra=extra,
        sections=sections,
        thresholds=meta if thresholds is not None else None,
    )
    return {
        "metrics": results,
        "per_class_ap": per_class,
        "report": report,
        "output": out,
        "precision": chosen,
    }


def _split_loader(cfg: Any, split: str, meta: dict[str, Any]) -> tuple[Any, list[Path]]:
    """``(loader, image files)`` of ``split`` in the checkpoint's label order, transformed as
    the run evaluated (``data.resize``: warp, then the centre crop); shards and Hugging Face
    sets have no image files to show in the report."""
    names = list(meta["label_names"])
    size = int(meta["input_size"][-1])
    resize = cfg.data.resize
    tf = build_transform(size, meta["mean"], meta["std"], False, normalize=False, resize=resize)
    batch_size = cfg.data.eval_batch_size or cfg.data.batch_size
    if cfg.data.format in STREAM_FORMATS:
        from mlic.data.sources import open_eval_source

        loader, _ = open_eval_source(cfg.data, split, names, tf, size, batch_size, cfg.data.workers)
        return loader, []
    ann = load_split(cfg.data, split, class_names=names)
    return eval_loader(ann, tf, size, batch_size, cfg.data.workers), ann.images  # uint8 batches


def _tune(
    ckpt: Path, cfg: Any, split: str, scores: np.ndarray, targets: np.ndarray, names: list[str]
) -> dict[str, Any]:
    """Thresholds chosen on this split by ``cfg.thresholds``, written into the checkpoint
    (under the run's lock); warns when the split is one the run already chose on."""
    choice = choose_thresholds(scores, targets, **threshold_rule(cfg, names))
    split_name = cfg.data.train if split == "train" else cfg.data.val
    where = f"{cfg.data.format} {split} split '{split_name}' (mlic eval --tune-thresholds)"
    tuned = choice.to_meta(where)
    # a run's checkpoint is changed only while no training run writes that folder
    lock = RunLock(ckpt.parent) if is_run_folder(ckpt.parent) else contextlib.nullcontext()
    with lock:
        update_metadata(ckpt, **tuned)
    log.warning("wrote the new thresholds (rule %s) into %s", choice.describe_rule(), ckpt)
    selected_on = split == "val" and cfg.train.select_on == "val"
    log.warning(
        "the figures at the tuned thresholds are in-sample (chosen on this very split%s): "
        "judge the thresholds on other data",
        ", which the run also selected its weights on" if selected_on else "",
    )
    if choice.unmet.any():
        log.warning(
            "the %s target was not reached on this split for %d class(es): their thresholds "
            "give the closest they can",
            choice.objective,
            int(choice.unmet.sum()),
        )
    fell = int(choice.fallback.sum())
    if fell:
        log.warning(
            "%d class(es) with fewer than %d positives on this split use the global threshold",
            fell,
            cfg.thresholds.min_positives,
        )
    return tuned


def _at_thresholds(
    meta: dict[str, Any], scores: np.ndarray, targets: np.ndarray, tuned: bool
) -> tuple[np.ndarray | None, dict[str, float]]:
    """The stored (or just tuned) thresholds and the metrics at them, keyed ``cal_*`` (chosen
    at training time on other data) or ``tuned_*`` (chosen on this very split)."""
    stored = meta.get("thresholds")
    if stored is None:
        return None, {}
    thresholds = np.asarray(stored, dtype=np.float64)
    at = multilabel_metrics(scores, targets, threshold=thresholds)
    prefix = "tuned" if tuned else "cal"
    return thresholds, {f"{prefix}_{k}": v for k, v in at.items() if k != "mAP"}


def _paper_section(
    name: str, cfg: Any, results: dict[str, Any], size: int, split: str, model: Any
) -> list[str]:
    """The model's published figure beside this evaluation, when it has one on this data."""
    from mlic.config import to_dict
    from mlic.models._comparison import paper_comparison

    split_name = cfg.data.train if split == "train" else cfg.data.val
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    return paper_comparison(name, to_dict(cfg), results, size, split_name, params_m)


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
