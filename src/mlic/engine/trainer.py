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
import logging
import math
import random
import signal
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from timm.utils import ModelEmaV3
from tqdm import tqdm

from mlic.config import Config, load_config, save_config
from mlic.data import Annotations
from mlic.data.dataset import (
    MultiLabelDataset,
    SeededSampler,
    build_loader,
    decode_batch,
    load_split,
)
from mlic.data.labels import LabelSet
from mlic.data.sources import STREAM_FORMATS, build_source_loaders, open_sources
from mlic.data.transforms import ToNormalizedFloat, build_transform
from mlic.engine import distributed as dist_utils
from mlic.engine.checkpoint import (
    load_resume,
    load_state_strict,
    save_checkpoint,
    save_resume,
    unwrap_model,
)
from mlic.engine.faults import maybe_kill
from mlic.engine.host import retain_freed_memory
from mlic.errors import ConfigError, DataError, MlicError
from mlic.losses import loss_from_config
from mlic.metrics import MultiLabelMetrics, average_precision_per_class, multilabel_metrics
from mlic.models.registry import create_model

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
    dev = torch.device(name)
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


def autocast_context(device: torch.device, amp: str):
    """``torch.autocast`` per ``train.amp``: auto = bf16 on GPU, off on CPU (no bf16 units here)."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return nullcontext()
    dtype = torch.float16 if amp == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


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
        groups = model.param_groups(o.lr, o.backbone_lr_mult, o.weight_decay)
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    if o.name == "adamw":
        fused = device.type == "cuda"
        return torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay, fused=fused)
    return torch.optim.SGD(
        groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=True
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
    amp: str = "off",
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
    best_map: float = -1.0
    best_epoch: int = -1
    loss_sum: float = 0.0
    loss_count: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


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
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


# ----------------------------------------------------------------------------- main loop
def train(
    cfg: Config | None,
    resume: str | Path | None = None,
    stop_after_steps: int | None = None,
) -> dict[str, Any]:
    """Train per ``cfg``; returns ``{"best_mAP", "best_epoch", "run_dir", "history"}``.

    ``resume``: a run folder (or its ``last.resume.pt``) to continue with the run's saved
    config (``cfg`` may then be None). ``stop_after_steps`` simulates an
    interruption after that many optimiser steps (tests).
    """
    resume_state = None
    if resume is not None:
        rpath = Path(resume)
        if rpath.is_dir():
            run_dir = rpath
            rpath = rpath / "last.resume.pt"
        else:
            run_dir = rpath.parent
        cfg = load_config(run_dir / "config.yaml")
        if rpath.exists() or not (run_dir / "config.yaml").exists():
            resume_state = load_resume(rpath)
        else:  # killed before its first resume point: start again with the saved config
            log.warning("%s: no resume state yet; starting the run from the beginning", run_dir)
    if cfg is None:
        raise ConfigError("train() needs a config or a resume folder")
    if resume is None:
        run_dir = Path(cfg.run.output_dir) / cfg.run.name

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
    if cfg.data.format in STREAM_FORMATS:  # shards / HF datasets: statistics from their index
        sources = open_sources(cfg.data)
        labels = build_labels(sources[0].label_set(), cfg.model.word_vectors)
    else:
        train_ann = load_split(cfg.data, "train")
        val_ann = load_split(cfg.data, "val", class_names=train_ann.names)
        # log annotation warnings; check images (data.image_check); stop, or skip and list them
        from mlic.data.check import screen_splits

        checked = screen_splits(
            {"train": train_ann, "val": val_ann}, cfg.data, run_dir, dist.is_main
        )
        train_ann, val_ann = checked["train"], checked["val"]
        labels = build_labels(train_ann, cfg.model.word_vectors)
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
    model.to(device)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    dcfg = model.default_cfg
    size = cfg.data.image_size or dcfg["input_size"][-1]

    # --- loaders
    d = cfg.data
    # uint8 batches from the workers (4x fewer bytes), normalised on the training device
    train_tf = build_transform(size, dcfg["mean"], dcfg["std"], True, d.randaugment,
                               d.randaugment_magnitude, d.random_erasing, d.hflip,
                               normalize=False)  # fmt: skip
    eval_tf = build_transform(size, dcfg["mean"], dcfg["std"], False, normalize=False)
    raw = d.gpu_decode  # encoded files to the device, decoded there a batch at a time
    norm = (dcfg["mean"], dcfg["std"])
    if raw:
        train_prepare = lambda b: decode_batch(b, size, *norm, device, hflip=d.hflip)  # noqa: E731
        eval_prepare = lambda b: decode_batch(b, size, *norm, device)  # noqa: E731
    else:
        train_prepare = eval_prepare = uint8_batch_to_device(*norm, device, cfg.train.channels_last)
    pin = device.type == "cuda"
    if sources is not None:  # len(train_ds) global samples/epoch; train_sampler.set_epoch()
        train_ds, train_sampler, train_loader, val_loader = build_source_loaders(
            *sources, d, train_tf, eval_tf, size, cfg.train.seed, dist.world_size, dist.rank,
            pin, run_dir,
        )  # fmt: skip
    else:
        train_ds = MultiLabelDataset(train_ann, train_tf, draft_size=size, raw_bytes=raw)
        val_ds = MultiLabelDataset(val_ann, eval_tf, draft_size=size, raw_bytes=raw)
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
    batches_per_epoch = math.ceil(len(train_ds) / (d.batch_size * dist.world_size))
    if cfg.train.max_steps_per_epoch:
        batches_per_epoch = min(
            batches_per_epoch, cfg.train.max_steps_per_epoch * cfg.train.accum_steps
        )
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.train.accum_steps)

    # --- optimisation
    criterion = loss_from_config(cfg.loss)
    optimizer = build_optimizer(model, cfg, device)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.train.amp == "fp16")
    ema = ModelEmaV3(model, decay=cfg.train.ema_decay) if cfg.train.ema else None
    state = _RunState()

    if resume_state is not None:
        load_state_strict(model, resume_state["model"], "resume state")
        optimizer.load_state_dict(resume_state["optimizer"])
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
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in run_dir.glob(".*.tmp"):  # left by a process killed mid-write
            stale.unlink()
        save_config(cfg, run_dir / "config.yaml")
        labels.save(run_dir / "labels")
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
        }

    global_batch = d.batch_size * dist.world_size
    with _StopFlag() as stop:
        while state.epoch < cfg.train.epochs:
            epoch = state.epoch
            t0 = time.perf_counter()
            train_sampler.set_epoch(epoch, state.consumed)
            train_model.train()
            loss_acc = torch.zeros((), device=device, dtype=torch.float64)
            n_acc = 0
            done_batches = state.consumed // global_batch
            bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", leave=False,
                       disable=not (cfg.run.progress and dist.is_main), initial=done_batches,
                       total=batches_per_epoch)  # fmt: skip
            for images, targets in bar:
                if done_batches >= batches_per_epoch:
                    break
                images = train_prepare(images)  # [B, 3, S, S] float on the device
                targets = targets.to(device, non_blocking=True)
                if cfg.train.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                with autocast_context(device, cfg.train.amp):
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
                    amp=cfg.train.amp,
                    channels_last=cfg.train.channels_last,
                    should_stop=stop,
                    prepare=eval_prepare,
                )
                dist_utils.broadcast_buffers(unwrap_model(model))
                if ema is not None:
                    dist_utils.broadcast_buffers(ema.module)
                try:
                    res, ap, scores, tg = evaluate(unwrap_model(model), val_loader, **ev)
                    ema_res = None
                    candidates = [("model", res, ap, scores, tg, unwrap_model(model))]
                    if ema is not None:
                        ema_res, ema_ap, ema_scores, _ = evaluate(ema.module, val_loader, **ev)
                        candidates.append(("ema", ema_res, ema_ap, ema_scores, tg, ema.module))
                except EvalInterrupted:
                    # The epoch's training is done and counted in ``state``: resuming skips
                    # straight to this evaluation.
                    if dist.is_main:
                        save_resume(resume_payload(), run_dir / "last.resume.pt")
                    raise TrainingStopped(
                        f"stopped during evaluation of epoch {epoch + 1}; resume with `mlic train --resume {run_dir}`",
                        exit_code=128 + (stop.signal or 0),
                    ) from None
                row = _metrics_row(
                    epoch + 1,
                    train_loss,
                    optimizer.param_groups[-1]["lr"],
                    train_time,
                    res,
                    ema_res,
                )
                state.history.append(row)
                source, best_res, _, best_sc, best_tg, best_mod = max(
                    candidates, key=lambda c: c[1]["mAP"]
                )
                improved = best_res["mAP"] > state.best_map
                if improved:
                    state.best_map = float(best_res["mAP"])
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
                        save_checkpoint(best_mod, run_dir / "best.safetensors", labels.names,
                                        **checkpoint_meta(best_res, source))  # fmt: skip
                        # the report is drawn from these, also after a resume
                        np.save(run_dir / "best_val_scores.npy", best_sc.astype(np.float32))
                        np.save(run_dir / "val_targets.npy", best_tg.astype(np.int8))
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
        write_report(run_dir, title=f"{cfg.model.name} on {cfg.data.format}", names=labels.names,
                     scores=sc, targets=tg, per_class_ap=average_precision_per_class(sc, tg),
                     history=state.history,
                     extra={"best epoch": state.best_epoch, "model": cfg.model.name,
                            "backbone": cfg.model.backbone, "image size": size})  # fmt: skip
    dist_utils.barrier()
    return {
        "best_mAP": state.best_map,
        "best_epoch": state.best_epoch,
        "run_dir": run_dir,
        "history": state.history,
    }
