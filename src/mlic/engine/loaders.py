"""A run's data: read and checked splits, the label set, and the loaders that feed them.

``load_run_data`` reads the splits (or opens the shards / Hugging Face sets), screens their
images and sets the calibration images aside; ``build_loaders`` turns that into the
training, validation and calibration loaders and the functions that move a batch to the
device. ``eval_loader`` (one split in file order) is shared with ``mlic eval``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlic.config import Config
from mlic.data import Annotations
from mlic.data.dataset import (
    MultiLabelDataset,
    SeededSampler,
    build_loader,
    decode_batch,
    load_split,
)
from mlic.data.labels import LabelSet
from mlic.data.sources import STREAM_FORMATS, build_source_loaders, open_sources, stream_signature
from mlic.data.transforms import ToNormalizedFloat, config_transforms
from mlic.engine.calibration import CalibrationPlan, split_calibration, stream_calibration
from mlic.engine.distributed import DistInfo
from mlic.engine.folds import fold_split
from mlic.engine.run_folder import run_signature
from mlic.errors import ConfigError, DataError

__all__ = [
    "RunData",
    "Loaders",
    "build_labels",
    "load_run_data",
    "build_loaders",
    "eval_loader",
    "uint8_batch_to_device",
]

log = logging.getLogger("mlic")


@dataclass
class RunData:
    """A run's data once read and checked (before any loader exists)."""

    labels: LabelSet  # of the training images (held-out calibration images excluded)
    calibration: CalibrationPlan
    signature: dict[str, Any]  # what a resume must find unchanged
    train: Annotations | None = None  # None for streamed formats (wds, hf)
    val: Annotations | None = None
    sources: tuple[Any, Any] | None = None  # (train, val) of a streamed format
    skipped: list[str] = field(default_factory=list)  # broken images left out at the start
    # a fold run (data.folds): the rows of the whole training split its val fold scores
    fold_index: np.ndarray | None = None  # [M]
    split_size: int = 0


@dataclass
class Loaders:
    """What the epochs iterate, and how a loader's batch reaches the device."""

    train: Any  # DataLoader (or a streaming one)
    sampler: Any  # .set_epoch(epoch, consumed) before each epoch
    val: Any
    calib: Any | None  # held-out training images; None without holdout calibration
    train_prepare: Callable[[Any], torch.Tensor]  # loader batch -> [B, 3, S, S] float
    eval_prepare: Callable[[Any], torch.Tensor]
    batches_per_epoch: int  # per rank
    steps_per_epoch: int  # optimiser steps


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
        except DataError as e:  # said by the model if it uses label embeddings (_layers)
            labels.word_vectors_missing = str(e)
    else:
        labels.with_word_vectors(word_vectors)
    return labels


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


def load_run_data(cfg: Config, is_main: bool) -> RunData:
    """Read both splits (annotation errors name file and line), check their images per
    ``data.image_check``, set the calibration images aside and build the label set."""
    if cfg.data.format in STREAM_FORMATS:  # shards / HF datasets: statistics from their index
        if cfg.data.folds is not None or cfg.data.calibration == "oof":
            raise ConfigError(
                f"data.format={cfg.data.format} streams its splits: fold runs and "
                "data.calibration=oof need an image-file format (csv, voc, coco, ...)"
            )
        sources = open_sources(cfg.data)
        labels = build_labels(sources[0].label_set(), cfg.model.word_vectors)
        signature = run_signature(cfg, labels, None, None)
        signature.update(stream_signature(*sources))  # re-packed/relabelled data: no resume
        calibration = stream_calibration(cfg.data.calibration)
        return RunData(labels, calibration, signature, sources=sources)
    from mlic.data.check import screen_splits

    train_ann = load_split(cfg.data, "train")
    fold_rows = None
    if cfg.data.folds is not None:  # a fold run: val is the held-out fold of train
        split_size = len(train_ann)
        train_ann, val_ann, fold_rows = fold_split(
            train_ann, cfg.data.folds, cfg.data.fold, cfg.train.seed
        )
    else:
        val_ann = load_split(cfg.data, "val", class_names=train_ann.names)
    _require_images({"train": train_ann, "val": val_ann}, cfg.train.max_steps_per_epoch)
    skipped: list[str] = []  # written to the run folder once everything is valid
    checked = screen_splits(
        {"train": train_ann, "val": val_ann}, cfg.data, None, is_main, skipped=skipped
    )
    whole_train, screened_val = checked["train"], checked["val"]  # whole: the resume check
    fold_index = None
    if fold_rows is not None:  # the fold's rows that survived screening, in order
        kept = {str(p) for p in screened_val.images}
        fold_index = fold_rows[[str(p) in kept for p in val_ann.images]]
    val_ann = screened_val
    train_ann, calibration = split_calibration(
        whole_train, cfg.data.calibration, cfg.data.calibration_fraction, cfg.train.seed
    )
    labels = build_labels(train_ann, cfg.model.word_vectors)
    signature = run_signature(cfg, labels, whole_train, val_ann)
    data = RunData(labels, calibration, signature, train_ann, val_ann, skipped=skipped)
    if fold_index is not None:
        data.fold_index, data.split_size = fold_index, split_size
    return data


def uint8_batch_to_device(
    mean: Sequence[float], std: Sequence[float], device: torch.device, channels_last: bool
) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 loader batch [B, 3, S, S] -> normalised float batch on ``device``.

    The copy moves uint8 (4x fewer bytes than float32) and the normalisation is one pass on
    the device, with exactly the arithmetic of :class:`~mlic.data.transforms.ToNormalizedFloat`.
    """
    normalize = ToNormalizedFloat(mean, std).to(device)

    def prepare(batch: torch.Tensor) -> torch.Tensor:
        x = batch.to(device, non_blocking=True)  # [B, 3, S, S] uint8
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return normalize(x)  # [B, 3, S, S] float32, same memory format

    return prepare


def eval_loader(
    ann: Annotations,
    transform: Callable,
    size: int,
    batch_size: int,
    workers: int,
    *,
    seed: int = 0,
    world_size: int = 1,
    rank: int = 0,
    raw: bool = False,
    skip_bad: bool = False,
    pin: bool = False,
) -> torch.utils.data.DataLoader:
    """The images of ``ann`` in file order, each rank its share (no padding): validation,
    calibration and ``mlic eval``. Batches are uint8 (or encoded files with ``raw``)."""
    ds = MultiLabelDataset(ann, transform, draft_size=size, raw_bytes=raw, skip_bad=skip_bad)
    sampler = SeededSampler(len(ds), False, seed, world_size, rank, pad=False)
    return build_loader(ds, batch_size, sampler, workers, pin_memory=pin)


def _steps_per_epoch(cfg: Config, num_train: int, world_size: int) -> tuple[int, int]:
    """``(batches, optimiser steps)`` per epoch and rank."""
    d = cfg.data
    per_rank = math.ceil(num_train / world_size)  # the padded sampler's share
    batches = math.ceil(per_rank / d.batch_size)
    if per_rank % d.batch_size == 1 and batches > 1:
        batches -= 1  # a last batch of one image: BatchNorm cannot train on it
    if cfg.train.max_steps_per_epoch:
        batches = min(batches, cfg.train.max_steps_per_epoch * cfg.train.accum_steps)
    return batches, math.ceil(batches / cfg.train.accum_steps)


def build_loaders(
    cfg: Config,
    data: RunData,
    size: int,
    norm: tuple[Sequence[float], Sequence[float]],
    device: torch.device,
    dist: DistInfo,
    run_dir: Path,
) -> Loaders:
    """The run's loaders, for images of ``size`` px normalised by ``norm`` = (mean, std)."""
    d = cfg.data
    # uint8 batches from the workers (4x fewer bytes), normalised on the training device
    train_tf, eval_tf = config_transforms(d, size, *norm)
    raw = d.gpu_decode  # encoded files to the device, decoded there a batch at a time
    if raw:
        train_prepare = lambda b: decode_batch(b, size, *norm, device, hflip=d.hflip)  # noqa: E731
        eval_prepare = lambda b: decode_batch(b, size, *norm, device)  # noqa: E731
    else:
        train_prepare = eval_prepare = uint8_batch_to_device(*norm, device, cfg.train.channels_last)
    pin = device.type == "cuda" and not raw  # encoded batches keep their file names unpinned
    seed, world, rank = cfg.train.seed, dist.world_size, dist.rank
    eval_bs = d.eval_batch_size or d.batch_size
    calib = None
    if data.sources is not None:  # len(train_ds) global samples/epoch; sampler.set_epoch()
        train_ds, sampler, train, val = build_source_loaders(
            *data.sources, d, train_tf, eval_tf, size, seed, world, rank, pin, run_dir
        )
    else:
        assert data.train is not None and data.val is not None
        skip = d.skip_bad_images  # a file that breaks mid-run is skipped and counted, not fatal
        train_ds = MultiLabelDataset(
            data.train, train_tf, draft_size=size, raw_bytes=raw, skip_bad=skip
        )
        sampler = SeededSampler(len(train_ds), True, seed, world, rank, pad=True)
        train = build_loader(train_ds, d.batch_size, sampler, d.workers, pin_memory=pin)
        common = dict(seed=seed, world_size=world, rank=rank, raw=raw, skip_bad=skip, pin=pin)
        val = eval_loader(data.val, eval_tf, size, eval_bs, d.workers, **common)
        if data.calibration.holdout is not None:
            calib = eval_loader(data.calibration.holdout, eval_tf, size, eval_bs, 0, **common)
    batches, steps = _steps_per_epoch(cfg, len(train_ds), world)
    return Loaders(train, sampler, val, calib, train_prepare, eval_prepare, batches, steps)
