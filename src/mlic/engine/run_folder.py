"""A run's folder and progress: what it starts with, ``metrics.csv``, skipped images, and
what a resume must find unchanged (label set, model, data)."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlic.config import Config, save_config
from mlic.data import Annotations
from mlic.data.labels import LabelSet
from mlic.errors import CheckpointError, ConfigError
from mlic.files import RUN_LOCK, atomic_write, write_text

__all__ = [
    "RunState",
    "check_run_dir_free",
    "prepare_run_dir",
    "run_signature",
    "check_resume_matches",
    "metrics_row",
    "write_metrics_csv",
    "note_skipped",
]

log = logging.getLogger("mlic")


@dataclass
class RunState:
    """A run's progress, saved in every resume point."""

    epoch: int = 0  # epoch in progress
    consumed: int = 0  # global samples consumed in this epoch
    step: int = 0  # optimiser steps done
    best_map: float = -1.0  # val mAP of the kept weights
    best_epoch: int = -1
    best_score: float = -1.0  # what train.select_on compares: val or holdout mAP
    loss_sum: float = 0.0
    loss_count: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # images skipped mid-run (skip_bad_images)

    def __post_init__(self) -> None:
        if self.best_score < 0 <= self.best_map:  # a resume state from before select_on
            self.best_score = self.best_map  # such runs selected on val mAP


def check_run_dir_free(run_dir: Path, overwrite: bool) -> None:
    """Refuse to start a new run in a folder that already holds files (a previous run).

    Called before anything is read or written, so an existing run is never touched by a new
    one: the user resumes it, picks another ``run.name``, or says ``run.overwrite=true``.
    """
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise ConfigError(f"{run_dir}: exists and is not a folder; choose another run.name")
    if not any(p.name != RUN_LOCK for p in run_dir.iterdir()):  # empty but for a lock
        return
    if overwrite:
        if not (run_dir / "config.yaml").exists():  # never empty a folder that is not a run
            raise ConfigError(
                f"{run_dir}: holds files but no config.yaml (not an mlic run); run.overwrite=true "
                "replaces runs only -- choose another run.name or run.output_dir"
            )
        return
    raise ConfigError(
        f"{run_dir}: a run of this name already exists; continue it with "
        f"`mlic train --resume {run_dir}`, choose a new run.name=..., or replace it with "
        "run.overwrite=true"
    )


def prepare_run_dir(
    run_dir: Path, cfg: Config, labels: LabelSet, skipped: list[str], fresh: bool
) -> None:
    """Create (or, for ``run.overwrite=true``, empty) the run folder and write what a run
    starts with: ``config.yaml``, ``labels/``, ``bad_images.txt``. Main process only, and
    only after the config, the data and the model have all been validated."""
    if fresh and cfg.run.overwrite and run_dir.is_dir() and any(run_dir.iterdir()):
        log.warning("%s: replacing the previous run (run.overwrite=true)", run_dir)
        for item in run_dir.iterdir():
            if item.name == RUN_LOCK:  # ours, held for this run
                continue
            if item.is_dir() and not item.is_symlink():
                shutil.rmtree(item)
            else:
                item.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in run_dir.glob(".*.tmp"):  # left by a process killed mid-write
        stale.unlink()
    save_config(cfg, run_dir / "config.yaml")
    labels.save(run_dir / "labels")
    if skipped:
        write_text(run_dir / "bad_images.txt", "\n".join(skipped) + "\n")


def note_skipped(
    loader: Any, state: RunState, at_start: list[str], run_dir: Path, is_main: bool
) -> None:
    """Count the images the loader skipped since the last call (``data.skip_bad_images``):
    kept in the run state (so in the resume point), logged, and listed in ``bad_images.txt``."""
    new = getattr(loader, "skipped", None)
    if not new:
        return
    fresh = [m for m in dict.fromkeys(new) if m not in state.skipped]
    new.clear()
    if not fresh:
        return
    state.skipped += fresh
    if is_main:
        log.warning(
            "skipped %d image(s) that failed to load (data.skip_bad_images=true; %d in this run):"
            "\n  %s",
            len(fresh),
            len(state.skipped),
            "\n  ".join(fresh),
        )
        write_text(run_dir / "bad_images.txt", "\n".join(at_start + state.skipped) + "\n")


def metrics_row(
    epoch: int, loss: float, lr: float, secs: float, res: dict, ema_res: dict | None
) -> dict:
    """One line of ``metrics.csv``: the epoch's training figures, then its val metrics."""
    row: dict[str, Any] = {"epoch": epoch, "train_loss": loss, "lr": lr, "epoch_time_s": secs}
    row.update(res)
    if ema_res is not None:
        row.update({f"ema_{k}": v for k, v in ema_res.items()})
    return row


def write_metrics_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            for r in rows:
                w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})

    atomic_write(path, write)


def _fingerprint(ann: Annotations) -> str:
    """A short hash of a split's image list and targets (what the run trained/validated on)."""
    h = hashlib.sha256()
    for p in ann.images:
        h.update(str(p).encode("utf-8", "surrogateescape") + b"\0")
    h.update(np.ascontiguousarray(ann.targets, dtype=np.int8).tobytes())
    return h.hexdigest()[:16]


def run_signature(
    cfg: Config, labels: LabelSet, train_ann: Annotations | None, val_ann: Annotations | None
) -> dict[str, Any]:
    """What a resume must find unchanged: label set, model, and the data of both splits
    (for streamed sources, ``None`` splits: the label set and model only; the shard index
    and its checksums stand for the data)."""
    signature = {
        "label_names": list(labels.names),
        "model": f"{cfg.model.name}/{cfg.model.backbone}",
        "model_kwargs": json.dumps(dict(cfg.model.kwargs), sort_keys=True, default=str),
    }
    for split, ann in (("train", train_ann), ("val", val_ann)):
        if ann is not None:
            signature[f"{split}_images"] = len(ann)
            signature[f"{split}_data"] = _fingerprint(ann)
    return signature


def _label_diff(saved: list[str], now: list[str]) -> str:
    gone = [n for n in saved if n not in now]
    new = [n for n in now if n not in saved]
    if not gone and not new:
        return "same names in another order"
    return f"no longer present {gone[:10]}, new {new[:10]}"


def check_resume_matches(run_dir: Path, saved: dict[str, Any] | None, now: dict[str, Any]) -> None:
    """Refuse a resume whose label set, model or data differ from what the run saved.

    Resuming on changed data trains silently wrong (a renamed class permutes the label
    columns of the saved weights). ``saved`` is the resume state's signature; resume states
    written before signatures existed are checked against the run's ``labels/labels.json``.
    """
    if saved is None:
        labels_json = run_dir / "labels" / "labels.json"
        if not labels_json.exists():
            return
        from mlic.data import read_json

        saved = {"label_names": list(read_json(labels_json).get("names", []))}
    diffs = []
    if saved.get("label_names") != now["label_names"]:
        diffs.append(
            f"label set: saved {len(saved['label_names'])} classes, now {len(now['label_names'])} "
            f"({_label_diff(saved['label_names'], now['label_names'])})"
        )
    for key, what in (("model", "model"), ("model_kwargs", "model.kwargs")):
        if key in saved and saved[key] != now[key]:
            diffs.append(f"{what}: saved {saved[key]}, now {now[key]}")
    for split in ("train", "val"):
        if f"{split}_data" in saved and saved[f"{split}_data"] != now.get(f"{split}_data"):
            diffs.append(
                f"{split} data: saved {saved[f'{split}_images']} images, now "
                f"{now[f'{split}_images']} (image list or labels changed)"
            )
    if diffs:
        raise CheckpointError(
            f"{run_dir}: cannot resume, the run's inputs changed: "
            + "; ".join(diffs)
            + ". Restore the data the run started with, or start a new run (another run.name)"
        )
