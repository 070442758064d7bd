"""Torch dataset, deterministic seeded sampler and data-loader construction.

Augmentation randomness is tied to (run seed, epoch, image), not to worker processes: the
sampler yields ``(index, seed)`` pairs and the dataset seeds its transform with ``seed``.
So a run gives the same batches with any number of workers and after ``--resume``, and a
DDP run shards exactly the same sequence across ranks.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from mlic.data import Annotations
from mlic.data.transforms import (
    ToNormalizedFloat,
    apply_seeded,
    decode_image,
    device_decodable_jpeg,
)
from mlic.errors import DataError
from mlic.files import MAX_IMAGE_BYTES, read_regular_bytes
from mlic.host import release_inherited_heap

__all__ = [
    "MultiLabelDataset",
    "SeededSampler",
    "build_loader",
    "collate_raw",
    "decode_batch",
    "image_folder",
    "load_split",
]


class SkippedImage:
    """What :class:`MultiLabelDataset` returns instead of an image that failed to load when
    it skips bad images: the one-line message naming the file (collation drops the sample)."""

    def __init__(self, message: str) -> None:
        self.message = message

    def __reduce__(self) -> tuple[Any, tuple[str]]:  # crosses worker processes
        return (SkippedImage, (self.message,))


class EncodedBatch(list):
    """A ``data.gpu_decode`` batch: per sample either the encoded JPEG (uint8 [L], decoded
    on the device) or the image :func:`decode_image` decoded on the CPU (uint8 [3, H, W]);
    ``paths`` name the files, so a device decoder failure still names its file."""

    def __init__(self, items: Sequence[torch.Tensor] = (), paths: Sequence[str] = ()) -> None:
        super().__init__(items)
        self.paths = list(paths)


class MultiLabelDataset(Dataset):
    """Annotations + transform -> ``(image [3, S, S] float, target [C] float of 1/0/-1)``."""

    def __init__(
        self,
        annotations: Annotations,
        transform: Callable | None = None,
        draft_size: int | None = None,
        raw_bytes: bool = False,
        skip_bad: bool = False,
    ) -> None:
        """``raw_bytes``: return what :func:`decode_batch` decodes a whole batch of on the
        device: the encoded file as uint8 [L] when it is a plain JPEG a device decoder gives
        the same pixels for (:func:`~mlic.data.transforms.device_decodable_jpeg`), else the
        image decoded here by :func:`decode_image` as uint8 [3, H, W] (no transform).
        ``skip_bad``: an image that fails to load (a :class:`DataError`) gives a
        :class:`SkippedImage` instead of ending the epoch; the loader drops and counts it."""
        self.ann = annotations
        self.transform = transform
        self.draft_size = draft_size
        self.raw_bytes = raw_bytes
        self.skip_bad = skip_bad
        self.targets = torch.from_numpy(annotations.targets.astype(np.float32))  # [N, C]

    def __len__(self) -> int:
        return len(self.ann)

    def __getitem__(
        self, key: int | tuple[int, int]
    ) -> tuple[torch.Tensor | SkippedImage, torch.Tensor]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        try:
            item: torch.Tensor | SkippedImage = self._load(index, seed)
        except DataError as e:
            if not self.skip_bad:
                raise
            item = SkippedImage(str(e))
        if self.raw_bytes:  # + the path, so that the device decoder can name a failing file
            return item, self.targets[index], str(self.ann.images[index])  # type: ignore[return-value]
        return item, self.targets[index]

    def _load(self, index: int, seed: int | None) -> torch.Tensor:
        path = self.ann.images[index]
        if self.raw_bytes:
            data = read_regular_bytes(path, "image file", MAX_IMAGE_BYTES)
            if device_decodable_jpeg(data, self.draft_size):
                return torch.frombuffer(bytearray(data), dtype=torch.uint8)  # [L]
            return decode_image(path, self.draft_size, data=data)  # [3, H, W] uint8
        img = decode_image(path, self.draft_size)  # [3, H, W] uint8
        return apply_seeded(self.transform, img, seed)


class SeededSampler(Sampler):
    """Shuffling, rank-sharded sampler that yields ``(index, augmentation seed)``.

    The order and seeds of epoch ``e`` depend only on ``(seed, e)``. Ranks take interleaved
    slices of one permutation; with ``pad=True`` (training) the sequence is padded to a
    multiple of ``num_replicas`` as DistributedSampler does, with ``pad=False`` (evaluation)
    every image is seen exactly once over all ranks. ``set_epoch(e, start)`` skips the first
    ``start`` samples of the *global* sequence, so a mid-epoch resume works with any world size.
    """

    def __init__(
        self,
        num_samples: int,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        pad: bool = True,
    ) -> None:
        self.n = num_samples
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.pad = pad
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch = epoch
        self.start = start

    def _indices(self) -> torch.Tensor:
        # the trainer counts whole batches, so after a stop in an epoch's last, partial batch
        # ``start`` may pass the end: nothing is left of that epoch
        remaining = max(self.n - self.start, 0)
        if remaining == 0:
            return torch.zeros(0, dtype=torch.long)
        if self.pad:
            total = math.ceil(remaining / self.num_replicas) * self.num_replicas
            return torch.arange(self.rank, total, self.num_replicas)
        return torch.arange(self.rank, remaining, self.num_replicas)

    def __len__(self) -> int:
        return len(self._indices())

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        seeds = torch.randint(0, 2**31 - 1, (self.n,), generator=g)
        remaining = order[self.start :]
        positions = self._indices() % max(len(remaining), 1)  # padding wraps to the start
        for i in remaining[positions].tolist():
            yield i, int(seeds[i])


def _worker_message(message: str) -> str:
    """The original one-line message inside torch's "Caught DataError in DataLoader worker" text.

    torch re-raises a worker's exception in the main process as the same type, with the
    worker's whole traceback as the message; our DataError messages are one line, the last
    line of that traceback (``mlic.errors.DataError: <path>: ...``).
    """
    if not message.startswith("Caught DataError"):
        return message
    where = message.splitlines()[0].removeprefix("Caught DataError").strip().rstrip(".")
    for line in reversed(message.rstrip().splitlines()):
        if "DataError: " in line:
            return f"{line.split('DataError: ', 1)[1]} ({where})"
    return message


class _NamedErrorLoader(DataLoader):
    """DataLoader whose worker failures read like the same failure in the main process.

    A file that breaks inside a worker process (deleted, truncated or replaced after the
    start-of-run check) raises :class:`DataError` whose message starts with the file's path
    -- not torch's multi-line wrapper with the traceback of the worker.
    """

    #: messages of the images skipped (``skip_bad``) since the list was last cleared
    skipped: list[str]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # workers drop the free heap they inherit: see release_inherited_heap
        kwargs.setdefault("worker_init_fn", release_inherited_heap)
        super().__init__(*args, **kwargs)

    def __iter__(self) -> Iterator:
        if not hasattr(self, "skipped"):
            self.skipped = []
        it = super().__iter__()
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except DataError as e:
                if not str(e).startswith("Caught DataError"):
                    raise  # raised in this process: already one line naming the file
                raise DataError(_worker_message(str(e))) from e
            if isinstance(batch, tuple) and len(batch) == 3:  # collate_skipping's (x, y, skipped)
                images, targets, failed = batch
                self.skipped += failed
                batch = (images, targets)
            yield batch


def collate_raw(batch: list[tuple]) -> tuple[EncodedBatch, torch.Tensor]:
    """Batch for device decoding: ``(EncodedBatch of uint8 [L_i] or [3, H_i, W_i], targets [B, C])``.

    Samples are ``(data, target, path)`` (``path`` optional)."""
    paths = [item[2] if len(item) > 2 else "" for item in batch]
    return EncodedBatch([item[0] for item in batch], paths), torch.stack([i[1] for i in batch])


class _SkippingCollate:
    """Collate that drops :class:`SkippedImage` samples: ``(images, targets, skipped messages)``.

    An all-skipped batch is ``(uint8 [0], float [0, C], messages)``: the training loop counts
    it without a step on it, so the epoch's sample accounting (and resume) is unchanged.
    """

    def __init__(self, raw: bool, num_classes: int) -> None:
        self.raw = raw
        self.num_classes = num_classes

    def __call__(self, batch: list[tuple]) -> tuple[Any, torch.Tensor, list[str]]:
        failed = [item[0].message for item in batch if isinstance(item[0], SkippedImage)]
        kept = [item for item in batch if not isinstance(item[0], SkippedImage)]
        if not kept:
            empty = EncodedBatch() if self.raw else torch.zeros(0, dtype=torch.uint8)
            return empty, torch.zeros(0, self.num_classes), failed
        if self.raw:
            return (*collate_raw(kept), failed)
        images, targets = default_collate(kept)
        return images, targets, failed


def decode_batch(
    encoded: list[torch.Tensor],
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    hflip: bool = False,
) -> torch.Tensor:
    """A ``data.gpu_decode`` batch -> normalised batch [B, 3, S, S] on ``device``.

    Encoded samples (uint8 [L]: plain JPEGs, see
    :func:`~mlic.data.transforms.device_decodable_jpeg`) are decoded together by
    ``torchvision.io.decode_jpeg`` on the device itself (nvJPEG on CUDA); samples the
    workers already decoded with :func:`decode_image` (uint8 [3, H, W]: every other file)
    are moved. Then resize, optional random horizontal flip (drawn from torch's global RNG,
    so seeded runs repeat) and normalisation, all on the device: the pixels of the normal
    evaluation pipeline. A JPEG the device decoder refuses is decoded by
    :func:`decode_image` instead, which converts it or raises DataError naming the file.
    """
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2 import functional as TF

    paths = getattr(encoded, "paths", None) or [""] * len(encoded)
    jpeg_idx = [i for i, d in enumerate(encoded) if d.ndim == 1]
    images: list[torch.Tensor | None] = [None] * len(encoded)
    if jpeg_idx:
        try:
            decoded = decode_jpeg(
                [encoded[i] for i in jpeg_idx], mode=ImageReadMode.RGB, device=device
            )
        except RuntimeError:  # one bad file fails the whole batch: find it, one at a time
            decoded = [_decode_one(encoded[i], paths[i], device) for i in jpeg_idx]
        for i, img in zip(jpeg_idx, decoded, strict=True):
            images[i] = img  # [3, H, W] uint8
    for i, d in enumerate(encoded):
        if d.ndim == 3:
            images[i] = d.to(device)  # decoded by decode_image in a worker
    if not images:
        return torch.zeros(0, 3, image_size, image_size, device=device)
    batch = torch.stack(
        [TF.resize(img, [image_size, image_size], antialias=True) for img in images]  # type: ignore[arg-type]
    )  # [B, 3, S, S] uint8
    if hflip:
        flip = torch.rand(len(encoded)) < 0.5  # [B], CPU RNG: the same on every device
        batch[flip.to(device)] = batch[flip.to(device)].flip(-1)
    return ToNormalizedFloat(mean, std).to(device)(batch)  # [B, 3, S, S] float32


def _decode_one(data: torch.Tensor, path: str, device: torch.device) -> torch.Tensor:
    """One JPEG on the device, or -- when the device decoder refuses it -- on the CPU by
    :func:`decode_image`, which names the file if it is broken. uint8 [3, H, W] on ``device``."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        if not path:
            raise DataError("a JPEG of this batch failed to decode on the device") from None
        return decode_image(path, data=data.numpy().tobytes()).to(device)


def build_loader(
    dataset: MultiLabelDataset,
    batch_size: int,
    sampler: Sampler,
    workers: int,
    drop_last: bool = False,
    pin_memory: bool = False,
) -> DataLoader:
    """DataLoader with workers, pinned memory (GPU) and persistent workers.

    A broken image raises :class:`DataError` naming the file, also from a worker process.
    """
    return _NamedErrorLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        drop_last=drop_last,
        prefetch_factor=4 if workers > 0 else None,
        collate_fn=_collate_for(dataset),
    )


def _collate_for(dataset: MultiLabelDataset) -> Callable | None:
    if dataset.skip_bad:
        return _SkippingCollate(dataset.raw_bytes, dataset.ann.num_classes)
    return collate_raw if dataset.raw_bytes else None


def _check_unique_images(ann: Annotations) -> None:
    """Refuse a split that lists one file twice (``img/a.jpg`` and ``./img/a.jpg`` included):
    with different labels one of them is wrong, and either way the file would count twice."""
    seen: dict[str, int] = {}
    for i, p in enumerate(ann.images):
        key = os.path.normpath(str(p))
        if key in seen:
            j = seen[key]
            same = (
                "the same labels"
                if (ann.targets[i] == ann.targets[j]).all()
                else "different labels"
            )
            raise DataError(
                f"{ann.source}: image {ann.images[i]} is listed twice (entries {j + 1} and "
                f"{i + 1}, {same}); keep one entry per file"
            )
        seen[key] = i


def image_folder(data_cfg, split: str) -> Path:
    """The folder the ``split``'s annotations name their images relative to: the image folder
    (``data.<split>_images``) of a CSV, COCO or OpenImages split, else a CSV's own folder, else
    the data root."""
    root = Path(data_cfg.root)
    which = data_cfg.train if split == "train" else data_cfg.val
    images = data_cfg.train_images if split == "train" else data_cfg.val_images
    if data_cfg.format == "csv":
        return root / images if images else (root / which).parent
    if data_cfg.format in ("coco", "openimages") and images:
        return root / images
    return root


def load_split(data_cfg, split: str, class_names: list[str] | None = None) -> Annotations:
    """Read the ``train`` or ``val`` split named by a :class:`~mlic.config.DataConfig`.

    ``class_names`` (the training split's classes) fixes the column order of a val split;
    a val split whose classes differ from it is an error. Which fields each format reads is
    documented on :class:`~mlic.config.DataConfig`.
    """
    from mlic.data import coco, csv, nuswide, openimages, vg, voc

    which = data_cfg.train if split == "train" else data_cfg.val
    images = data_cfg.train_images if split == "train" else data_cfg.val_images
    limit = data_cfg.max_train_images if split == "train" else data_cfg.max_val_images
    fmt = data_cfg.format
    if fmt == "demo":
        from mlic.data.demo import ensure_demo

        ann = voc.load_voc(ensure_demo(data_cfg.root), which)
    elif fmt == "voc":
        ann = voc.load_voc(data_cfg.root, which)
    elif fmt == "coco":
        if images is None:
            raise DataError(f"data.{split}_images must name the COCO image folder for {which}")
        ann = coco.load_coco(Path(data_cfg.root) / which, image_folder(data_cfg, split))
    elif fmt == "csv":
        csv_path = Path(data_cfg.root) / which
        ann = csv.load_csv(csv_path, image_folder(data_cfg, split), class_names=class_names)
    elif fmt == "vg500":
        ann = vg.load_vg500(
            data_cfg.root,
            which,
            image_dirs=[images] if images else None,
            categories_file=data_cfg.classes,
        )
    elif fmt == "nuswide":
        ann = nuswide.load_nuswide(data_cfg.root, which, image_dir=images or "Flickr")
    elif fmt == "openimages":
        if images is None:
            raise DataError(
                f"data.{split}_images must name the OpenImages image folder for {which}"
            )
        root = Path(data_cfg.root)
        ann = openimages.load_openimages(
            root / which,
            image_folder(data_cfg, split),
            classes_csv=root / data_cfg.classes if data_cfg.classes else None,
            class_names=class_names,
        )
    elif fmt in ("wds", "hf"):  # read by mlic.data.sources: there is no list of image files
        raise DataError(
            f"data.format={fmt} has no list of image files; train and eval read it directly, "
            "commands that check or list image files do not apply"
        )
    else:  # config validation lists the allowed formats
        raise DataError(f"data.format={fmt!r} is not supported")
    _check_unique_images(ann)
    if class_names is not None and ann.names != list(class_names):
        raise DataError(
            f"{ann.source}: classes differ from the training split's {list(class_names)}"
        )
    if limit is not None and limit < len(ann):
        warnings = ann.warnings
        ann = ann.subset(np.arange(limit))
        ann.warnings = list(warnings)
    return ann
