"""Torch dataset, deterministic seeded sampler and data-loader construction.

Augmentation randomness is tied to (run seed, epoch, image), not to worker processes: the
sampler yields ``(index, seed)`` pairs and the dataset seeds its transform with ``seed``.
So a run gives the same batches with any number of workers and after ``--resume``, and a
DDP run shards exactly the same sequence across ranks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mlic.data import Annotations
from mlic.data.transforms import ToNormalizedFloat, decode_image
from mlic.errors import DataError

__all__ = [
    "MultiLabelDataset",
    "SeededSampler",
    "build_loader",
    "collate_raw",
    "decode_batch",
    "load_split",
]


class MultiLabelDataset(Dataset):
    """Annotations + transform -> ``(image [3, S, S] float, target [C] float of 1/0/-1)``."""

    def __init__(
        self,
        annotations: Annotations,
        transform: Callable | None = None,
        draft_size: int | None = None,
        raw_bytes: bool = False,
    ) -> None:
        """``raw_bytes``: return the encoded file as a uint8 tensor [L] instead of a decoded
        image, for decoding a whole batch on the GPU (:func:`decode_batch`)."""
        self.ann = annotations
        self.transform = transform
        self.draft_size = draft_size
        self.raw_bytes = raw_bytes
        self.targets = torch.from_numpy(annotations.targets.astype(np.float32))  # [N, C]

    def __len__(self) -> int:
        return len(self.ann)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        if self.raw_bytes:
            path = self.ann.images[index]
            try:
                data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)  # [L]
            except OSError as e:
                raise DataError(f"{path}: cannot read image ({e.strerror})") from e
            return data, self.targets[index]
        img = decode_image(self.ann.images[index], self.draft_size)  # [3, H, W] uint8
        if self.transform is not None:
            if seed is None:
                img = self.transform(img)
            else:
                # Seed the global RNG that torchvision's transforms draw from, without
                # disturbing the caller's stream (matters with workers=0).
                with torch.random.fork_rng(devices=[]):
                    # the CPU generator alone: torch.manual_seed also seeds every other
                    # backend, 60x the cost (0.057 vs 0.001 ms per sample)
                    torch.default_generator.manual_seed(seed)
                    img = self.transform(img)
        return img, self.targets[index]


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
        remaining = self.n - self.start
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

    def __iter__(self) -> Iterator:
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
            yield batch


def collate_raw(
    batch: list[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Batch of encoded files: ``(list of uint8 [L_i], targets [B, C])`` (lengths differ)."""
    return [data for data, _ in batch], torch.stack([t for _, t in batch])


def decode_batch(
    encoded: list[torch.Tensor],
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    hflip: bool = False,
) -> torch.Tensor:
    """Encoded files -> normalised batch [B, 3, S, S] on ``device``.

    JPEGs are decoded together by ``torchvision.io.decode_jpeg`` on the device itself
    (nvJPEG on CUDA); other formats are decoded on the CPU and moved. Then resize, optional
    random horizontal flip (drawn from torch's global RNG, so seeded runs repeat) and
    normalisation, all on the device. Used with ``data.gpu_decode=true``.
    """
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg
    from torchvision.transforms.v2 import functional as TF

    is_jpeg = [len(d) > 2 and int(d[0]) == 0xFF and int(d[1]) == 0xD8 for d in encoded]
    jpeg_idx = [i for i, j in enumerate(is_jpeg) if j]
    images: list[torch.Tensor | None] = [None] * len(encoded)
    if jpeg_idx:
        decoded = decode_jpeg([encoded[i] for i in jpeg_idx], mode=ImageReadMode.RGB, device=device)
        for i, img in zip(jpeg_idx, decoded, strict=True):
            images[i] = img  # [3, H, W] uint8
    for i, j in enumerate(is_jpeg):
        if not j:
            images[i] = decode_image(encoded[i], mode=ImageReadMode.RGB).to(device)
    batch = torch.stack(
        [TF.resize(img, [image_size, image_size], antialias=True) for img in images]  # type: ignore[arg-type]
    )  # [B, 3, S, S] uint8
    if hflip:
        flip = torch.rand(len(encoded)) < 0.5  # [B], CPU RNG: the same on every device
        batch[flip.to(device)] = batch[flip.to(device)].flip(-1)
    return ToNormalizedFloat(mean, std).to(device)(batch)  # [B, 3, S, S] float32


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
        collate_fn=collate_raw if dataset.raw_bytes else None,
    )


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
        ann = coco.load_coco(Path(data_cfg.root) / which, Path(data_cfg.root) / images)
    elif fmt == "csv":
        csv_path = Path(data_cfg.root) / which
        image_dir = Path(data_cfg.root) / images if images else csv_path.parent
        ann = csv.load_csv(csv_path, image_dir, class_names=class_names)
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
            root / images,
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
    if class_names is not None and ann.names != list(class_names):
        raise DataError(
            f"{ann.source}: classes differ from the training split's {list(class_names)}"
        )
    if limit is not None and limit < len(ann):
        warnings = ann.warnings
        ann = ann.subset(np.arange(limit))
        ann.warnings = list(warnings)
    return ann
