"""Training data from sources without an image list: WebDataset shards and HF datasets.

The trainer's file-based path (:func:`~mlic.data.dataset.load_split` +
:class:`~mlic.data.dataset.MultiLabelDataset` + :class:`~mlic.data.dataset.SeededSampler`)
needs one path per image, to check before training. ``data.format=wds`` and ``hf`` have
none; these two functions give the trainer what it needs from them instead: the label
statistics (:func:`open_sources`) and the loaders (:func:`build_source_loaders`), with the
same contract -- ``len(train_set)`` global samples per epoch and ``epoch_setter.set_epoch(
epoch, consumed)`` for deterministic, resumable epochs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, Dataset

from mlic.data.dataset import SeededSampler, _NamedErrorLoader, collate_raw

__all__ = [
    "STREAM_FORMATS",
    "open_sources",
    "build_source_loaders",
    "open_eval_source",
    "stream_signature",
]

log = logging.getLogger("mlic")

STREAM_FORMATS = ("wds", "hf")


def _open(data_cfg: Any, split: str, class_names: list[str] | None = None) -> Any:
    which = data_cfg.train if split == "train" else data_cfg.val
    if data_cfg.format == "wds":
        from mlic.data.wds import open_shards
        from mlic.errors import DataError

        src = open_shards(which, data_cfg.index if split == "train" else None)
        if class_names is not None and src.names != list(class_names):
            raise DataError(f"{which}: classes differ from the training split's {class_names}")
        return src
    from mlic.data.hf import open_hf_split

    return open_hf_split(data_cfg, split, class_names=class_names)


def open_sources(data_cfg: Any) -> tuple[Any, Any]:
    """``(train, val)`` sources of a ``wds`` / ``hf`` data config; each has ``names`` and
    ``label_set()`` (the training split's statistics)."""
    train = _open(data_cfg, "train")
    val = _open(data_cfg, "val", class_names=list(train.names))
    return train, val


def stream_signature(train: Any, val: Any) -> dict[str, Any]:
    """What a resume must find unchanged in streamed data, as the trainer keeps for image
    lists: each split's size and a hash of its labels (shard checksums and statistics, or
    an HF split's targets) -- shards re-packed with two labels swapped differ."""
    return {
        "train_images": train.num_samples,
        "train_data": train.fingerprint(),
        "val_images": val.num_samples,
        "val_data": val.fingerprint(),
    }


class _CountingLoader(_NamedErrorLoader):
    """Logs how many bad samples an epoch skipped (``data.skip_bad_images``), from the
    run's ``bad_samples.txt`` that the readers append to."""

    bad_log: Path | None = None

    def __iter__(self) -> Iterator:
        before = _lines(self.bad_log)
        yield from super().__iter__()
        skipped = _lines(self.bad_log) - before
        if skipped:
            log.warning("%d bad sample(s) skipped this pass; listed in %s", skipped, self.bad_log)


def _lines(path: Path | None) -> int:
    if path is None or not path.exists():
        return 0
    with path.open("rb") as f:
        return sum(1 for _ in f)


def _loader(
    ds: Dataset,
    batch_size: int,
    workers: int,
    pin: bool,
    raw: bool,
    sampler: Any = None,
    bad_log: Path | None = None,
) -> DataLoader:
    loader = _CountingLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin,
        # iterable readers are re-created per epoch so they see set_epoch(); map-style keep them
        persistent_workers=workers > 0 and sampler is not None,
        prefetch_factor=4 if workers > 0 else None,
        collate_fn=collate_raw if raw else None,
    )
    loader.bad_log = bad_log
    return loader


def build_source_loaders(
    train_src: Any,
    val_src: Any,
    data_cfg: Any,
    train_tf: Callable,
    eval_tf: Callable,
    image_size: int,
    seed: int,
    world_size: int,
    rank: int,
    pin: bool,
    run_dir: Path | None,
) -> tuple[Any, Any, DataLoader, DataLoader]:
    """``(train_set, epoch_setter, train_loader, val_loader)`` for a ``wds`` / ``hf`` config.

    ``len(train_set)`` is the global number of training samples per epoch (padding
    included); ``epoch_setter.set_epoch(epoch, consumed)`` is called before each epoch.
    """
    d = data_cfg
    raw = d.gpu_decode
    bad_log = Path(run_dir) / "bad_samples.txt" if run_dir is not None else None
    eval_bs = d.eval_batch_size or d.batch_size
    common = dict(
        world_size=world_size, rank=rank, skip_bad=d.skip_bad_images, bad_log=bad_log, raw_bytes=raw
    )
    if d.format == "wds":
        from mlic.data.wds import ShardEvalSet, ShardTrainSet

        train_set = ShardTrainSet(
            train_src, train_tf, image_size, d.batch_size, seed, workers=d.workers, **common
        )
        val_set = ShardEvalSet(val_src, eval_tf, image_size, workers=d.workers, **common)
        train_loader = _loader(
            train_set, d.batch_size, train_set.workers, pin, raw, bad_log=bad_log
        )
        val_loader = _loader(val_set, eval_bs, val_set.workers, pin, raw, bad_log=bad_log)
        return train_set, train_set, train_loader, val_loader
    from mlic.data.hf import hf_datasets

    train_set, val_set = hf_datasets(
        train_src, val_src, d, train_tf, eval_tf, image_size, seed, world_size, rank, common
    )
    if hasattr(train_set, "set_epoch"):  # streamed: iterable readers like the shards'
        train_loader = _loader(
            train_set, d.batch_size, train_set.workers, pin, raw, bad_log=bad_log
        )
        val_loader = _loader(val_set, eval_bs, val_set.workers, pin, raw, bad_log=bad_log)
        return train_set, train_set, train_loader, val_loader
    train_sampler = SeededSampler(len(train_set), True, seed, world_size, rank, pad=True)
    val_sampler = SeededSampler(len(val_set), False, seed, world_size, rank, pad=False)
    train_loader = _loader(train_set, d.batch_size, d.workers, pin, raw, sampler=train_sampler)
    val_loader = _loader(val_set, eval_bs, d.workers, pin, raw, sampler=val_sampler)
    return train_set, train_sampler, train_loader, val_loader


def open_eval_source(
    data_cfg: Any,
    split: str,
    names: list[str],
    transform: Callable,
    image_size: int,
    batch_size: int,
    workers: int,
) -> tuple[DataLoader, int | None]:
    """``(loader, number of samples or None)`` to evaluate a checkpoint on a ``wds``/``hf``
    split in one process (``mlic eval``)."""
    src = _open(data_cfg, split, class_names=names)
    if data_cfg.format == "wds":
        from mlic.data.wds import ShardEvalSet

        ds = ShardEvalSet(
            src, transform, image_size, workers=workers, skip_bad=data_cfg.skip_bad_images
        )
        return _loader(ds, batch_size, ds.workers, False, False), src.num_samples
    from mlic.data.hf import hf_eval_dataset

    ds = hf_eval_dataset(src, data_cfg, transform, image_size)
    if hasattr(ds, "set_epoch") or not hasattr(ds, "__getitem__"):
        return _loader(ds, batch_size, getattr(ds, "workers", 0), False, False), None
    sampler = SeededSampler(len(ds), shuffle=False, pad=False)
    return _loader(ds, batch_size, workers, False, False, sampler=sampler), len(ds)
