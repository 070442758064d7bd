"""``mlic eval``: a checkpoint (or a run folder) on a dataset split -> metrics.json + report.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from mlic.config import load_config
from mlic.data.dataset import MultiLabelDataset, SeededSampler, build_loader, load_split
from mlic.data.transforms import build_transform
from mlic.engine.checkpoint import load_checkpoint
from mlic.engine.trainer import evaluate, resolve_device
from mlic.errors import ConfigError

__all__ = ["evaluate_checkpoint", "resolve_target"]


def resolve_target(target: str | Path) -> tuple[Path, Path | None]:
    """``(checkpoint, run config or None)`` for a run folder or a checkpoint path."""
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
) -> dict[str, Any]:
    """Evaluate ``target`` on ``split`` of its run's data config (or the ``data.*`` overrides)."""
    ckpt, run_cfg = resolve_target(target)
    cfg = load_config(run_cfg, overrides)
    model, meta = load_checkpoint(ckpt)
    device = resolve_device(cfg.train.device)
    model.to(device)
    names = list(meta["label_names"])
    ann = load_split(cfg.data, split, class_names=names)
    size = int(meta["input_size"][-1])
    tf = build_transform(size, meta["mean"], meta["std"], train=False)
    ds = MultiLabelDataset(ann, tf, draft_size=size)
    loader = build_loader(ds, cfg.data.eval_batch_size or cfg.data.batch_size,
                          SeededSampler(len(ds), shuffle=False, pad=False), cfg.data.workers)  # fmt: skip
    results, per_class, scores, targets = evaluate(model, loader, device, amp=cfg.train.amp,
                                                   progress=cfg.run.progress)  # fmt: skip
    out = Path(output) if output else ckpt.parent / f"eval-{split}"
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "checkpoint": str(ckpt),
        "split": split,
        "num_images": len(ann),
        "metrics": results,
        "per_class_ap": {
            n: (None if np.isnan(a) else float(a)) for n, a in zip(names, per_class, strict=True)
        },
    }
    (out / "metrics.json").write_text(json.dumps(payload, indent=1))
    np.save(out / "scores.npy", scores.astype(np.float32))
    from mlic.viz import write_report

    report = write_report(
        out, title=f"{meta['model']} evaluated on {cfg.data.format} {split}", names=names,
        scores=scores, targets=targets, per_class_ap=per_class, results=results,
        extra={"checkpoint": ckpt, "images": len(ann), "input size": size},
    )  # fmt: skip
    return {"metrics": results, "per_class_ap": per_class, "report": report, "output": out}
