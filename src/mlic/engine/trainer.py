"""The training loop: one flat, readable function per phase.

``train(cfg)`` builds data, model, optimiser, schedule and EMA from a :class:`~mlic.config.Config`,
trains with gradient accumulation and autocast, evaluates the model and its EMA every
epoch, and writes ``runs/<name>/``: ``config.yaml``, ``metrics.csv``, TensorBoard events,
``best.safetensors``, ``last.resume.pt`` and ``report.md``. Resume state is written at
every epoch end and when SIGINT/SIGTERM arrive, so a killed run continues with
``--resume`` and reaches the same result (bit-identical on CPU).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import os
import random
import shutil
import signal
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from timm.utils import ModelEmaV3
from tqdm import tqdm

from mlic.config import Config, check_resume_overrides, load_config, save_config
from mlic.data import Annotations
from mlic.data.dataset import (
    MultiLabelDataset,
    SeededSampler,
    build_loader,
    decode_batch,
    load_split,
)
from mlic.data.labels import LabelSet
from mlic.data.sources import (
    STREAM_FORMATS,
    build_source_loaders,
    open_sources,
    stream_signature,
)
from mlic.data.transforms import ToNormalizedFloat, config_transforms
from mlic.engine import distributed as dist_utils
from mlic.engine.calibration import calibrated_metrics, split_calibration, stream_calibration
from mlic.engine.checkpoint import (
    load_resume,
    load_state_strict,
    read_metadata,
    save_checkpoint,
    save_resume,
    unwrap_model,
)
from mlic.engine.precision import Precision, resolve_precision
from mlic.engine.precision import autocast as precision_autocast
from mlic.errors import CheckpointError, ConfigError, DataError, MlicError
from mlic.faults import maybe_kill
from mlic.files import RUN_LOCK, RunLock, atomic_write, save_npy, write_text
from mlic.host import retain_freed_memory
from mlic.losses import loss_from_config
from mlic.metrics import MultiLabelMetrics, average_precision_per_class, multilabel_metrics
from mlic.models._registry import create_model

__all__ = ["train", "evaluate", "resolve_device", "autocast_context", "TrainingStopped"]

log = logging.getLogger("mlic")


class TrainingStopped(MlicError):
    """Training stopped early (signal or non-finite loss); a resume point was kept."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class EvalInterrupted(Exception):
    """A stop signal arrived during evaluation."""


# ----------------------------------------------------------------------------- setup
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):  # "tpu", "gpu0": one line, not torch's traceback
        raise ConfigError(
            f"train.device={name!r} is not a device (auto, cpu, cuda, cuda:N)"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but no CUDA device is available")
    return dev


def uint8_batch_to_device(
    mean: Sequence[float], std: Sequence[float], device: torch.device, channels_last: bool
) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 loader batch [B, 3, S, S] -> normalised float batch on ``device``.

    The copy to the device moves uint8 (4x fewer bytes than float32), the layout change
    happens on uint8 too, and the conversion + normalisation is one pass there, with exactly
    the arithmetic of the per-sample :class:`~mlic.data.transforms.ToNormalizedFloat`.
    """
    normalize = ToNormalizedFloat(mean, std).to(device)

    def prepare(batch: torch.Tensor) -> torch.Tensor:
        x = batch.to(device, non_blocking=True)  # [B, 3, S, S] uint8
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return normalize(x)  # [B, 3, S, S] float32, same memory format

    return prepare


def autocast_context(device: torch.device, amp: str | Precision):
    """``torch.autocast`` per ``train.amp`` (a setting, resolved here, or a resolved
    :class:`~mlic.engine.precision.Precision`): see :mod:`mlic.engine.precision` for what
    ``auto`` chooses on which device."""
    if isinstance(amp, str):
        amp = resolve_precision(amp, device)
    return precision_autocast(device, amp)


def batchnorm_layers(module: nn.Module) -> list[nn.Module]:
    """Every BatchNorm layer (any dimension, SyncBatchNorm included) inside ``module``."""
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def freeze_bn_stats(module: nn.Module) -> None:
    """Put every BatchNorm layer of ``module`` in eval mode.

    In eval mode a BatchNorm normalises with its running statistics and leaves them as they
    are, while its affine scale and shift keep their gradients. Called after ``.train()``
    (which would switch them back) at the start of each epoch.
    """
    for layer in batchnorm_layers(module):
        layer.eval()


def drop_grads(module: nn.Module) -> None:
    """Forget the gradients of ``module``'s parameters, so the optimiser leaves them as they are.

    ``grad=None`` (not zero): AdamW and SGD skip such a parameter entirely (no step, no weight
    decay, no moment update). Used for the head warm-up (``train.head_warmup_epochs``); under
    DDP the gradients were still computed and reduced, which keeps every rank's reducer happy.
    """
    for p in module.parameters():
        p.grad = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
        "python": [int(x) for x in random.getstate()[1]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(
        ("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0)
    )
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def build_labels(train_ann: Annotations | LabelSet, word_vectors: str) -> LabelSet:
    """LabelSet of the training split, with word vectors when they can be had.

    ``glove``: the shipped VOC/COCO vectors matched by name; classes they do not cover fall
    back to learnable embeddings (a warning says which). A ``.npy`` path must match.
    """
    if isinstance(train_ann, LabelSet):  # shards / HF datasets: statistics from their index
        labels = train_ann
    else:
        labels = LabelSet.from_targets(train_ann.names, train_ann.targets)
    if word_vectors == "glove":
        try:
            labels.with_word_vectors("glove")
        except DataError as e:
            log.warning("%s -- models with label embeddings will learn them instead", e)
    else:
        labels.with_word_vectors(word_vectors)
    return labels


def build_optimizer(model: nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    o = cfg.optim
    if hasattr(model, "param_groups"):
        groups = model.param_groups(o.lr, o.backbone_lr_mult, o.weight_decay, o.decay_norm_and_bias)
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    # the fused kernels (CUDA, and CPU since torch 2.4): one vectorised pass over each
    # parameter instead of ~10 elementwise ops; AdamW measured 9.6x faster on the CPU of
    # benchmarks/BENCHMARKS.md section 10 (103 M parameters: 43 vs 414 ms per step), the
    # same update to 6e-8 (tested); the state dict is the same, so runs resume across them
    fused = device.type in ("cuda", "cpu")
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay, fused=fused)
    return torch.optim.SGD(
        groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.nesterov,
        fused=fused,
    )  # fmt: skip


def build_ema(model: nn.Module, cfg: Config) -> ModelEmaV3:
    """The EMA of ``model``'s weights, with timm's warm-up unless ``train.ema_warmup`` is false.

    With warm-up the decay at optimiser step t is ``min(ema_decay, 1 - (1 + t)^-power)``:
    a fixed 0.9997 over a 3k-step run would leave ~40 % of the step-1 weights in the
    average; with power 0.75 the decay is 0.97 at step 100 and 0.995 at step 1,000, and the
    average of any run is dominated by its recent weights.
    """
    return ModelEmaV3(
        model,
        decay=cfg.train.ema_decay,
        use_warmup=cfg.train.ema_warmup,
        warmup_power=cfg.train.ema_warmup_power,
    )


def build_scheduler(opt: torch.optim.Optimizer, cfg: Config, steps_per_epoch: int):
    """Per-optimiser-step schedule: linear warm-up then cosine, one-cycle, or constant."""
    s = cfg.schedule
    total = max(1, cfg.train.epochs * steps_per_epoch)
    warm = min(int(s.warmup_epochs * steps_per_epoch), total - 1)
    if s.name == "onecycle":
        max_lr = [g["lr"] for g in opt.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=max_lr, total_steps=total, pct_start=s.pct_start
        )
    if s.name == "constant":
        main = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)
    else:
        eta = [g["lr"] * s.min_lr_ratio for g in opt.param_groups]
        main = torch.optim.lr_scheduler.CosineAnnealingLR(
            opt, T_max=max(1, total - warm), eta_min=min(eta)
        )
    if warm <= 0:
        return main
    warmup = torch.optim.lr_scheduler.LinearLR(
        opt, start_factor=0.01, end_factor=1.0, total_iters=warm
    )
    return torch.optim.lr_scheduler.SequentialLR(opt, [warmup, main], milestones=[warm])


# ----------------------------------------------------------------------------- evaluation
@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: torch.utils.data.DataLoader,
    device: torch.device,
    amp: str | Precision = "off",
    channels_last: bool = False,
    progress: bool = False,
    should_stop: Callable[[], bool] | None = None,
    prepare: Callable[[Any], torch.Tensor] | None = None,
) -> tuple[dict[str, float], np.ndarray, np.ndarray, np.ndarray]:
    """Metrics over the whole loader (synced across ranks): ``(metrics, per-class AP, scores, targets)``.

    ``should_stop`` is polled between batches; when it returns True, :class:`EvalInterrupted`
    is raised so the caller can save a resume point. ``prepare`` turns what the loader yields
    into a device batch (GPU-side JPEG decoding); default: move the tensor to ``device``.
    """
    model.eval()
    metric = MultiLabelMetrics().to(device)
    for images, targets in tqdm(loader, desc="eval", leave=False, disable=not progress):
        if should_stop is not None and should_stop():
            raise EvalInterrupted
        if len(targets) == 0:  # every image of the batch was skipped (data.skip_bad_images)
            continue
        images = prepare(images) if prepare is not None else images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast_context(device, amp):
            logits = model(images)
        metric.update(torch.sigmoid(logits.float()), targets.to(device, non_blocking=True))
    scores, targets = metric.gathered()  # one sync across ranks
    return (
        multilabel_metrics(scores, targets),
        average_precision_per_class(scores, targets),
        scores,
        targets,
    )


# ----------------------------------------------------------------------------- run state
@dataclass
class _RunState:
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


class _StopFlag:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: no handler
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:  # a second signal: stop now, without a resume point
            raise KeyboardInterrupt
        self.signal = signum
        log.warning(
            "signal %d: saving a resume point at the next step (send again to abort)", signum
        )

    def __call__(self) -> bool:
        return self.signal is not None

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _metrics_row(
    epoch: int, loss: float, lr: float, secs: float, res: dict, ema_res: dict | None
) -> dict:
    row: dict[str, Any] = {"epoch": epoch, "train_loss": loss, "lr": lr, "epoch_time_s": secs}
    row.update({k: v for k, v in res.items()})
    if ema_res is not None:
        row.update({f"ema_{k}": v for k, v in ema_res.items()})
    return row


def _write_metrics_csv(path: Path, rows: list[dict[str, Any]]) -> None:
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


# ----------------------------------------------------------------------------- run folder
def _note_skipped(
    loader: Any, state: _RunState, at_start: list[str], run_dir: Path, is_main: bool
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
            "\n  %s", len(fresh), len(state.skipped), "\n  ".join(fresh),
        )  # fmt: skip
        write_text(run_dir / "bad_images.txt", "\n".join(at_start + state.skipped) + "\n")


def _check_run_dir_free(run_dir: Path, overwrite: bool) -> None:
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


def _prepare_run_dir(
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


def _require_images(splits: dict[str, Annotations], max_steps: int | None) -> None:
    """A run needs at least one training and one validation image (and a step per epoch)."""
    for name, ann in splits.items():
        if len(ann) == 0:
            raise DataError(
                f"{name} split ({ann.source or 'data config'}): no images to "
                f"{'train on' if name == 'train' else 'validate on'}; check data.{name} and "
                f"data.max_{name}_images"
            )
    if max_steps is not None and max_steps < 1:
        raise ConfigError(f"train.max_steps_per_epoch={max_steps} must be >= 1 (or unset)")


def _fingerprint(ann: Annotations) -> str:
    """A short hash of a split's image list and targets (what the run trained/validated on)."""
    h = hashlib.sha256()
    for p in ann.images:
        h.update(str(p).encode("utf-8", "surrogateescape") + b"\0")
    h.update(np.ascontiguousarray(ann.targets, dtype=np.int8).tobytes())
    return h.hexdigest()[:16]


def _run_signature(
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


def _check_resume_matches(run_dir: Path, saved: dict[str, Any] | None, now: dict[str, Any]) -> None:
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


@dataclass
class _Candidate:
    """One set of weights (the model or its EMA) evaluated at an epoch end."""

    name: str
    module: nn.Module
    results: dict[str, float]  # val metrics at 0.5, plus cal_* at the calibrated thresholds
    scores: np.ndarray  # [N, C] val probabilities
    targets: np.ndarray  # [N, C] val targets
    thresholds: np.ndarray | None  # [C] calibrated thresholds, None without calibration


def _evaluate_candidate(
    name: str,
    module: nn.Module,
    val_loader: torch.utils.data.DataLoader,
    calib_loader: torch.utils.data.DataLoader | None,
    calibration_mode: str,
    ev: dict[str, Any],
) -> _Candidate:
    """Validation metrics of ``module`` and, unless calibration is off, thresholds tuned on
    the calibration data (held-out training images, or the val split itself in ``val``
    mode) with the val metrics at those thresholds (``cal_*``)."""
    res, _, scores, targets = evaluate(module, val_loader, **ev)
    thresholds = None
    if calibration_mode == "val":
        thresholds, cal = calibrated_metrics(scores, targets, scores, targets)
        res = {**res, **cal}
    elif calib_loader is not None:
        _, _, calib_scores, calib_targets = evaluate(module, calib_loader, **ev)
        thresholds, cal = calibrated_metrics(calib_scores, calib_targets, scores, targets)
        # the held-out training images' mAP: what train.select_on=holdout selects on
        held = float(multilabel_metrics(calib_scores, calib_targets)["mAP"])
        res = {**res, **cal, "holdout_mAP": held}
    return _Candidate(name, module, res, scores, targets, thresholds)


# ----------------------------------------------------------------------------- main loop
def train(
    cfg: Config | None,
    resume: str | Path | None = None,
    stop_after_steps: int | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Train per ``cfg``; returns ``{"best_mAP", "best_epoch", "run_dir", "history"}``.

    ``resume``: a run folder (or its ``last.resume.pt``) to continue with the run's saved
    config (``cfg`` may then be None); ``overrides``: ``key=value`` changes to that config,
    only keys in :data:`mlic.config.RESUME_OVERRIDES` (``train.epochs=5`` extends the run),
    any other refused by name. ``stop_after_steps`` simulates an interruption after that
    many optimiser steps (tests).

    The run folder is locked (:class:`mlic.files.RunLock`) for the whole run: a second
    process training or resuming the same folder fails at once.
    """
    if resume is not None:
        rpath = Path(resume)
        if not rpath.exists():
            raise ConfigError(f"{rpath}: no such run folder or resume state to resume")
        run_dir = rpath if rpath.is_dir() else rpath.parent
    elif cfg is None:
        raise ConfigError("train() needs a config or a resume folder")
    else:
        run_dir = Path(cfg.run.output_dir) / cfg.run.name
    # rank 0 holds the lock for a distributed run (the others write nothing there)
    main_rank = int(os.environ.get("RANK", "0")) == 0
    with RunLock(run_dir) if main_rank else contextlib.nullcontext():
        if resume is None:  # before anything is read or written
            _check_run_dir_free(run_dir, cfg.run.overwrite)  # type: ignore[union-attr]
        return _train_locked(cfg, run_dir, resume, stop_after_steps, overrides)


def _load_resume_point(
    run_dir: Path, rpath: Path, overrides: list[str] | None
) -> tuple[Config, dict[str, Any] | None, bool]:
    """The run's saved config with the allowed ``overrides``, its resume state (None when
    the run was killed before its first resume point) and whether ``train.epochs`` changed."""
    saved = load_config(run_dir / "config.yaml")
    cfg = load_config(run_dir / "config.yaml", overrides) if overrides else saved
    check_resume_overrides(overrides or [], run_dir)
    if not rpath.exists():  # killed before its first resume point: start again
        log.warning("%s: no resume state yet; starting the run from the beginning", run_dir)
        return cfg, None, False
    resume_state = load_resume(rpath)
    run = resume_state.get("run") if isinstance(resume_state, dict) else None
    if not isinstance(run, dict):
        raise CheckpointError(
            f"{rpath}: resume state has no run progress; not an mlic resume state"
        )
    epoch, consumed = int(run.get("epoch", 0)), int(run.get("consumed", 0))
    needed = epoch + (1 if consumed else 0)  # epochs the run has trained in, whole or part
    if cfg.train.epochs < needed:
        raise ConfigError(
            f"train.epochs={cfg.train.epochs}: the run in {run_dir} has already trained "
            f"{needed} epoch(s); give train.epochs >= {needed}"
        )
    return cfg, resume_state, cfg.train.epochs != saved.train.epochs


def _extended_schedule(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    cfg: Config,
    device: torch.device,
    steps_per_epoch: int,
    step: int,
) -> Any:
    """The LR schedule of a run whose ``train.epochs`` changed on resume: built for the new
    length and advanced to ``step``, as if the run had been set up so from the start (the
    rate may jump at the resume point; the steps already taken stay as they were)."""
    base = [g["lr"] for g in build_optimizer(model, cfg, device).param_groups]  # configured
    for group, lr in zip(optimizer.param_groups, base, strict=True):
        group["lr"] = lr
        for key in ("initial_lr", "max_lr", "min_lr"):  # set again by the new schedule
            group.pop(key, None)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": no training
        warnings.simplefilter("ignore")
        for _ in range(step):
            scheduler.step()
    return scheduler


def _train_locked(
    cfg: Config | None,
    run_dir: Path,
    resume: str | Path | None,
    stop_after_steps: int | None,
    overrides: list[str] | None,
) -> dict[str, Any]:
    """:func:`train` once the run folder is locked."""
    resume_state = None
    extend = False  # train.epochs changed on resume
    if resume is not None:
        rpath = Path(resume)
        rpath = rpath / "last.resume.pt" if rpath.is_dir() else rpath
        cfg, resume_state, extend = _load_resume_point(run_dir, rpath, overrides)
    assert cfg is not None

    device = resolve_device(cfg.train.device)
    dist = dist_utils.init_distributed(device)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if cfg.train.retain_freed_memory:
        retain_freed_memory()
    seed_everything(cfg.train.seed)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not dist.is_main:  # only rank 0 logs progress
        log.setLevel(logging.WARNING)

    # --- data
    sources = None
    skipped_at_start: list[str] = []  # written to the run folder once everything is valid
    if cfg.data.format in STREAM_FORMATS:  # shards / HF datasets: statistics from their index
        sources = open_sources(cfg.data)
        labels = build_labels(sources[0].label_set(), cfg.model.word_vectors)
        calibration = stream_calibration(cfg.data.calibration)
        signature = _run_signature(cfg, labels, None, None)
        signature.update(stream_signature(*sources))  # re-packed/relabelled data: no resume
    else:
        train_ann = load_split(cfg.data, "train")
        val_ann = load_split(cfg.data, "val", class_names=train_ann.names)
        # log annotation warnings; check images (data.image_check); stop, or skip and list them
        from mlic.data.check import screen_splits

        _require_images({"train": train_ann, "val": val_ann}, cfg.train.max_steps_per_epoch)
        checked = screen_splits({"train": train_ann, "val": val_ann}, cfg.data, None,
                                dist.is_main, skipped=skipped_at_start)  # fmt: skip
        train_ann, val_ann = checked["train"], checked["val"]
        whole_train = train_ann  # the split as the user gave it, for the resume check
        train_ann, calibration = split_calibration(
            train_ann, cfg.data.calibration, cfg.data.calibration_fraction, cfg.train.seed
        )
        labels = build_labels(train_ann, cfg.model.word_vectors)
        signature = _run_signature(cfg, labels, whole_train, val_ann)
    if cfg.train.select_on == "holdout" and calibration.holdout is None:
        raise ConfigError(
            f"train.select_on=holdout needs held-out training images; data.format="
            f"{cfg.data.format} streams its splits and cannot hold images out"
        )
    log.info("decision thresholds calibrated on %s", calibration.source)
    precision = resolve_precision(cfg.train.amp, device)
    log.info("precision: %s", precision)
    if resume_state is not None:
        _check_resume_matches(run_dir, resume_state.get("signature"), signature)
    no_pos = [n for n, c in zip(labels.names, labels.counts, strict=True) if c == 0]
    if no_pos:
        log.warning("classes with no training positives (left out of mAP): %s", no_pos)

    # --- model
    kwargs = dict(cfg.model.kwargs)
    kwargs["backbone"] = cfg.model.backbone
    kwargs["pretrained"] = cfg.model.pretrained_file or cfg.model.pretrained
    if resume_state is not None:
        kwargs["pretrained"] = False  # weights come from the resume state
    if cfg.model.drop_path_rate > 0:
        kwargs["drop_path_rate"] = cfg.model.drop_path_rate
    model = create_model(cfg.model.name, len(labels.names), labels=labels, **kwargs)
    if cfg.optim.backbone_lr_mult == 0:
        # a frozen backbone (linear probing): no gradient is computed for it at all, which
        # skips its backward pass (for a CNN about twice its forward), and the optimiser
        # holds no state for it; its BatchNorm statistics follow train.freeze_bn_stats
        model.backbone.requires_grad_(False)
        log.info("backbone frozen (optim.backbone_lr_mult=0): only the head trains")
    if cfg.train.freeze_bn_stats:
        n_bn = len(batchnorm_layers(model.backbone))  # frozen at each epoch's start
        log.info("backbone BatchNorm statistics frozen (%d layers; scale and shift train)", n_bn)
    if cfg.train.head_warmup_epochs:
        log.info("head warm-up: the backbone stays as pretrained for the first %d epoch(s)",
                 cfg.train.head_warmup_epochs)  # fmt: skip
    model.to(device)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    dcfg = model.default_cfg
    size = cfg.data.image_size or dcfg["input_size"][-1]

    # --- loaders
    d = cfg.data
    # uint8 batches from the workers (4x fewer bytes), normalised on the training device
    train_tf, eval_tf = config_transforms(d, size, dcfg["mean"], dcfg["std"])
    raw = d.gpu_decode  # encoded files to the device, decoded there a batch at a time
    skip = d.skip_bad_images  # a file that breaks mid-run is skipped and counted, not fatal
    norm = (dcfg["mean"], dcfg["std"])
    if raw:
        train_prepare = lambda b: decode_batch(b, size, *norm, device, hflip=d.hflip)  # noqa: E731
        eval_prepare = lambda b: decode_batch(b, size, *norm, device)  # noqa: E731
    else:
        train_prepare = eval_prepare = uint8_batch_to_device(*norm, device, cfg.train.channels_last)
    pin = device.type == "cuda" and not raw  # encoded batches keep their file names unpinned
    calib_loader = None
    if sources is not None:  # len(train_ds) global samples/epoch; train_sampler.set_epoch()
        train_ds, train_sampler, train_loader, val_loader = build_source_loaders(
            *sources, d, train_tf, eval_tf, size, cfg.train.seed, dist.world_size, dist.rank,
            pin, run_dir,
        )  # fmt: skip
    else:
        train_ds = MultiLabelDataset(train_ann, train_tf, draft_size=size, raw_bytes=raw,
                                     skip_bad=skip)  # fmt: skip
        val_ds = MultiLabelDataset(val_ann, eval_tf, draft_size=size, raw_bytes=raw, skip_bad=skip)
        train_sampler = SeededSampler(
            len(train_ds), True, cfg.train.seed, dist.world_size, dist.rank, pad=True
        )
        val_sampler = SeededSampler(
            len(val_ds), False, cfg.train.seed, dist.world_size, dist.rank, pad=False
        )
        train_loader = build_loader(
            train_ds, d.batch_size, train_sampler, d.workers, drop_last=False, pin_memory=pin
        )
        val_loader = build_loader(
            val_ds, d.eval_batch_size or d.batch_size, val_sampler, d.workers, pin_memory=pin
        )
        if calibration.holdout is not None:
            calib_ds = MultiLabelDataset(
                calibration.holdout, eval_tf, draft_size=size, raw_bytes=raw, skip_bad=skip
            )
            calib_sampler = SeededSampler(
                len(calib_ds), False, cfg.train.seed, dist.world_size, dist.rank, pad=False
            )
            calib_loader = build_loader(
                calib_ds, d.eval_batch_size or d.batch_size, calib_sampler, 0, pin_memory=pin
            )
    per_rank = math.ceil(len(train_ds) / dist.world_size)  # the padded sampler's share
    batches_per_epoch = math.ceil(per_rank / d.batch_size)
    if per_rank % d.batch_size == 1 and batches_per_epoch > 1:
        batches_per_epoch -= 1  # a last batch of one image: BatchNorm cannot train on it
    if cfg.train.max_steps_per_epoch:
        batches_per_epoch = min(
            batches_per_epoch, cfg.train.max_steps_per_epoch * cfg.train.accum_steps
        )
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.train.accum_steps)

    # --- optimisation
    criterion = loss_from_config(cfg.loss)
    optimizer = build_optimizer(model, cfg, device)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.dtype == torch.float16)
    ema = build_ema(model, cfg) if cfg.train.ema else None
    state = _RunState()

    if resume_state is not None:
        load_state_strict(model, resume_state["model"], "resume state")
        optimizer.load_state_dict(resume_state["optimizer"])
        if extend:  # train.epochs changed: the schedule follows the new length
            done_steps = int(resume_state["run"].get("step", 0))
            scheduler = _extended_schedule(
                model, optimizer, cfg, device, steps_per_epoch, done_steps
            )
        else:
            scheduler.load_state_dict(resume_state["scheduler"])
        scaler.load_state_dict(resume_state["scaler"])
        if ema is not None:
            load_state_strict(ema.module, resume_state["ema"], "resume state (EMA)")
        s = resume_state["run"]
        state = _RunState(**{k: s[k] for k in _RunState.__dataclass_fields__ if k in s})
        _set_rng_state(resume_state["rng"])
        log.info(
            "resumed %s at epoch %d, %d samples in, step %d",
            run_dir,
            state.epoch,
            state.consumed,
            state.step,
        )

    batch_hook = getattr(model, "on_train_batch_end", None)
    compiled = torch.compile(model) if cfg.train.compile else model
    train_model: nn.Module = compiled
    if dist.enabled:
        train_model = torch.nn.parallel.DistributedDataParallel(
            compiled, device_ids=[dist.local_rank] if device.type == "cuda" else None
        )

    writer = None
    if dist.is_main:
        skipped_now = skipped_at_start + (state.skipped if resume_state is not None else [])
        _prepare_run_dir(run_dir, cfg, labels, skipped_now, fresh=resume_state is None)
        if cfg.run.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(run_dir / "tb"))

    def resume_payload() -> dict[str, Any]:
        return {
            "model": unwrap_model(model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "ema": ema.module.state_dict() if ema is not None else {},
            "rng": _rng_state(),
            "run": dict(state.__dict__),
            "signature": signature,
        }

    def checkpoint_meta(results: dict[str, float], source: str) -> dict[str, Any]:
        return {
            "input_size": [3, size, size],
            "mean": list(dcfg["mean"]),
            "std": list(dcfg["std"]),
            "metrics": {k: float(v) for k, v in results.items()},
            "epoch": state.epoch,
            "weights": source,
            "dataset": cfg.data.format,
            "selected_on": cfg.train.select_on,
            # predict, serve and export warp and crop as the run evaluated (SSGRL's protocol)
            **({"resize": cfg.data.resize} if cfg.data.resize is not None else {}),
        }

    global_batch = d.batch_size * dist.world_size
    with _StopFlag() as stop:
        while state.epoch < cfg.train.epochs:
            epoch = state.epoch
            t0 = time.perf_counter()
            train_sampler.set_epoch(epoch, state.consumed)
            train_model.train()
            head_only = epoch < cfg.train.head_warmup_epochs  # the backbone stays as it is
            if cfg.train.freeze_bn_stats or head_only:
                freeze_bn_stats(model.backbone)
            loss_acc = torch.zeros((), device=device, dtype=torch.float64)
            n_acc = 0
            done_batches = state.consumed // global_batch
            bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", leave=False,
                       disable=not (cfg.run.progress and dist.is_main), initial=done_batches,
                       total=batches_per_epoch)  # fmt: skip
            for images, targets in bar:
                if done_batches >= batches_per_epoch:
                    break
                _note_skipped(train_loader, state, skipped_at_start, run_dir, dist.is_main)
                # a batch whose every image was skipped gets no step, nor one left with a
                # single image (BatchNorm cannot train on it) unless batches are of one
                if len(targets) > 1 or (len(targets) == 1 and d.batch_size == 1):
                    images = train_prepare(images)  # [B, 3, S, S] float on the device
                    targets = targets.to(device, non_blocking=True)
                    if cfg.train.channels_last:
                        images = images.contiguous(memory_format=torch.channels_last)
                    with autocast_context(device, precision):
                        logits = train_model(images)
                    loss = criterion(logits.float(), targets)
                    scaler.scale(loss / cfg.train.accum_steps).backward()
                    loss_acc += loss.detach()
                    if batch_hook is not None:  # e.g. AAMN's categorical memory update
                        batch_hook(targets)
                    n_acc += 1
                done_batches += 1
                state.consumed += global_batch
                if done_batches % cfg.train.accum_steps == 0 or done_batches == batches_per_epoch:
                    if head_only:
                        drop_grads(model.backbone)
                    if cfg.optim.grad_clip:
                        scaler.unscale_(optimizer)
                        nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    scheduler.step()
                    if ema is not None:
                        ema.update(unwrap_model(model), step=state.step)
                    state.step += 1
                    maybe_kill("kill_at_step", state.step)
                    # one host sync every 20 steps: progress + non-finite check
                    if state.step % 20 == 0 or done_batches == batches_per_epoch:
                        running = float(loss_acc) / max(n_acc, 1)
                        if not math.isfinite(running):
                            raise TrainingStopped(
                                f"non-finite training loss at epoch {epoch + 1}, step {state.step}; "
                                f"last good checkpoint kept in {run_dir}",
                                exit_code=3,
                            )
                        bar.set_postfix(
                            loss=f"{running:.4f}", lr=f"{optimizer.param_groups[-1]['lr']:.2e}"
                        )
                    stopping = stop.signal is not None or (
                        stop_after_steps is not None and state.step >= stop_after_steps
                    )
                    if stopping:
                        state.loss_sum += float(loss_acc)
                        state.loss_count += n_acc
                        if dist.is_main:
                            save_resume(resume_payload(), run_dir / "last.resume.pt")
                        bar.close()
                        code = 128 + stop.signal if stop.signal else 1
                        raise TrainingStopped(
                            f"stopped at epoch {epoch + 1}, step {state.step}; resume with "
                            f"`mlic train --resume {run_dir}`",
                            exit_code=code,
                        )
            bar.close()
            state.loss_sum += float(loss_acc)
            state.loss_count += n_acc
            train_loss = state.loss_sum / max(state.loss_count, 1)
            if not math.isfinite(train_loss):
                raise TrainingStopped(
                    f"non-finite training loss in epoch {epoch + 1}; last good checkpoint kept", 3
                )
            train_time = time.perf_counter() - t0

            if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs:
                ev = dict(
                    device=device,
                    amp=precision,
                    channels_last=cfg.train.channels_last,
                    should_stop=stop,
                    prepare=eval_prepare,
                )
                dist_utils.broadcast_buffers(unwrap_model(model))
                if ema is not None:
                    dist_utils.broadcast_buffers(ema.module)
                try:
                    candidates = [_evaluate_candidate("model", unwrap_model(model), val_loader,
                                                      calib_loader, calibration.mode, ev)]  # fmt: skip
                    if ema is not None:
                        candidates.append(_evaluate_candidate("ema", ema.module, val_loader,
                                                              calib_loader, calibration.mode, ev))  # fmt: skip
                    for loader in (val_loader, calib_loader):
                        _note_skipped(loader, state, skipped_at_start, run_dir, dist.is_main)
                except EvalInterrupted:
                    # The epoch's training is done and counted in ``state``: resuming skips
                    # straight to this evaluation.
                    if dist.is_main:
                        save_resume(resume_payload(), run_dir / "last.resume.pt")
                    raise TrainingStopped(
                        f"stopped during evaluation of epoch {epoch + 1}; resume with `mlic train --resume {run_dir}`",
                        exit_code=128 + (stop.signal or 0),
                    ) from None
                res = candidates[0].results
                ema_res = candidates[1].results if len(candidates) > 1 else None
                row = _metrics_row(
                    epoch + 1,
                    train_loss,
                    optimizer.param_groups[-1]["lr"],
                    train_time,
                    res,
                    ema_res,
                )
                state.history.append(row)
                # train.select_on: the val split, or held-out training images (val unused)
                key = "holdout_mAP" if cfg.train.select_on == "holdout" else "mAP"
                best = max(candidates, key=lambda c: c.results[key])
                improved = best.results[key] > state.best_score
                if improved:
                    state.best_score = float(best.results[key])
                    state.best_map = float(best.results["mAP"])
                    state.best_epoch = epoch + 1
                if dist.is_main:
                    log.info(
                        "epoch %d/%d  loss %.4f  mAP %.4f%s  (%.0fs)", epoch + 1, cfg.train.epochs, train_loss,
                        res["mAP"], f"  EMA mAP {ema_res['mAP']:.4f}" if ema_res else "", train_time,
                    )  # fmt: skip
                    _write_metrics_csv(run_dir / "metrics.csv", state.history)
                    if writer is not None:
                        for k, v in row.items():
                            if k != "epoch":
                                writer.add_scalar(
                                    k if k in ("train_loss", "lr", "epoch_time_s") else f"val/{k}",
                                    v,
                                    epoch + 1,
                                )
                        writer.flush()
                    if improved:
                        meta = checkpoint_meta(best.results, best.name)
                        if best.thresholds is not None:
                            meta["thresholds"] = [round(float(t), 6) for t in best.thresholds]
                            meta["thresholds_from"] = calibration.source
                        save_checkpoint(best.module, run_dir / "best.safetensors", labels.names,
                                        **meta)  # fmt: skip
                        # the report is drawn from these, also after a resume
                        save_npy(run_dir / "best_val_scores.npy", best.scores.astype(np.float32))
                        save_npy(run_dir / "val_targets.npy", best.targets.astype(np.int8))
            state.epoch += 1
            state.consumed = 0
            state.loss_sum = 0.0
            state.loss_count = 0
            if dist.is_main:
                save_resume(resume_payload(), run_dir / "last.resume.pt")
    if writer is not None:
        writer.close()

    if dist.is_main and (run_dir / "best_val_scores.npy").exists():
        from mlic.metrics import average_precision_per_class
        from mlic.viz import write_report

        sc = np.load(run_dir / "best_val_scores.npy", allow_pickle=False)
        tg = np.load(run_dir / "val_targets.npy", allow_pickle=False)
        best_meta = read_metadata(run_dir / "best.safetensors")
        write_report(run_dir, title=f"{cfg.model.name} on {cfg.data.format}", names=labels.names,
                     scores=sc, targets=tg, per_class_ap=average_precision_per_class(sc, tg),
                     history=state.history, thresholds=best_meta.get("thresholds"),
                     thresholds_from=best_meta.get("thresholds_from"),
                     extra={"best epoch": state.best_epoch, "model": cfg.model.name,
                            "backbone": cfg.model.backbone, "image size": size})  # fmt: skip
    dist_utils.barrier()
    return {
        "best_mAP": state.best_map,
        "best_epoch": state.best_epoch,
        "run_dir": run_dir,
        "history": state.history,
    }
