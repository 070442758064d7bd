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

Labels are right or refused, naming the row and column: a class id must be a whole number
``0 .. C-1`` (a negative id is not "the last class"; without names at most
:data:`~mlic.data.labels.MAX_INFERRED_CLASSES` classes are inferred from ids). An int column is
multi-hot when its values are all 1 / 0 / -1 and its rows as long as ``data.classes`` (or,
without names, when a row repeats a value or holds -1); then every row must have that length.
Class names that differ only by case or surrounding whitespace are refused.

An image cell with encoded bytes is decoded from them. A cell with only a ``path`` is read
only when that path lies inside the dataset's own folder (``data.root``; for a Hub id, the
Hugging Face caches) and is a regular file: a downloaded dataset cannot make mlic read
``/etc/passwd`` or block on a FIFO.

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
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from mlic.data.labels import MAX_INFERRED_CLASSES, LabelSet, check_class_names
from mlic.data.transforms import apply_seeded, decode_image
from mlic.data.wds import _mix, record_bad_sample
from mlic.errors import DataError, missing_extra
from mlic.files import MAX_ANNOTATION_BYTES, MAX_IMAGE_BYTES, read_regular_bytes, read_regular_text

__all__ = ["HFSource", "open_hf_split", "hf_datasets", "hf_eval_dataset", "HFImageDataset"]

log = logging.getLogger("mlic")

STATS_SAMPLES = 10_000
SHUFFLE_BUFFER = 1_000
#: Most rows a streamed split's metadata may claim (its split info is a file too).
MAX_STREAM_ROWS = 10**10


def _datasets():
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - the hf extra
        raise (missing_extra("datasets", "data.format=hf") or e) from e
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
    image_roots: tuple[Path, ...] = ()  # folders path-only image cells may name

    def label_set(self) -> LabelSet:
        if self.stats is not None:
            return self.stats
        return LabelSet.from_targets(self.names, self.targets)  # type: ignore[arg-type]

    def fingerprint(self) -> str:
        """A short hash of the split's labels (all rows; streamed: the first rows'
        statistics and the row count): a resume on relabelled data sees another value."""
        import hashlib

        h = hashlib.sha256(f"{self.names}\0{self.num_samples}".encode())
        if self.targets is not None:
            h.update(np.ascontiguousarray(self.targets, dtype=np.int8).tobytes())
        else:
            stats = self.label_set()
            h.update(np.ascontiguousarray(stats.cooccurrence, dtype=np.int64).tobytes())
            h.update(np.ascontiguousarray(stats.counts, dtype=np.int64).tobytes())
        return h.hexdigest()[:16]


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


def _load(data_cfg: Any, which: str) -> tuple[Any, str, int | None]:
    """The ``datasets`` object of split ``which``, a description for messages and, where
    known from the data itself, its number of rows."""
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
            (ds.to_iterable_dataset(num_shards=max(1, min(64, len(ds)))) if streaming else ds),
            f"{root}[{which}]",
            len(ds),
        )
    if root.is_dir():
        files = _parquet_files(root, which)
        ds = datasets.load_dataset(
            "parquet", data_files={"split": files}, split="split", streaming=streaming
        )
        return ds, f"{root}/{which}", None
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
    return ds, f"{data_cfg.root}[{which}]", None


def _image_roots(data_cfg: Any) -> tuple[Path, ...]:
    """Where path-only image cells may point: the dataset's folder, or for a Hub id the
    Hugging Face caches its files were downloaded and extracted to."""
    root = Path(data_cfg.root)
    if root.is_dir():
        return (root.resolve(),)
    import datasets.config
    from huggingface_hub import constants

    return tuple(
        Path(p).resolve() for p in (datasets.config.HF_DATASETS_CACHE, constants.HF_HUB_CACHE)
    )


def _classes_file(data_cfg: Any) -> list[str] | None:
    if not data_cfg.classes:
        return None
    path = Path(data_cfg.classes)
    if not path.is_absolute() and Path(data_cfg.root).is_dir():
        path = Path(data_cfg.root) / path
    if not path.exists():
        raise DataError(f"{path}: class-name file not found (data.classes)")
    text = read_regular_text(path, "class-name file", MAX_ANNOTATION_BYTES)
    return check_class_names(
        [line.strip() for line in text.splitlines() if line.strip()], str(path)
    )


class _CellError(ValueError):
    """A label cell that cannot be encoded; the caller names its row and column."""


def _ids(cell: Any) -> list[int]:
    """A cell's class ids as ints (numpy ints accepted; bools, floats, text refused)."""
    if cell is None or isinstance(cell, (str, bytes)):
        raise _CellError(f"expected a list of class ids, got {cell!r:.60}")
    out = []
    for v in cell:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise _CellError(f"class id {v!r:.40} is not a whole number")
        out.append(int(v))
    return out


def _ids_encoder(c: int) -> Callable[[Any], np.ndarray]:
    def from_ids(cell: Any) -> np.ndarray:
        t = np.zeros(c, np.int8)
        for v in _ids(cell):
            if not 0 <= v < c:
                raise _CellError(
                    f"class id {v} is {'negative' if v < 0 else 'out of range'} "
                    f"(the {c} classes have ids 0..{c - 1})"
                )
            t[v] = 1
        return t

    return from_ids


def _vector_encoder(c: int) -> Callable[[Any], np.ndarray]:
    def from_vector(cell: Any) -> np.ndarray:
        if cell is None or isinstance(cell, (str, bytes)):
            raise _CellError(f"expected a multi-hot list, got {cell!r:.60}")
        t = np.asarray(cell, dtype=np.float32)
        if t.shape != (c,):
            raise _CellError(f"multi-hot row of length {t.size}, the column's rows have {c}")
        if not np.isin(t, (-1, 0, 1)).all():
            raise _CellError(f"multi-hot labels must be 1/0/-1, got {sorted(set(t.tolist()))[:5]}")
        return t.astype(np.int8)

    return from_vector


def encode_cell(src: HFSource | tuple[Callable, str, str], cell: Any, row: int) -> np.ndarray:
    """``encode(cell)``, or a DataError naming the split, ``row`` and the label column."""
    encode, source, column = (
        (src.encode, src.source, src.label_column) if isinstance(src, HFSource) else src
    )
    try:
        return encode(cell)
    except (_CellError, TypeError, ValueError) as e:
        raise DataError(f"{source}: row {row}, column {column!r}: {e}") from None


def _numeric_encoder(
    rows: list[Any], length: int | None, is_float: bool, classes: list[str] | None, where: str
) -> tuple[list[str], Callable[[Any], np.ndarray]]:
    """Multi-hot or class-id encoder for an int/float list column (see the module doc)."""
    rows = [r for r in rows if r is not None and not isinstance(r, (str, bytes))]
    lengths = Counter(len(r) for r in rows)
    common = lengths.most_common(1)[0][0] if lengths else 0
    ternary = all(v in (-1, 0, 1) for r in rows for v in r)
    # an id list never repeats an id or holds -1; a multi-hot row does (ternary: hashable)
    marked = ternary and any(-1 in r or len(set(r)) < len(r) for r in rows)
    fixed = length not in (-1, None)
    by_names = classes is not None and common == len(classes)
    if (
        fixed
        or is_float
        or (ternary and common >= 2 and (by_names or (classes is None and marked)))
    ):
        c = length if fixed else (len(classes) if classes else common)
        if classes is not None and c != len(classes):
            raise DataError(f"{where}: rows have {c} values, data.classes lists {len(classes)}")
        if c > MAX_INFERRED_CLASSES and classes is None:
            raise DataError(f"{where}: {c:,} values per row; give the class names (data.classes)")
        return classes or [str(i) for i in range(c)], _vector_encoder(c)
    if classes is not None:
        return classes, _ids_encoder(len(classes))
    top = 0
    for i, r in enumerate(rows):
        for v in r:
            if isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= top:
                if v >= MAX_INFERRED_CLASSES:
                    raise DataError(
                        f"{where}: row {i}: class id {v} -- at most {MAX_INFERRED_CLASSES:,} "
                        "classes are inferred from ids; give the class names (data.classes)"
                    )
                top = int(v)
    return [str(i) for i in range(top + 1)], _ids_encoder(top + 1)


def _label_encoder(
    feature: Any, column: str, source: str, first_rows: list[Any], classes: list[str] | None
) -> tuple[list[str], Callable[[Any], np.ndarray]]:
    """``(class names, cell -> int8 [C])`` for the label column's feature type (see module doc)."""
    datasets = _datasets()
    inner = getattr(feature, "feature", None)
    length = getattr(feature, "length", -1)
    where = f"{source}, column {column!r}"
    if inner is None:
        raise DataError(f"{source}: label column {column!r} must be a list/sequence, got {feature}")
    if isinstance(inner, datasets.ClassLabel):
        names = check_class_names(list(classes or inner.names), where)
        return names, _ids_encoder(len(names))
    dtype = str(getattr(inner, "dtype", ""))
    if dtype in ("string", "large_string"):
        names = classes or sorted({n for row in first_rows if row for n in row})
        names = check_class_names(names, where)
        col = {n: i for i, n in enumerate(names)}

        def from_names(cell: Any) -> np.ndarray:
            t = np.zeros(len(names), np.int8)
            for n in cell:
                if n not in col:
                    raise _CellError(f"label {n!r:.80} is not a known class (set data.classes)")
                t[col[n]] = 1
            return t

        return names, from_names
    names, encode = _numeric_encoder(first_rows, length, dtype.startswith("float"), classes, where)
    return check_class_names(names, where), encode


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
    ds, source, rows = _load(data_cfg, which)
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
    how = (encode, source, lab_col)
    roots = _image_roots(data_cfg)
    if not data_cfg.streaming:
        limit = data_cfg.max_train_images if split == "train" else data_cfg.max_val_images
        if limit is not None and limit < len(ds):
            ds = ds.select(range(limit))
        cells = _label_cells(ds, lab_col)
        targets = (
            np.stack([encode_cell(how, c, i) for i, c in enumerate(cells)])
            if cells
            else np.zeros((0, len(names)), np.int8)
        )
        return HFSource(
            ds,
            names,
            img_col,
            lab_col,
            encode,
            source,
            False,
            targets,
            len(targets),
            image_roots=roots,
        )
    n = rows or _split_rows(ds, which, source)
    if n is None:
        n = sum(1 for _ in ds.select_columns([lab_col]))  # one pass over the labels only
    stats = LabelSet.from_targets(
        names, np.stack([encode_cell(how, c, i) for i, c in enumerate(first)])
    )
    stats.num_images = n
    return HFSource(ds, names, img_col, lab_col, encode, source, True, None, n, stats, roots)


def _split_rows(ds: Any, which: str, source: str) -> int | None:
    """The row count a streamed split's metadata states (checked against the stream as it
    is read: :class:`HFStreamSet`), bounded; None when it states none."""
    info = getattr(ds, "info", None)
    if info is None or not info.splits or which not in info.splits:
        return None
    n = info.splits[which].num_examples
    if n is None or n == 0:
        return None
    if isinstance(n, bool) or not isinstance(n, int) or not 0 < n <= MAX_STREAM_ROWS:
        raise DataError(
            f"{source}: split info num_examples={n!r:.40} is not a row count 1..{MAX_STREAM_ROWS:,}"
        )
    return n


def _cell_path(text: str, where: str, roots: tuple[Path, ...]) -> Path:
    """The file a path-only image cell names, if it lies inside ``roots`` (relative paths:
    from the first); else a DataError. Symbolic links are resolved before the check."""
    path = Path(text)
    if not path.is_absolute():
        if not roots:
            raise DataError(f"{where}: relative image path {text!r:.200} and no dataset folder")
        path = roots[0] / path
    real = path.resolve()
    if not any(real.is_relative_to(r) for r in roots):
        raise DataError(
            f"{where}: image path {text!r:.200} is outside the dataset's folder "
            f"({roots[0] if roots else 'none'}); store the image bytes in the dataset"
        )
    return real


def _image_bytes(cell: Any, where: str, roots: tuple[Path, ...] = ()) -> tuple[bytes, str]:
    """Encoded bytes of an image cell (``{"bytes", "path"}``, bytes, or a path); a path is
    read only inside ``roots`` and only from a regular file (see the module docstring)."""
    if isinstance(cell, dict):
        if cell.get("bytes"):
            return cell["bytes"], str(cell.get("path") or where)
        if cell.get("path"):
            path = _cell_path(str(cell["path"]), where, roots)
            return read_regular_bytes(path, "image", MAX_IMAGE_BYTES), str(path)
    if isinstance(cell, bytes):
        return cell, where
    if isinstance(cell, str):
        return _image_bytes({"path": cell}, where, roots)
    raise DataError(f"{where}: image cell holds neither bytes nor a path")


class _Decode:
    def __init__(
        self, src: HFSource, transform: Callable | None, draft_size: int | None, raw_bytes: bool
    ) -> None:
        self.src = src
        self.transform = transform
        self.draft_size = draft_size
        self.raw_bytes = raw_bytes

    def sample(self, row: dict, where: str, seed: int | None) -> torch.Tensor:
        data, name = _image_bytes(row[self.src.image_column], where, self.src.image_roots)
        if self.raw_bytes:
            return torch.frombuffer(bytearray(data), dtype=torch.uint8)  # [L]
        img = decode_image(Path(name), self.draft_size, data=data)  # [3, H, W] uint8
        return apply_seeded(self.transform, img, seed)


class HFImageDataset(Dataset):
    """Map-style: ``[(index, seed)] -> (image uint8 [3, S, S], target float [C])``, as
    :class:`~mlic.data.dataset.MultiLabelDataset` for image files."""

    def __init__(
        self,
        src: HFSource,
        transform: Callable | None,
        draft_size: int | None,
        raw_bytes: bool = False,
    ) -> None:
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

    def __init__(
        self,
        src: HFSource,
        transform: Callable | None,
        draft_size: int | None,
        train: bool,
        batch_size: int = 1,
        seed: int = 0,
        world_size: int = 1,
        rank: int = 0,
        workers: int = 0,
        skip_bad: bool = False,
        bad_log: str | Path | None = None,
        raw_bytes: bool = False,
    ) -> None:
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
        self.bad_in_a_row = 0
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
        self.bad_in_a_row += 1  # bounded: a stream of nothing but bad rows ends the pass
        record_bad_sample(message, self.skip_bad, self.bad_log, self.epoch, self.bad_in_a_row)

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
            got, rows = False, 0
            for p, row in enumerate(self._stream()):
                rows = p + 1
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
            if rows < self.src.num_samples:  # the split info over-counts: no endless rounds
                raise DataError(
                    f"{self.src.source}: its split info says {self.src.num_samples:,} rows, the "
                    f"stream ended after {rows:,}"
                )
            if not got and q >= skip:
                raise DataError(f"{self.src.source}: no readable sample for reader {reader}")

    def _item(
        self, row: dict, p: int, seed: int | None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(image, target float [C])`` of a streamed row, or None for a skipped bad one."""
        try:
            target = torch.from_numpy(
                encode_cell(self.src, row[self.src.label_column], p).astype(np.float32)
            )
            item = self.dec.sample(row, f"{self.src.source}#{p}", seed), target
        except DataError as e:
            self._bad(str(e))
            return None
        self.bad_in_a_row = 0
        return item


def _stream_set(
    src: HFSource,
    d: Any,
    tf: Callable,
    size: int,
    train: bool,
    seed: int,
    world_size: int,
    rank: int,
    common: dict,
) -> HFStreamSet:
    rest = {k: v for k, v in common.items() if k not in ("world_size", "rank")}
    return HFStreamSet(
        src,
        tf,
        size,
        train,
        d.batch_size if train else 1,
        seed,
        world_size,
        rank,
        d.workers,
        **rest,
    )


def hf_datasets(
    train_src: HFSource,
    val_src: HFSource,
    d: Any,
    train_tf: Callable,
    eval_tf: Callable,
    size: int,
    seed: int,
    world_size: int,
    rank: int,
    common: dict,
) -> tuple[Dataset, Dataset]:
    """``(train, val)`` torch datasets: map-style (:class:`HFImageDataset`) or streamed."""
    if train_src.streaming:
        return (
            _stream_set(train_src, d, train_tf, size, True, seed, world_size, rank, common),
            _stream_set(val_src, d, eval_tf, size, False, seed, world_size, rank, common),
        )
    raw = common.get("raw_bytes", False)
    return HFImageDataset(train_src, train_tf, size, raw), HFImageDataset(
        val_src, eval_tf, size, raw
    )


def hf_eval_dataset(src: HFSource, d: Any, tf: Callable, size: int) -> Dataset:
    """One-process evaluation dataset of a split (``mlic eval``)."""
    if src.streaming:
        return _stream_set(src, d, tf, size, False, 0, 1, 0, {"skip_bad": d.skip_bad_images})
    return HFImageDataset(src, tf, size)
