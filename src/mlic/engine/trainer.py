"""The training loop as phases, in the order ``train`` runs them.

Start the process (device, DDP, seeds) -> read the data and build the loaders
(:mod:`mlic.engine.loaders`) -> build the model -> build its optimiser, schedule, scaler
and EMA -> restore a resume point -> per epoch :func:`train_one_epoch` then
:func:`evaluate_and_checkpoint` -> :func:`final_report`. The run folder
(:mod:`mlic.engine.run_folder`) gets ``config.yaml``, ``metrics.csv``, TensorBoard events,
``best.safetensors``, ``last.resume.pt`` and ``report.md``. A resume point is written at
every epoch end and when SIGINT/SIGTERM arrive, so a killed run continues with ``--resume``
and reaches the same result (bit-identical on CPU).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import signal
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from timm.utils import ModelEmaV3
from tqdm import tqdm

from mlic.config import Config, check_resume_overrides, load_config
from mlic.data.labels import LabelSet
from mlic.data.transforms import config_transforms
from mlic.engine import distributed as dist_utils
from mlic.engine.calibration import (
    CalibrationPlan,
    calibrated_metrics,
    metrics_at,
    threshold_rule,
)
from mlic.engine.checkpoint import (
    load_resume,
    load_state_strict,
    read_metadata,
    save_checkpoint,
    save_resume,
    unwrap_model,
)
from mlic.engine.folds import OutOfFold, out_of_fold_scores, save_fold_record
from mlic.engine.loaders import Loaders, RunData, build_loaders, load_run_data
from mlic.engine.precision import Precision, check_device, resolve_precision
from mlic.engine.precision import autocast as precision_autocast
from mlic.engine.run_folder import (
    RunState,
    check_resume_matches,
    check_run_dir_free,
    metrics_row,
    note_skipped,
    prepare_run_dir,
    write_metrics_csv,
)
from mlic.engine.run_log import EtaClock, RunBoard, board_sample, format_duration
from mlic.errors import CheckpointError, ConfigError, MlicError
from mlic.faults import maybe_kill
from mlic.files import RunLock, save_npy
from mlic.host import retain_freed_memory
from mlic.losses import loss_from_config
from mlic.metrics import MultiLabelMetrics, average_precision_per_class, multilabel_metrics
from mlic.models import create_model
from mlic.thresholds import ThresholdChoice, choose_thresholds, describe_stored

__all__ = [
    "train",
    "train_one_epoch",
    "evaluate",
    "evaluate_and_checkpoint",
    "Trainee",
    "EpochPlan",
    "resolve_device",
    "autocast_context",
    "TrainingStopped",
]

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
    check_device(name, "train.device")  # "tpu", "gpu0", an absent GPU: one line
    return torch.device(name)


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


def build_optimizer(model: nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    o = cfg.optim
    if hasattr(model, "param_groups"):
        groups = model.param_groups(o.lr, o.backbone_lr_mult, o.weight_decay, o.decay_norm_and_bias)
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    # the fused kernels (CUDA, and CPU since torch 2.4): one vectorised pass per parameter,
    # the same update (tested) and state dict, much faster on CPU (BENCHMARKS.md 10.1)
    fused = device.type in ("cuda", "cpu")
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay, fused=fused)
    return torch.optim.SGD(
        groups,
        lr=o.lr,
        momentum=o.momentum,
        weight_decay=o.weight_decay,
        nesterov=o.nesterov,
        fused=fused,
    )


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
    desc: str = "eval",
) -> tuple[dict[str, float], np.ndarray, np.ndarray, np.ndarray]:
    """Metrics over the whole loader (synced across ranks): ``(metrics, per-class AP, scores, targets)``.

    ``should_stop`` is polled between batches; when it returns True, :class:`EvalInterrupted`
    is raised so the caller can save a resume point. ``prepare`` turns what the loader yields
    into a device batch (GPU-side JPEG decoding); default: move the tensor to ``device``.
    ``desc`` names the progress bar (shown with ``progress``).
    """
    model.eval()
    metric = MultiLabelMetrics().to(device)
    bar = tqdm(loader, desc=desc, leave=False, disable=not progress, total=_length(loader))
    for images, targets in bar:
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


def _length(loader: Any) -> int | None:
    """The loader's number of batches for a progress bar, None when it has none (streams)."""
    try:
        return len(loader)
    except TypeError:
        return None


# ----------------------------------------------------------------------------- one epoch
@dataclass
class Trainee:
    """A model and what trains it: one per run (and one per ``mlic bench`` model)."""

    model: nn.Module  # the weights that are saved: not compiled, not DDP-wrapped
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    optimizer: torch.optim.Optimizer
    scheduler: Any | None  # stepped once per optimiser step; None: a constant rate
    scaler: torch.amp.GradScaler
    ema: ModelEmaV3 | None = None
    forward: nn.Module | None = None  # what a step calls (compiled, DDP); None: ``model``


@dataclass(frozen=True)
class EpochPlan:
    """How one epoch's batches become optimiser steps (the ``train.*`` settings)."""

    epoch: int  # 0-based
    batches: int  # batches in the whole epoch, per rank (a resumed epoch starts part-way)
    batch_size: int  # per rank, as configured
    global_batch: int  # samples one batch consumes over all ranks
    device: torch.device
    precision: Precision
    accum_steps: int = 1
    grad_clip: float = 0.0
    channels_last: bool = False
    head_only: bool = False  # train.head_warmup_epochs: the backbone stays as it is
    freeze_bn: bool = False  # train.freeze_bn_stats
    progress: bool = False
    desc: str = ""


class EpochInterrupted(Exception):
    """``should_stop`` said so after an optimiser step; the epoch's loss so far is in the state."""


class NonFiniteLoss(Exception):
    """The running training loss is NaN or infinite."""


def _optimiser_step(trainee: Trainee, plan: EpochPlan, state: RunState) -> None:
    """One optimiser step from the accumulated gradients, then the schedule and the EMA."""
    model, optimizer, scaler = trainee.model, trainee.optimizer, trainee.scaler
    if plan.head_only:
        drop_grads(model.backbone)
    if plan.grad_clip:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), plan.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if trainee.scheduler is not None:
        trainee.scheduler.step()
    if trainee.ema is not None:
        trainee.ema.update(unwrap_model(model), step=state.step)
    state.step += 1
    maybe_kill("kill_at_step", state.step)


def train_one_epoch(
    trainee: Trainee,
    loader: Iterable[tuple[Any, torch.Tensor]],
    prepare: Callable[[Any], torch.Tensor],
    state: RunState,
    plan: EpochPlan,
    should_stop: Callable[[], bool] | None = None,
    before_batch: Callable[[], None] | None = None,
    on_step: Callable[[int, torch.Tensor, float], None] | None = None,
) -> float:
    """Train over ``loader`` from ``state.consumed`` samples in; the epoch's mean loss.

    Gradients of ``plan.accum_steps`` batches make one optimiser step. ``should_stop`` is
    polled after each step (:class:`EpochInterrupted`); the loss is checked on the host every
    20 steps (:class:`NonFiniteLoss`). ``state`` (steps, samples, loss sums) stays exact for a
    resume point at any step. ``on_step(step, loss, lr)`` gets each optimiser step's mean
    loss (a device scalar, not synced) and learning rate (TensorBoard).
    """
    model = trainee.model
    step_module = trainee.forward if trainee.forward is not None else model
    step_module.train()
    if plan.freeze_bn or plan.head_only:
        freeze_bn_stats(model.backbone)
    batch_hook = getattr(model, "on_train_batch_end", None)  # e.g. AAMN's memory update
    loss_acc = torch.zeros((), device=plan.device, dtype=torch.float64)
    n_acc = 0
    last_acc, last_n = loss_acc.clone(), 0  # the sums at the last optimiser step (on_step)
    done = state.consumed // plan.global_batch
    bar = tqdm(
        loader,
        desc=plan.desc,
        leave=False,
        disable=not plan.progress,
        initial=done,
        total=plan.batches,
    )
    for images, targets in bar:
        if done >= plan.batches:
            break
        if before_batch is not None:
            before_batch()
        # a batch whose every image was skipped gets no step, nor one left with a single
        # image (BatchNorm cannot train on it) unless batches are of one
        if len(targets) > 1 or (len(targets) == 1 and plan.batch_size == 1):
            images = prepare(images)  # [B, 3, S, S] float on the device
            targets = targets.to(plan.device, non_blocking=True)
            if plan.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast_context(plan.device, plan.precision):
                logits = step_module(images)  # [B, C]
            loss = trainee.criterion(logits.float(), targets)
            trainee.scaler.scale(loss / plan.accum_steps).backward()
            loss_acc += loss.detach()
            if batch_hook is not None:
                batch_hook(targets)
            n_acc += 1
        done += 1
        state.consumed += plan.global_batch
        if done % plan.accum_steps != 0 and done != plan.batches:
            continue
        lr_used = trainee.optimizer.param_groups[-1]["lr"]  # before the schedule steps it
        _optimiser_step(trainee, plan, state)
        if on_step is not None and n_acc > last_n:
            on_step(state.step, (loss_acc - last_acc) / (n_acc - last_n), lr_used)
            last_acc, last_n = loss_acc.clone(), n_acc
        if state.step % 20 == 0 or done == plan.batches:  # one host sync every 20 steps
            running = float(loss_acc) / max(n_acc, 1)
            if not math.isfinite(running):
                raise NonFiniteLoss(f"epoch {plan.epoch + 1}, step {state.step}")
            lr = trainee.optimizer.param_groups[-1]["lr"]
            bar.set_postfix(loss=f"{running:.4f}", lr=f"{lr:.2e}")
        if should_stop is not None and should_stop():
            state.loss_sum += float(loss_acc)
            state.loss_count += n_acc
            bar.close()
            raise EpochInterrupted
    bar.close()
    state.loss_sum += float(loss_acc)
    state.loss_count += n_acc
    return state.loss_sum / max(state.loss_count, 1)


# ----------------------------------------------------------------------------- a run
@dataclass
class _Run:
    """Everything the epochs of one run share."""

    cfg: Config
    run_dir: Path
    device: torch.device
    precision: Precision
    dist: dist_utils.DistInfo
    data: RunData
    loaders: Loaders
    trainee: Trainee
    state: RunState
    size: int  # input side, pixels
    norm: tuple[Sequence[float], Sequence[float]]  # mean, std
    writer: Any = None  # TensorBoard (run_log.RunBoard), main rank only
    clock: EtaClock | None = None  # the log line's ETA, main rank only

    def save_resume(self) -> None:
        """Write ``last.resume.pt`` (main rank): weights, optimiser, schedule, RNG, progress."""
        if not self.dist.is_main:
            return
        t = self.trainee
        payload = {
            "model": unwrap_model(t.model).state_dict(),
            "optimizer": t.optimizer.state_dict(),
            "scheduler": t.scheduler.state_dict(),
            "scaler": t.scaler.state_dict(),
            "ema": t.ema.module.state_dict() if t.ema is not None else {},
            "rng": _rng_state(),
            "run": dict(self.state.__dict__),
            "signature": self.data.signature,
        }
        save_resume(payload, self.run_dir / "last.resume.pt")

    def checkpoint_meta(self, results: dict[str, float], source: str) -> dict[str, Any]:
        resize = self.cfg.data.resize
        return {
            "input_size": [3, self.size, self.size],
            "mean": list(self.norm[0]),
            "std": list(self.norm[1]),
            "metrics": {k: float(v) for k, v in results.items()},
            "epoch": self.state.best_epoch,  # 1-based, as metrics.csv and the log
            "weights": source,
            "dataset": self.cfg.data.format,
            "selected_on": self.cfg.train.select_on,
            # predict, serve and export warp and crop as the run evaluated (SSGRL's protocol)
            **({"resize": resize} if resize is not None else {}),
        }


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


@dataclass
class _Candidate:
    """One set of weights (the model or its EMA) evaluated at an epoch end."""

    name: str
    module: nn.Module
    results: dict[str, float]  # val metrics at 0.5, plus cal_* at the calibrated thresholds
    scores: np.ndarray  # [N, C] val probabilities
    targets: np.ndarray  # [N, C] val targets
    thresholds: ThresholdChoice | None  # None without calibration
    calib_scores: np.ndarray | None = None  # [M, C] held-out training images' probabilities
    calib_targets: np.ndarray | None = None  # [M, C]


def _evaluate_candidate(
    name: str,
    module: nn.Module,
    val_loader: torch.utils.data.DataLoader,
    calib_loader: torch.utils.data.DataLoader | None,
    plan: CalibrationPlan,
    rule: dict[str, Any],
    ev: dict[str, Any],
) -> _Candidate:
    """Validation metrics of ``module`` and, unless calibration is off, thresholds chosen on
    the calibration data (held-out training images, the val split itself, or the fixed
    out-of-fold scores) with the val metrics at those thresholds (``cal_*``)."""
    res, _, scores, targets = evaluate(module, val_loader, **ev, desc=f"{name} val")
    choice = calib_scores = calib_targets = None
    if plan.mode == "val":
        choice, cal = calibrated_metrics(scores, targets, scores, targets, rule)
        res = {**res, **cal}
    elif plan.choice is not None:  # oof: chosen once, on the fold runs' scores
        choice = plan.choice
        res = {**res, **metrics_at(choice, scores, targets)}
    elif calib_loader is not None:
        _, _, calib_scores, calib_targets = evaluate(
            module, calib_loader, **ev, desc=f"{name} calib"
        )
        choice, cal = calibrated_metrics(calib_scores, calib_targets, scores, targets, rule)
        # the held-out training images' mAP: what train.select_on=holdout selects on
        held = float(multilabel_metrics(calib_scores, calib_targets)["mAP"])
        res = {**res, **cal, "holdout_mAP": held}
    return _Candidate(name, module, res, scores, targets, choice, calib_scores, calib_targets)


def _evaluate_candidates(run: _Run, stop: _StopFlag, epoch: int) -> list[_Candidate]:
    """The model (and its EMA) on the val split and the calibration data; a stop signal
    during evaluation saves a resume point that goes straight back to this evaluation."""
    t, loaders, state = run.trainee, run.loaders, run.state
    ev = dict(
        device=run.device,
        amp=run.precision,
        channels_last=run.cfg.train.channels_last,
        should_stop=stop,
        prepare=loaders.eval_prepare,
        progress=run.cfg.run.progress and run.dist.is_main,
    )
    plan, rule = run.data.calibration, threshold_rule(run.cfg, run.data.labels.names)
    dist_utils.broadcast_buffers(unwrap_model(t.model))
    if t.ema is not None:
        dist_utils.broadcast_buffers(t.ema.module)
    try:
        model = unwrap_model(t.model)
        candidates = [
            _evaluate_candidate("model", model, loaders.val, loaders.calib, plan, rule, ev)
        ]
        if t.ema is not None:
            ema = t.ema.module
            candidates.append(
                _evaluate_candidate("ema", ema, loaders.val, loaders.calib, plan, rule, ev)
            )
        for loader in (loaders.val, loaders.calib):
            note_skipped(loader, state, run.data.skipped, run.run_dir, run.dist.is_main)
    except EvalInterrupted:
        # The epoch's training is done and counted in ``state``: resuming skips straight to
        # this evaluation.
        run.save_resume()
        raise TrainingStopped(
            f"stopped during evaluation of epoch {epoch + 1}; resume with `mlic train --resume {run.run_dir}`",
            exit_code=128 + (stop.signal or 0),
        ) from None
    return candidates


def _write_epoch(
    run: _Run, row: dict[str, Any], best: _Candidate | None, shown: _Candidate | None = None
) -> None:
    """Main rank: the epoch's log line (with the whole run's ETA), ``metrics.csv``,
    TensorBoard (``shown``: the epoch's better weights, for PR curves and predictions) and,
    when ``best`` is given (it improved), ``best.safetensors`` with the report's scores."""
    cfg, run_dir = run.cfg, run.run_dir
    ema_map = f"  EMA mAP {row['ema_mAP']:.4f}" if "ema_mAP" in row else ""
    left = run.clock.eta(row["epoch"], cfg.train.epochs) if run.clock is not None else 0.0
    log.info(
        "epoch %d/%d  loss %.4f  mAP %.4f%s  (%.0fs)  ETA %s",
        row["epoch"],
        cfg.train.epochs,
        row["train_loss"],
        row["mAP"],
        ema_map,
        row["epoch_time_s"],
        format_duration(left),
    )
    write_metrics_csv(run_dir / "metrics.csv", run.state.history)
    if run.writer is not None:
        for k, v in row.items():
            if k != "epoch":
                tag = k if k in ("train_loss", "lr", "epoch_time_s") else f"val/{k}"
                run.writer.add_scalar(tag, v, row["epoch"])
        if shown is not None:
            run.writer.epoch_end(row["epoch"], shown.module, shown.scores, shown.targets)
        run.writer.flush()
    if best is None:
        return
    meta = run.checkpoint_meta(best.results, best.name)
    if best.thresholds is not None:
        meta.update(best.thresholds.to_meta(run.data.calibration.source))
    save_checkpoint(best.module, run_dir / "best.safetensors", run.data.labels.names, **meta)
    # the report is drawn from these, also after a resume
    save_npy(run_dir / "best_val_scores.npy", best.scores.astype(np.float32))
    save_npy(run_dir / "val_targets.npy", best.targets.astype(np.int8))
    if best.calib_scores is not None and best.calib_targets is not None:
        # kept so that thresholds can be re-tuned, or rules compared, without a re-run
        save_npy(run_dir / "best_calib_scores.npy", best.calib_scores.astype(np.float32))
        save_npy(run_dir / "calib_targets.npy", best.calib_targets.astype(np.int8))


def evaluate_and_checkpoint(
    run: _Run, stop: _StopFlag, epoch: int, train_loss: float, train_time: float
) -> None:
    """Evaluate the model and its EMA, add the epoch's row to the history, and keep the
    better of them as ``best.safetensors`` when it beats the weights kept so far."""
    candidates = _evaluate_candidates(run, stop, epoch)
    res = candidates[0].results
    ema_res = candidates[1].results if len(candidates) > 1 else None
    lr = run.trainee.optimizer.param_groups[-1]["lr"]
    row = metrics_row(epoch + 1, train_loss, lr, train_time, res, ema_res)
    state = run.state
    state.history.append(row)
    # train.select_on: the val split, or held-out training images (val unused)
    key = "holdout_mAP" if run.cfg.train.select_on == "holdout" else "mAP"
    best = max(candidates, key=lambda c: c.results[key])
    improved = best.results[key] > state.best_score
    if improved:
        state.best_score = float(best.results[key])
        state.best_map = float(best.results["mAP"])
        state.best_epoch = epoch + 1
    if run.dist.is_main:
        _write_epoch(run, row, best if improved else None, shown=best)


def final_report(run: _Run) -> None:
    """``report.md`` with plots, drawn from the kept weights' val scores (main rank)."""
    run_dir = run.run_dir
    if not run.dist.is_main or not (run_dir / "best_val_scores.npy").exists():
        return
    from mlic.viz import write_report

    cfg = run.cfg
    sc = np.load(run_dir / "best_val_scores.npy", allow_pickle=False)
    tg = np.load(run_dir / "val_targets.npy", allow_pickle=False)
    best_meta = read_metadata(run_dir / "best.safetensors")
    extra = {
        "best epoch": run.state.best_epoch,
        "model": cfg.model.name,
        "backbone": cfg.model.backbone,
        "image size": run.size,
    }
    write_report(
        run_dir,
        title=f"{cfg.model.name} on {cfg.data.format}",
        names=run.data.labels.names,
        scores=sc,
        targets=tg,
        per_class_ap=average_precision_per_class(sc, tg),
        history=run.state.history,
        thresholds=best_meta,
        extra=extra,
    )
    _log_thresholds(best_meta, run.data.labels.names)


def _log_thresholds(meta: dict[str, Any], names: Sequence[str]) -> None:
    """Say which rule chose the stored thresholds and which classes it could not tune."""
    if meta.get("thresholds") is None:
        return
    fell = [n for n, f in zip(names, meta.get("threshold_fallback") or [], strict=False) if f]
    log.info("decision thresholds: %s", describe_stored(meta))
    if fell:
        log.info(
            "  %d class(es) with too few calibration positives use the global threshold %s: %s",
            len(fell),
            meta.get("threshold_global"),
            ", ".join(fell),
        )


# ----------------------------------------------------------------------------- phases
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


def _fold_runs(cfg: Config, run_dir: Path) -> OutOfFold | None:
    """``data.calibration=oof``: the fold runs in ``RUN/folds`` (run, resumed or read)."""
    if cfg.data.calibration != "oof" or cfg.data.folds is not None:
        return None
    d = cfg.data
    return out_of_fold_scores(
        cfg, run_dir / "folds", train, d.calibration_folds, d.calibration_fold_epochs
    )


def _use_out_of_fold(data: RunData, oof: OutOfFold, cfg: Config) -> None:
    """The thresholds chosen once on the out-of-fold scores, checked against the run's labels."""
    if data.train is None or oof.names != list(data.labels.names):
        raise ConfigError(
            "the fold runs in RUN/folds have other classes than this run; delete RUN/folds"
        )
    rows = oof.scored  # [N]
    plan = data.calibration
    rule = threshold_rule(cfg, oof.names)
    plan.choice = choose_thresholds(oof.scores[rows], oof.targets[rows], **rule)
    plan.source = (
        f"out-of-fold scores of {int(rows.sum())} training images ({oof.folds} fold runs of "
        f"{oof.epochs} epoch(s), data.calibration=oof)"
    )


def _start_process(cfg: Config) -> tuple[torch.device, dist_utils.DistInfo]:
    """Device, process group, threads, allocator and seeds of this process; rank 0 logs."""
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
    return device, dist


def _check_run_data(
    cfg: Config, data: RunData, device: torch.device, run_dir: Path, resume_state: dict | None
) -> Precision:
    """What needs the data read (select_on's held-out images, a resume's signature), the
    set-up's log lines, and the precision the run computes in."""
    if cfg.train.select_on == "holdout" and data.calibration.holdout is None:
        raise ConfigError(
            f"train.select_on=holdout needs held-out training images; data.format="
            f"{cfg.data.format} streams its splits and cannot hold images out"
        )
    log.info("decision thresholds calibrated on %s", data.calibration.source)
    precision = resolve_precision(cfg.train.amp, device)
    log.info("precision: %s", precision)
    if resume_state is not None:
        check_resume_matches(run_dir, resume_state.get("signature"), data.signature)
    labels = data.labels
    no_pos = [n for n, c in zip(labels.names, labels.counts, strict=True) if c == 0]
    if no_pos:
        log.warning("classes with no training positives (left out of mAP): %s", no_pos)
    return precision


def build_model(
    cfg: Config, labels: LabelSet, device: torch.device, from_resume: bool
) -> nn.Module:
    """The configured model on ``device``, with the backbone frozen when its learning rate
    is 0 (``from_resume``: no pretrained weights, the resume state holds them)."""
    kwargs = dict(cfg.model.kwargs)
    kwargs["backbone"] = cfg.model.backbone
    kwargs["pretrained"] = (
        False if from_resume else cfg.model.pretrained_file or cfg.model.pretrained
    )
    if cfg.model.drop_path_rate > 0:
        kwargs["drop_path_rate"] = cfg.model.drop_path_rate
    model = create_model(cfg.model.name, len(labels.names), labels=labels, **kwargs)
    if cfg.optim.backbone_lr_mult == 0:
        # linear probing: no gradient for the backbone at all skips its backward pass and
        # the optimiser holds no state for it; its BatchNorm follows train.freeze_bn_stats
        model.backbone.requires_grad_(False)
        log.info("backbone frozen (optim.backbone_lr_mult=0): only the head trains")
    if cfg.train.freeze_bn_stats:
        n_bn = len(batchnorm_layers(model.backbone))  # frozen at each epoch's start
        log.info("backbone BatchNorm statistics frozen (%d layers; scale and shift train)", n_bn)
    if cfg.train.head_warmup_epochs:
        log.info(
            "head warm-up: the backbone stays as pretrained for the first %d epoch(s)",
            cfg.train.head_warmup_epochs,
        )
    model.to(device)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def build_trainee(
    model: nn.Module, cfg: Config, device: torch.device, precision: Precision, steps: int
) -> Trainee:
    """Loss, optimiser, schedule (``steps`` optimiser steps per epoch), scaler and EMA."""
    criterion = loss_from_config(cfg.loss)
    optimizer = build_optimizer(model, cfg, device)
    scheduler = build_scheduler(optimizer, cfg, steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.dtype == torch.float16)
    ema = build_ema(model, cfg) if cfg.train.ema else None
    return Trainee(model, criterion, optimizer, scheduler, scaler, ema)


def restore(
    trainee: Trainee,
    resume_state: dict[str, Any],
    cfg: Config,
    device: torch.device,
    steps: int,
    extend: bool,
) -> RunState:
    """Put the resume point back: weights, optimiser, schedule (rebuilt for a new
    ``train.epochs`` when ``extend``), scaler, EMA, RNG; returns the run's progress."""
    load_state_strict(trainee.model, resume_state["model"], "resume state")
    trainee.optimizer.load_state_dict(resume_state["optimizer"])
    if extend:  # train.epochs changed: the schedule follows the new length
        done_steps = int(resume_state["run"].get("step", 0))
        trainee.scheduler = _extended_schedule(
            trainee.model, trainee.optimizer, cfg, device, steps, done_steps
        )
    else:
        trainee.scheduler.load_state_dict(resume_state["scheduler"])
    trainee.scaler.load_state_dict(resume_state["scaler"])
    if trainee.ema is not None:
        load_state_strict(trainee.ema.module, resume_state["ema"], "resume state (EMA)")
    s = resume_state["run"]
    state = RunState(**{k: s[k] for k in RunState.__dataclass_fields__ if k in s})
    _set_rng_state(resume_state["rng"])
    return state


def _training_forward(
    model: nn.Module, cfg: Config, device: torch.device, dist: dist_utils.DistInfo
) -> nn.Module:
    """What a training step calls: the model, compiled (``train.compile``), DDP-wrapped."""
    forward = torch.compile(model) if cfg.train.compile else model
    if dist.enabled:
        ids = [dist.local_rank] if device.type == "cuda" else None
        forward = torch.nn.parallel.DistributedDataParallel(forward, device_ids=ids)
    return forward


def open_run(run: _Run, fresh: bool) -> None:
    """Main rank: the run folder's starting files and the TensorBoard writer."""
    if not run.dist.is_main:
        return
    skipped = run.data.skipped + run.state.skipped
    prepare_run_dir(run.run_dir, run.cfg, run.data.labels, skipped, fresh=fresh)
    if run.data.fold_index is not None:  # a fold run: which rows of the split it scores
        save_fold_record(run.run_dir, run.data.fold_index, run.data.split_size)
    run.clock = EtaClock(run.state.epoch)
    if run.cfg.run.tensorboard:
        _, eval_tf = config_transforms(run.cfg.data, run.size, *run.norm)
        sample = board_sample(run.data.val, eval_tf, run.size)
        run.writer = RunBoard(run.run_dir / "tb", run.data.labels.names, sample, run.norm)


def _run_epoch(run: _Run, stop: _StopFlag, stop_after_steps: int | None) -> float:
    """:func:`train_one_epoch` for the run's epoch in progress; a stop saves a resume point."""
    cfg, state, dist = run.cfg, run.state, run.dist
    epoch = state.epoch
    plan = EpochPlan(
        epoch=epoch,
        batches=run.loaders.batches_per_epoch,
        batch_size=cfg.data.batch_size,
        global_batch=cfg.data.batch_size * dist.world_size,
        device=run.device,
        precision=run.precision,
        accum_steps=cfg.train.accum_steps,
        grad_clip=cfg.optim.grad_clip or 0.0,
        channels_last=cfg.train.channels_last,
        head_only=epoch < cfg.train.head_warmup_epochs,
        freeze_bn=cfg.train.freeze_bn_stats,
        progress=cfg.run.progress and dist.is_main,
        desc=f"epoch {epoch + 1}/{cfg.train.epochs}",
    )

    def should_stop() -> bool:
        return stop.signal is not None or (
            stop_after_steps is not None and state.step >= stop_after_steps
        )

    def before_batch() -> None:
        note_skipped(run.loaders.train, state, run.data.skipped, run.run_dir, dist.is_main)

    loaders = run.loaders
    try:
        train_loss = train_one_epoch(
            run.trainee,
            loaders.train,
            loaders.train_prepare,
            state,
            plan,
            should_stop,
            before_batch,
            on_step=run.writer.step if run.writer is not None else None,
        )
    except EpochInterrupted:
        run.save_resume()
        raise TrainingStopped(
            f"stopped at epoch {epoch + 1}, step {state.step}; resume with "
            f"`mlic train --resume {run.run_dir}`",
            exit_code=128 + stop.signal if stop.signal else 1,
        ) from None
    except NonFiniteLoss as e:
        raise TrainingStopped(
            f"non-finite training loss at {e}; last good checkpoint kept in {run.run_dir}",
            exit_code=3,
        ) from None
    if not math.isfinite(train_loss):
        raise TrainingStopped(
            f"non-finite training loss in epoch {epoch + 1}; last good checkpoint kept", 3
        )
    return train_loss


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
            check_run_dir_free(run_dir, cfg.run.overwrite)  # type: ignore[union-attr]
        return _train_locked(cfg, run_dir, resume, stop_after_steps, overrides)


def _train_locked(
    cfg: Config | None,
    run_dir: Path,
    resume: str | Path | None,
    stop_after_steps: int | None,
    overrides: list[str] | None,
) -> dict[str, Any]:
    """:func:`train` once the run folder is locked: the phases in order."""
    resume_state, extend = None, False  # extend: train.epochs changed on resume
    if resume is not None:
        rpath = Path(resume)
        rpath = rpath / "last.resume.pt" if rpath.is_dir() else rpath
        cfg, resume_state, extend = _load_resume_point(run_dir, rpath, overrides)
    assert cfg is not None
    oof = _fold_runs(cfg, run_dir)  # data.calibration=oof: before this run's own
    device, dist = _start_process(cfg)
    data = load_run_data(cfg, dist.is_main)
    if oof is not None:
        _use_out_of_fold(data, oof, cfg)
    precision = _check_run_data(cfg, data, device, run_dir, resume_state)
    model = build_model(cfg, data.labels, device, from_resume=resume_state is not None)
    dcfg = model.default_cfg
    size = cfg.data.image_size or dcfg["input_size"][-1]
    norm = (dcfg["mean"], dcfg["std"])
    loaders = build_loaders(cfg, data, size, norm, device, dist, run_dir)
    trainee = build_trainee(model, cfg, device, precision, loaders.steps_per_epoch)
    state = RunState()
    if resume_state is not None:
        state = restore(trainee, resume_state, cfg, device, loaders.steps_per_epoch, extend)
        log.info(
            "resumed %s at epoch %d, %d samples in, step %d",
            run_dir,
            state.epoch,
            state.consumed,
            state.step,
        )
    trainee.forward = _training_forward(model, cfg, device, dist)
    run = _Run(cfg, run_dir, device, precision, dist, data, loaders, trainee, state, size, norm)
    open_run(run, fresh=resume_state is None)
    with _StopFlag() as stop:
        while state.epoch < cfg.train.epochs:
            epoch = state.epoch
            t0 = time.perf_counter()
            loaders.sampler.set_epoch(epoch, state.consumed)
            train_loss = _run_epoch(run, stop, stop_after_steps)
            if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs:
                evaluate_and_checkpoint(run, stop, epoch, train_loss, time.perf_counter() - t0)
            state.epoch += 1
            state.consumed, state.loss_sum, state.loss_count = 0, 0.0, 0
            run.save_resume()
    if run.writer is not None:
        run.writer.close()
    final_report(run)
    dist_utils.barrier()
    return {
        "best_mAP": state.best_map,
        "best_epoch": state.best_epoch,
        "run_dir": run_dir,
        "history": state.history,
    }
