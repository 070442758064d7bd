"""Hugging Face ``datasets`` sets as training data (``data.format=hf``).

``data.root`` is one of:

* a ``save_to_disk`` folder (a ``DatasetDict`` -- ``data.train``/``data.val`` name splits -- or
  a single ``Dataset``),
* a folder of parquet files: ``data.train``/``data.val`` name a sub-folder, a glob relative to
  the folder (``data/train-*.parquet``), or a split name matched as ``**/<split>-*.parquet``
  (the Hub's own layout),
* (online) a Hub dataset id, e.g. ``org/name``; ``data.train``/``data.val`` are split names.

``data.image_column`` holds the images (``Image()`` feature or ``{"bytes", "path"}``; decoded
by mlic's own decoder from the encoded bytes) and ``data.label_column`` the labels:

* a list of class ids with ``ClassLabel`` names (``Sequence(ClassLabel(names=[...]))``),
* a list of class-name strings (classes: ``data.classes``, a file with one name per line, or
  the sorted names found in the training split),
* a multi-hot vector of 1 / 0 / -1 (-1 = ignore): a fixed-length sequence, a float sequence,
  or int rows all as long as the ``data.classes`` list (names from ``data.classes``, else
  ``"0" .. "C-1"``),
* a list of plain int ids otherwise (names from ``data.classes``, else ``"0" ..``).

Streamed sets are read in each rank's main process (``data.workers`` does not apply): inside a
torch worker ``datasets`` would give the worker only some of its shards, and the number of
samples per rank would no longer be known in advance.

Without ``data.streaming`` the label column is read once (no image is decoded) to build the
target matrix, and images are read by index: the same seeded sampler, DDP sharding and exact
resume as image files. With ``data.streaming=true`` (sets that do not fit on disk) the split
is an ``IterableDataset``: shuffled with a seeded buffer, every reader (rank x worker) reads
the stream and keeps every ``S``-th sample (``S`` readers), so the union over ranks is the
whole set and all ranks take ``ceil(N / S)`` samples rounded up to a batch (a reader that runs
out goes round again). ``N`` comes from the dataset's split info, else from one pass over the
label column; label statistics from the first 10,000 samples.
"""

from __future__ import annotations

import glob
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from mlic.data.labels import LabelSet
from mlic.data.transforms import apply_seeded, decode_image
from mlic.data.wds import _mix, record_bad_sample
from mlic.errors import DataError

__all__ = ["HFSource", "open_hf_split", "hf_datasets", "hf_eval_dataset", "HFImageDataset"]

log = logging.getLogger("mlic")

STATS_SAMPLES = 10_000
SHUFFLE_BUFFER = 1_000


def _datasets():
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - the hf extra
        raise DataError(
            "data.format=hf needs the `datasets` package: pip install 'mlic[hf]'"
        ) from e
    return datasets


@dataclass
class HFSource:
    """One split: the ``datasets`` object (map-style or streamed), its classes and targets."""

    ds: Any
    names: list[str]
    image_column: str
    label_column: str
    encode: Callable[[Any], np.ndarray]  # one row's label cell -> int8 [C] of 1/0/-1
    source: str
    streaming: bool = False
    targets: np.ndarray | None = None  # [N, C] int8 (map-style only)
    num_samples: int = 0
    stats: LabelSet | None = field(default=None, repr=False)

    def label_set(self) -> LabelSet:
        if self.stats is not None:
            return self.stats
        return LabelSet.from_targets(self.names, self.targets)  # type: ignore[arg-type]


def _is_saved(root: Path) -> bool:
    return any((root / f).exists() for f in ("dataset_dict.json", "state.json"))


def _parquet_files(root: Path, which: str) -> list[str]:
    if any(c in which for c in "*?[") or which.endswith(".parquet"):
        files = sorted(glob.glob(str(root / which), recursive=True))
    elif (root / which).is_dir():
        files = sorted(glob.glob(str(root / which / "**" / "*.parquet"), recursive=True))
    else:
        files = sorted(glob.glob(str(root / "**" / f"{which}-*.parquet"), recursive=True))
    if not files:
        raise DataError(f"{root}: no parquet files for split {which!r}")
    return files


def _load(data_cfg: Any, which: str) -> tuple[Any, str]:
    """The ``datasets`` object of split ``which`` and a description for messages."""
    datasets = _datasets()
    root = Path(data_cfg.root)
    streaming = bool(data_cfg.streaming)
    if root.is_dir() and _is_saved(root):
        ds = datasets.load_from_disk(str(root))
        if isinstance(ds, datasets.DatasetDict):
            if which not in ds:
                raise DataError(f"{root}: no split {which!r} (has {sorted(ds)})")
            ds = ds[which]
        return (
            ds.to_iterable_dataset(num_shards=max(1, min(64, len(ds)))) if streaming else ds
        ), f"{root}[{which}]"
    if root.is_dir():
        files = _parquet_files(root, which)
        ds = datasets.load_dataset("parquet", data_files={"split": files}, split="split",
                                   streaming=streaming)  # fmt: skip
        return ds, f"{root}/{which}"
    if root.exists():
        raise DataError(
            f"{root}: not a datasets folder (save_to_disk) or a folder of parquet files"
        )
    try:  # a Hub dataset id (needs the network, or the datasets cache when offline)
        ds = datasets.load_dataset(str(data_cfg.root), split=which, streaming=streaming)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(
            f"{data_cfg.root}: cannot load Hub dataset split {which!r} ({first})"
        ) from e
    return ds, f"{data_cfg.root}[{which}]"


def _classes_file(data_cfg: Any) -> list[str] | None:
    if not data_cfg.classes:
        return None
    path = Path(data_cfg.classes)
    if not path.is_absolute() and Path(data_cfg.root).is_dir():
        path = Path(data_cfg.root) / path
    if not path.exists():
        raise DataError(f"{path}: class-name file not found (data.classes)")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _label_encoder(feature: Any, column: str, source: str, first_rows: list[Any],
                   classes: list[str] | None) -> tuple[list[str], Callable[[Any], np.ndarray]]:  # fmt: skip
    """``(class names, cell -> int8 [C])`` for the label column's feature type (see module doc)."""
    datasets = _datasets()
    inner = getattr(feature, "feature", None)
    length = getattr(feature, "length", -1)
    if inner is None:
        raise DataError(f"{source}: label column {column!r} must be a list/sequence, got {feature}")
    if isinstance(inner, datasets.ClassLabel):
        names = list(classes or inner.names)
        return names, _ids_encoder(names)
    dtype = str(getattr(inner, "dtype", ""))
    if dtype in ("string", "large_string"):
        names = classes or sorted({n for row in first_rows for n in row})
        col = {n: i for i, n in enumerate(names)}

        def from_names(cell: Any) -> np.ndarray:
            t = np.zeros(len(names), np.int8)
            for n in cell:
                if n not in col:
                    raise DataError(
                        f"{source}: label {n!r} is not a known class (set data.classes)"
                    )
                t[col[n]] = 1
            return t

        return names, from_names
    rows_len = {len(r) for r in first_rows}
    multi_hot = (length not in (-1, None) or dtype.startswith("float")
                 or (classes is not None and rows_len == {len(classes)}))  # fmt: skip
    if multi_hot:
        c = length if length not in (-1, None) else (len(classes) if classes else rows_len.pop())
        names = classes or [str(i) for i in range(c)]

        def from_vector(cell: Any) -> np.ndarray:
            t = np.asarray(cell, dtype=np.float32)
            if t.shape != (len(names),) or not np.isin(t, (-1, 0, 1)).all():
                raise DataError(f"{source}: multi-hot labels must be {len(names)} values of 1/0/-1")
            return t.astype(np.int8)

        return names, from_vector
    names = classes or [
        str(i) for i in range(1 + max((max(r) for r in first_rows if r), default=0))
    ]
    return names, _ids_encoder(names)


def _ids_encoder(names: list[str]) -> Callable[[Any], np.ndarray]:
    def from_ids(cell: Any) -> np.ndarray:
        t = np.zeros(len(names), np.int8)
        t[np.asarray(cell, dtype=np.int64)] = 1
        return t

    return from_ids


def _label_cells(ds: Any, column: str, limit: int | None = None) -> list[Any]:
    if hasattr(ds, "data") and hasattr(ds.data, "column") and getattr(ds, "_indices", None) is None:
        cells = ds.data.column(column).to_pylist()  # arrow: no image is decoded
        return cells[:limit] if limit else cells
    out = []
    for row in ds.select_columns([column]):
        out.append(row[column])
        if limit and len(out) >= limit:
            break
    return out


def open_hf_split(data_cfg: Any, split: str, class_names: list[str] | None = None) -> HFSource:
    """Read split ``split`` (``train``/``val``) of an ``hf`` data config: classes, encoder and
    (map-style) the target matrix; ``class_names`` fixes the val split's class order."""
    datasets = _datasets()
    which = data_cfg.train if split == "train" else data_cfg.val
    ds, source = _load(data_cfg, which)
    features = ds.features
    img_col, lab_col = data_cfg.image_column, data_cfg.label_column
    for col in (img_col, lab_col):
        if features is None or col not in features:
            have = sorted(features) if features else "unknown"
            raise DataError(
                f"{source}: no column {col!r} (columns: {have}); set data.image_column / data.label_column"
            )
    if isinstance(features[img_col], datasets.Image):
        ds = ds.cast_column(img_col, datasets.Image(decode=False))  # encoded bytes, decoded by mlic
    classes = class_names or _classes_file(data_cfg)
    first = _label_cells(ds, lab_col, STATS_SAMPLES)
    names, encode = _label_encoder(features[lab_col], lab_col, source, first, classes)
    if class_names is not None and names != list(class_names):
        raise DataError(f"{source}: classes differ from the training split's {list(class_names)}")
    if not data_cfg.streaming:
        limit = data_cfg.max_train_images if split == "train" else data_cfg.max_val_images
        if limit is not None and limit < len(ds):
            ds = ds.select(range(limit))
        cells = _label_cells(ds, lab_col)
        targets = (
            np.stack([encode(c) for c in cells]) if cells else np.zeros((0, len(names)), np.int8)
        )
        return HFSource(ds, names, img_col, lab_col, encode, source, False, targets, len(targets))
    n = None
    info = getattr(ds, "info", None)
    if info is not None and info.splits and which in info.splits:
        n = info.splits[which].num_examples or None
    if n is None:
        n = sum(1 for _ in ds.select_columns([lab_col]))  # one pass over the labels only
    stats = LabelSet.from_targets(names, np.stack([encode(c) for c in first]))
    stats.num_images = n
    return HFSource(ds, names, img_col, lab_col, encode, source, True, None, n, stats)


def _image_bytes(cell: Any, where: str) -> tuple[bytes, str]:
    """Encoded bytes of an image cell (``{"bytes", "path"}``, bytes, or a path)."""
    if isinstance(cell, dict):
        if cell.get("bytes"):
            return cell["bytes"], cell.get("path") or where
        if cell.get("path"):
            path = Path(cell["path"])
            try:
                return path.read_bytes(), str(path)
            except OSError as e:
                raise DataError(f"{path}: cannot read image ({e.strerror})") from e
    if isinstance(cell, bytes):
        return cell, where
    if isinstance(cell, str):
        return _image_bytes({"path": cell}, where)
    raise DataError(f"{where}: image cell holds neither bytes nor a path")


class _Decode:
    def __init__(self, src: HFSource, transform: Callable | None, draft_size: int | None,
                 raw_bytes: bool) -> None:  # fmt: skip
        self.src = src
        self.transform = transform
        self.draft_size = draft_size
        self.raw_bytes = raw_bytes

    def sample(self, row: dict, where: str, seed: int | None) -> torch.Tensor:
        data, name = _image_bytes(row[self.src.image_column], where)
        if self.raw_bytes:
            return torch.frombuffer(bytearray(data), dtype=torch.uint8)  # [L]
        img = decode_image(Path(name), self.draft_size, data=data)  # [3, H, W] uint8
        return apply_seeded(self.transform, img, seed)


class HFImageDataset(Dataset):
    """Map-style: ``[(index, seed)] -> (image uint8 [3, S, S], target float [C])``, as
    :class:`~mlic.data.dataset.MultiLabelDataset` for image files."""

    def __init__(self, src: HFSource, transform: Callable | None, draft_size: int | None,
                 raw_bytes: bool = False) -> None:  # fmt: skip
        self.src = src
        self.dec = _Decode(src, transform, draft_size, raw_bytes)
        self.targets = torch.from_numpy(src.targets.astype(np.float32))  # [N, C]
        self.raw_bytes = raw_bytes

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        row = self.src.ds[int(index)]
        return self.dec.sample(row, f"{self.src.source}#{index}", seed), self.targets[index]


class HFStreamSet(IterableDataset):
    """Streamed split (see the module docstring): ``len()`` = global samples per epoch for
    training (padding included), ``set_epoch(epoch, consumed)`` for exact resume."""

    def __init__(self, src: HFSource, transform: Callable | None, draft_size: int | None,
                 train: bool, batch_size: int = 1, seed: int = 0, world_size: int = 1,
                 rank: int = 0, workers: int = 0, skip_bad: bool = False,
                 bad_log: str | Path | None = None, raw_bytes: bool = False) -> None:  # fmt: skip
        self.src = src
        self.dec = _Decode(src, transform, draft_size, raw_bytes)
        self.train = train
        self.batch_size = batch_size
        self.seed = seed
        self.world_size = world_size
        self.rank = rank
        # read in each rank's main process: inside a torch worker, ``datasets`` would hand the
        # worker only some of its shards, and the per-rank sample counts would be unknown
        del workers
        self.workers = 0
        self.skip_bad = skip_bad
        self.bad_log = str(bad_log) if bad_log else None
        self.epoch = 0
        self.start = 0
        readers = world_size * max(self.workers, 1)
        per_reader = -(-src.num_samples // readers)
        self.samples_per_reader = -(-per_reader // batch_size) * batch_size

    @property
    def readers_per_rank(self) -> int:
        return max(self.workers, 1)

    def __len__(self) -> int:
        if self.train:
            return self.world_size * self.readers_per_rank * self.samples_per_reader
        return -(-self.src.num_samples // self.world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch = epoch
        self.start = start

    def _stream(self) -> Any:
        ds = self.src.ds
        if self.train:
            ds = ds.shuffle(seed=self.seed, buffer_size=SHUFFLE_BUFFER)
            ds.set_epoch(self.epoch)
        return ds

    def _bad(self, message: str) -> None:
        record_bad_sample(message, self.skip_bad, self.bad_log, self.epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        k = self.readers_per_rank
        worker = 0 if info is None else info.id
        readers = self.world_size * k
        if not self.train:
            reader = worker * self.world_size + self.rank
            for p, row in enumerate(self._stream()):
                if p % readers == reader:
                    item = self._item(row, p, None)
                    if item is not None:
                        yield item
            return
        done = self.start // (self.batch_size * self.world_size)
        logical = (worker + done) % k  # as for shards: worker 0 continues the next batch
        reader = logical * self.world_size + self.rank
        skip = max(0, -(-(done - logical) // k)) * self.batch_size
        length = self.samples_per_reader
        q = 0  # this reader's position; the stream's p-th sample is ours when p % readers == reader
        pending: list[int] = []
        while True:
            got = False
            for p, row in enumerate(self._stream()):
                if p % readers != reader:
                    continue
                if q >= length and not pending:
                    return
                if q < skip:
                    q += 1
                    continue
                item = self._item(row, p, _mix(self.seed, self.epoch, reader, q))
                if item is None:
                    if q < length:
                        pending.append(q)
                else:
                    got = True
                    img, target = item
                    for r in pending:  # bad positions: filled with this sample, own seed
                        yield (
                            self.dec.sample(
                                row,
                                f"{self.src.source}#{p}",
                                _mix(self.seed, self.epoch, reader, r),
                            ),
                            target,
                        )
                    pending = []
                    if q < length:
                        yield img, target
                q += 1
            if q >= length and not pending:
                return
            if not got and q >= skip:
                raise DataError(f"{self.src.source}: no readable sample for reader {reader}")

    def _item(
        self, row: dict, p: int, seed: int | None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(image, target float [C])`` of a streamed row, or None for a skipped bad one."""
        try:
            target = torch.from_numpy(
                self.src.encode(row[self.src.label_column]).astype(np.float32)
            )
            return self.dec.sample(row, f"{self.src.source}#{p}", seed), target
        except DataError as e:
            self._bad(str(e))
            return None


def _stream_set(src: HFSource, d: Any, tf: Callable, size: int, train: bool, seed: int,
                world_size: int, rank: int, common: dict) -> HFStreamSet:  # fmt: skip
    rest = {k: v for k, v in common.items() if k not in ("world_size", "rank")}
    return HFStreamSet(src, tf, size, train, d.batch_size if train else 1, seed, world_size, rank,
                       d.workers, **rest)  # fmt: skip


def hf_datasets(train_src: HFSource, val_src: HFSource, d: Any, train_tf: Callable,
                eval_tf: Callable, size: int, seed: int, world_size: int, rank: int,
                common: dict) -> tuple[Dataset, Dataset]:  # fmt: skip
    """``(train, val)`` torch datasets: map-style (:class:`HFImageDataset`) or streamed."""
    if train_src.streaming:
        return (_stream_set(train_src, d, train_tf, size, True, seed, world_size, rank, common),
                _stream_set(val_src, d, eval_tf, size, False, seed, world_size, rank, common))  # fmt: skip
    raw = common.get("raw_bytes", False)
    return HFImageDataset(train_src, train_tf, size, raw), HFImageDataset(
        val_src, eval_tf, size, raw
    )


def hf_eval_dataset(src: HFSource, d: Any, tf: Callable, size: int) -> Dataset:
    """One-process evaluation dataset of a split (``mlic eval``)."""
    if src.streaming:
        return _stream_set(src, d, tf, size, False, 0, 1, 0, {"skip_bad": d.skip_bad_images})
    return HFImageDataset(src, tf, size)
