"""WebDataset tar shards: ``mlic data pack`` writes them, ``data.format=wds`` trains from them.

Why WebDataset (the ``webdataset`` library) rather than litdata: a shard is a plain POSIX tar
file any tool can list, copy, checksum or serve over HTTP/S3, with no server-side index and
no framework-specific chunk format; ``webdataset`` writes them (``ShardWriter``), expands
brace patterns and opens ``https://`` (curl) and ``pipe:`` streams. Reading is a
sequential pass over each tar, which is what makes a streamed ``https://`` or ``s3://``
shard as cheap as a local one.

**Layout.** ``mlic data pack`` writes ``shard-000000.tar, shard-000001.tar, ...``; sample
``i`` of the split is the members ``<key>.<ext>`` (the original encoded image file, its
bytes untouched) and ``<key>.json`` (``{"target": [1, 0, -1, ...], "path": "<source file>"}``)
with ``key = f"{i:09d}"``. Samples are written in a seeded random order, so each shard is a
random mix of the split. ``dataset.json`` beside the shards holds the class names, label
statistics (positives per class, co-occurrence), and the shard list with each shard's
number of samples, size in bytes and SHA-256.

**Reading under DDP and with workers.** The ``W x K`` readers of an epoch (``W`` ranks, ``K``
data-loader workers per rank) are *slots*. Shards are dealt to slots once, largest first,
each to the slot with the fewest samples so far (balanced); every epoch a seeded
permutation decides which slot each (rank, worker) reads and in which shard order. So
every rank reads a disjoint set of shards, and the union over ranks is the whole set. To
give every rank the same number of steps (no DDP hang on uneven shards), every slot yields
exactly ``L`` samples, ``L`` = the largest slot's sample count rounded up to a whole batch:
a smaller slot goes round its shards again (padding by repetition, as torch's
``DistributedSampler`` pads). ``K`` is lowered to ``shards // W`` when there are fewer shards
than readers; fewer shards than ranks is an error. Evaluation reads every sample once.

**Determinism and resume.** Slot assignment, shard order and each sample's augmentation
seed depend only on ``(train.seed, epoch, W, K)``: the same batches with any timing. The
trainer's ``state.consumed`` (global samples done this epoch) tells each reader how many of
its samples are done; it skips whole shards by their counts in the index and the rest
member by member, without decoding. Mid-epoch resume is exact with the same ``W`` and
``data.workers`` (another world size restarts the epoch's shard assignment).

**Bad data.** A truncated or corrupt shard raises :class:`~mlic.errors.DataError` naming the
shard (and how far it got); an undecodable image names ``shard/key.ext``. With
``data.skip_bad_images=true`` such samples are skipped -- logged, appended to the run's
``bad_samples.txt`` and counted -- and, in training, each skipped position is filled by the
next good sample of the same reader, so the step count (and resume positions) stay exact.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from mlic.data import Annotations
from mlic.data.labels import LabelSet
from mlic.data.transforms import apply_seeded, decode_image
from mlic.errors import DataError
from mlic.files import file_sha256

__all__ = [
    "INDEX_NAME",
    "ShardIndex",
    "ShardInfo",
    "ShardTrainSet",
    "ShardEvalSet",
    "assign_slots",
    "open_shards",
    "pack_shards",
    "parse_size",
    "verify_shards",
]

log = logging.getLogger("mlic")

INDEX_NAME = "dataset.json"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm", "gif")
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)


# ----------------------------------------------------------------------------- packing
def parse_size(text: str | int) -> int:
    """``"1GB"`` -> 10**9, ``"512MiB"`` -> 512 * 2**20, ``"200k"`` -> 200,000 bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise DataError(
            f"shard size {text!r}: expected a number with an optional unit (1GB, 500MB)"
        )
    unit = (m.group(2) or "").lower().rstrip("b")
    base = 1024 if unit.endswith("i") else 1000
    power = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}[unit.rstrip("i")]
    size = int(float(m.group(1)) * base**power)
    if size <= 0:
        raise DataError(f"shard size {text!r} must be > 0")
    return size


def pack_shards(
    ann: Annotations,
    out: str | Path,
    shard_size: str | int = "1GB",
    max_samples_per_shard: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Write ``ann`` as WebDataset shards + ``dataset.json`` into ``out``; returns the index.

    Image files are copied byte for byte (no re-encoding). Samples go in a ``seed``-ed
    random order. A shard is closed once it holds ``shard_size`` bytes (or
    ``max_samples_per_shard`` samples). An unreadable file is a DataError naming it.
    """
    import webdataset as wds
    from tqdm import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob("shard-*.tar")) or (out / INDEX_NAME).exists():
        raise DataError(f"{out}: already holds shards; pack into an empty folder")
    order = np.random.default_rng(seed).permutation(len(ann))
    counts: dict[str, int] = {}
    writer = wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=max_samples_per_shard or 10**12,
                             maxsize=parse_size(shard_size), verbose=0, encoder=False)  # fmt: skip
    try:
        for i in tqdm(order.tolist(), desc="pack", disable=not progress, unit="img"):
            path = ann.images[i]
            try:
                data = path.read_bytes()
            except OSError as e:
                raise DataError(f"{path}: cannot read image ({e.strerror})") from e
            ext = path.suffix.lower().lstrip(".") or "jpg"
            ext = "jpg" if ext == "jpeg" else ext
            if ext not in IMAGE_EXTS:
                raise DataError(f"{path}: unsupported image extension {ext!r} for a shard")
            meta = {"target": ann.targets[i].tolist(), "path": str(path)}
            writer.write({"__key__": f"{i:09d}", ext: data, "json": json.dumps(meta).encode()})
            name = Path(writer.fname).name
            counts[name] = counts.get(name, 0) + 1
    finally:
        writer.close()
    labels = LabelSet.from_targets(ann.names, ann.targets)
    index = {
        "format": "mlic-wds",
        "version": 1,
        "names": list(ann.names),
        "num_samples": len(ann),
        "source": ann.source,
        "counts": labels.counts.tolist(),
        "cooccurrence": labels.cooccurrence.tolist(),
        "shards": [
            {
                "name": name,
                "num_samples": n,
                "bytes": (out / name).stat().st_size,
                "sha256": file_sha256(out / name),
            }
            for name, n in sorted(counts.items())
        ],  # fmt: skip
    }
    (out / INDEX_NAME).write_text(json.dumps(index, separators=(",", ":")))
    return index


# ----------------------------------------------------------------------------- index
@dataclass
class ShardInfo:
    """One shard: where to read it, its file name (for messages) and what the index says."""

    url: str
    name: str
    num_samples: int
    bytes: int | None = None
    sha256: str | None = None


@dataclass
class ShardIndex:
    """The shards of one split, in index order, and the split's classes and label statistics."""

    names: list[str]
    shards: list[ShardInfo]
    counts: np.ndarray  # [C] positives per class
    cooccurrence: np.ndarray  # [C, C]
    source: str

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    def label_set(self) -> LabelSet:
        """The training statistics models need (ML-GCN graphs, ...), from the index alone."""
        return LabelSet(
            names=list(self.names),
            counts=self.counts.astype(np.int64),
            cooccurrence=self.cooccurrence.astype(np.int64),
            num_images=self.num_samples,
        )


def _is_url(spec: str) -> bool:
    return "://" in spec or spec.startswith("pipe:")


def open_stream(url: str) -> BinaryIO:
    """A readable binary stream for a local path, ``https://`` / ``http://`` (curl),
    ``s3://`` (``aws s3 cp URL -``) or ``pipe:COMMAND`` -- webdataset's ``gopen``."""
    if not _is_url(url) or url.startswith("file://"):
        path = Path(url.removeprefix("file://"))
        try:
            return path.open("rb")
        except OSError as e:
            raise DataError(f"{path}: cannot open shard ({e.strerror})") from e
    from webdataset.gopen import gopen

    if url.startswith("s3://"):
        url = f"pipe:aws s3 cp {url} -"
    return gopen(url, "rb")


def _expand(spec: str) -> list[str]:
    from braceexpand import braceexpand

    return [u for part in spec.split("::") for u in braceexpand(part)]


def _parent(url: str) -> str:
    return url.rsplit("/", 1)[0] if "/" in url else "."


def open_shards(spec: str, index: str | None = None) -> ShardIndex:
    """Resolve ``data.train``/``data.val`` for ``wds``: a shard folder, a brace pattern or a
    URL pattern; ``index`` = the ``dataset.json`` to use (default: beside the shards).

    Every shard named must be in the index (its sample count is what makes equal steps
    possible); a missing index or shard is a DataError naming it.
    """
    local_dir = not _is_url(spec) and Path(spec).is_dir()
    if local_dir:
        urls = None
        index_url = index or str(Path(spec) / INDEX_NAME)
    else:
        urls = _expand(spec)
        if not urls:
            raise DataError(f"{spec}: no shards in this pattern")
        index_url = index or f"{_parent(urls[0])}/{INDEX_NAME}"
    try:
        with open_stream(index_url) as f:
            raw = f.read()
    except DataError:
        raise
    except Exception as e:  # curl/aws failures surface as OSError/ValueError
        raise DataError(f"{index_url}: cannot read the shard index ({e})") from e
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DataError(f"{index_url}: not a JSON shard index ({e.msg})") from e
    if not isinstance(meta, dict) or meta.get("format") != "mlic-wds":
        raise DataError(f"{index_url}: not an mlic shard index (written by `mlic data pack`)")
    by_name = {s["name"]: s for s in meta["shards"]}
    if urls is None:
        base = Path(spec)
        chosen = [(str(base / s["name"]), s) for s in meta["shards"]]
    else:
        chosen = []
        for u in urls:
            name = u.rsplit("/", 1)[-1]
            if name not in by_name:
                raise DataError(f"{u}: shard not listed in {index_url}")
            chosen.append((u, by_name[name]))
    shards = [ShardInfo(u, s["name"], int(s["num_samples"]), s.get("bytes"), s.get("sha256"))
              for u, s in chosen]  # fmt: skip
    names = list(meta["names"])
    c = len(names)
    counts = np.asarray(meta.get("counts", [0] * c), dtype=np.int64)
    co = np.asarray(meta.get("cooccurrence", np.zeros((c, c))), dtype=np.int64).reshape(c, c)
    if len(shards) != len(meta["shards"]):  # a subset: statistics are the whole pack's
        log.info("%s: %d of %d shards selected", spec, len(shards), len(meta["shards"]))
    return ShardIndex(names, shards, counts, co, source=spec)


# ----------------------------------------------------------------------------- reading
def _members(shard: ShardInfo) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {ext: bytes})`` per sample of a shard, in tar order (a sequential pass).

    Raises tarfile / OS errors as they come; :func:`_read_positions` names the shard.
    """
    from webdataset.tariterators import base_plus_ext

    stream = open_stream(shard.url)
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            key, group = None, {}
            for member in tar:
                if not member.isfile():
                    continue
                prefix, ext = base_plus_ext(member.name)
                if prefix is None:
                    continue
                f = tar.extractfile(member)
                data = f.read() if f is not None else b""
                if len(data) != member.size:
                    raise tarfile.ReadError(f"member {member.name} cut short")
                if prefix != key:
                    if key is not None:
                        yield key, group
                    key, group = prefix, {}
                group[ext.lower()] = data
            if key is not None:
                yield key, group
    finally:
        stream.close()


def _truncation_hint(shard: ShardInfo) -> str:
    if _is_url(shard.url) or shard.bytes is None:
        return ""
    try:
        size = os.path.getsize(shard.url)
    except OSError:
        return ""
    return f"; file is {size:,} bytes, index says {shard.bytes:,}" if size != shard.bytes else ""


def _read_positions(
    shard: ShardInfo, start: int = 0
) -> Iterator[tuple[int, str, dict[str, bytes] | None, str | None]]:
    """``(position, key, members or None, problem or None)`` for positions ``start ..
    num_samples - 1`` of a shard: exactly as many as the index says. Positions the tar does
    not deliver (truncated, corrupt) come with ``members=None`` and a one-line problem that
    names the shard."""
    pos = 0
    problem = None
    try:
        for key, group in _members(shard):
            if pos >= shard.num_samples:
                break
            if pos >= start:
                yield pos, key, group, None
            pos += 1
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        problem = (
            f"{shard.name}: truncated or corrupt shard after {pos} of {shard.num_samples} "
            f"samples ({e}{_truncation_hint(shard)})"
        )
    if pos < shard.num_samples and problem is None:
        problem = (
            f"{shard.name}: truncated or corrupt shard: {pos} of {shard.num_samples} samples "
            f"readable{_truncation_hint(shard)}"
        )
    for p in range(max(pos, start), shard.num_samples):
        yield p, f"#{p}", None, problem


def _mix(*values: int) -> int:
    """A deterministic 31-bit seed from integers (splitmix64 steps)."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 29
    return x & 0x7FFFFFFF


def assign_slots(counts: list[int], num_slots: int) -> list[list[int]]:
    """Deal shards (given their sample counts) to ``num_slots`` readers, largest first, each
    to the reader with the fewest samples so far. Returns shard indices per slot."""
    slots: list[list[int]] = [[] for _ in range(num_slots)]
    totals = [0] * num_slots
    for i in sorted(range(len(counts)), key=lambda i: (-counts[i], i)):
        j = totals.index(min(totals))
        slots[j].append(i)
        totals[j] += counts[i]
    return slots


def record_bad_sample(message: str, skip_bad: bool, bad_log: str | Path | None, epoch: int) -> None:
    """A bad sample of a streamed source: a DataError, or with ``skip_bad`` a warning and one
    line in ``bad_log`` (the run's ``bad_samples.txt``, when given)."""
    if not skip_bad:
        raise DataError(message)
    log.warning("skipped bad sample: %s", message)
    if bad_log:
        try:
            with open(bad_log, "a") as f:  # one short line: an atomic O_APPEND write
                f.write(f"epoch {epoch + 1}: {message}\n")
        except OSError:  # e.g. a rank on a node without the run folder: the log line stays
            pass


class _ShardReader(IterableDataset):
    """What training and evaluation readers share: decoding a sample, bad-sample handling."""

    def __init__(
        self,
        index: ShardIndex,
        transform: Callable | None,
        draft_size: int | None,
        world_size: int = 1,
        rank: int = 0,
        workers: int = 0,
        skip_bad: bool = False,
        bad_log: str | Path | None = None,
        raw_bytes: bool = False,
    ) -> None:
        self.index = index
        self.transform = transform
        self.draft_size = draft_size
        self.world_size = world_size
        self.rank = rank
        self.skip_bad = skip_bad
        self.bad_log = str(bad_log) if bad_log else None
        self.raw_bytes = raw_bytes
        self.num_classes = len(index.names)
        self.workers = workers  # data-loader worker processes (0: read in this process)
        self.epoch = 0
        self.start = 0

    @property
    def readers_per_rank(self) -> int:
        return max(self.workers, 1)

    def _worker(self) -> int:
        info = get_worker_info()
        return 0 if info is None else info.id

    def _decode(
        self, shard: ShardInfo, key: str, members: dict[str, bytes]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image uint8 [3, H, W] or encoded bytes [L], target float [C])``; DataError names
        ``shard/key.ext`` for a missing member, bad labels or an undecodable image."""
        ext = next((e for e in IMAGE_EXTS if e in members), None)
        if ext is None:
            raise DataError(f"{shard.name}/{key}: sample has no image member ({sorted(members)})")
        if "json" not in members:
            raise DataError(f"{shard.name}/{key}: sample has no .json labels")
        try:
            target = json.loads(members["json"])["target"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{shard.name}/{key}.json: unreadable labels ({e})") from e
        t = torch.tensor(target, dtype=torch.float32)  # [C]
        if t.shape != (self.num_classes,) or not bool(
            torch.isin(t, torch.tensor([-1.0, 0.0, 1.0])).all()
        ):
            raise DataError(
                f"{shard.name}/{key}.json: target must be {self.num_classes} values of 1/0/-1"
            )
        data = members[ext]
        if self.raw_bytes:
            return torch.frombuffer(bytearray(data), dtype=torch.uint8), t  # [L]
        img = decode_image(Path(f"{shard.name}/{key}.{ext}"), self.draft_size, data=data)
        return img, t  # [3, H, W] uint8

    def _bad(self, message: str) -> None:
        """Raise, or (``skip_bad``) log and record a bad sample."""
        record_bad_sample(message, self.skip_bad, self.bad_log, self.epoch)

    def _transform(self, img: torch.Tensor, seed: int | None) -> torch.Tensor:
        return img if self.raw_bytes else apply_seeded(self.transform, img, seed)


class ShardTrainSet(_ShardReader):
    """Training reader: a seeded, rank- and worker-disjoint, equal-length stream of
    ``(image uint8 [3, S, S], target float [C])`` (see the module docstring).

    ``len()`` is the global number of samples per epoch, padding included, so
    ``ceil(len / (batch_size * world_size))`` is each rank's number of batches.
    ``set_epoch(epoch, start)``: ``start`` = global samples already consumed this epoch.
    """

    def __init__(self, index: ShardIndex, transform: Callable | None, draft_size: int | None,
                 batch_size: int, seed: int = 0, **kw: Any) -> None:  # fmt: skip
        super().__init__(index, transform, draft_size, **kw)
        self.batch_size = batch_size
        self.seed = seed
        n = len(index.shards)
        if n < self.world_size:
            raise DataError(
                f"{index.source}: {n} shard(s) for {self.world_size} ranks; every rank needs at "
                "least one: pack with a smaller --shard-size"
            )
        if self.workers > n // self.world_size:
            log.info("%s: %d shards for %d ranks: %d data-loader workers per rank instead of %d",
                     index.source, n, self.world_size, n // self.world_size, self.workers)  # fmt: skip
            self.workers = n // self.world_size
        self.slots = assign_slots([s.num_samples for s in index.shards], self.num_slots)
        largest = max(sum(index.shards[i].num_samples for i in s) for s in self.slots)
        self.batches_per_reader = -(-largest // batch_size)  # ceil
        self.samples_per_reader = self.batches_per_reader * batch_size  # L

    @property
    def num_slots(self) -> int:
        return self.world_size * self.readers_per_rank

    def __len__(self) -> int:
        return self.num_slots * self.samples_per_reader

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch = epoch
        self.start = start

    def plan(self, rank: int, reader: int) -> tuple[int, list[int], int]:
        """``(slot, shard indices in reading order, samples to skip)`` for this epoch's
        ``reader``-th reader of ``rank``, after ``self.start`` global samples were consumed."""
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        slot_of = torch.randperm(self.num_slots, generator=g).tolist()
        orders = [torch.randperm(len(s), generator=g).tolist() for s in self.slots]
        k = self.readers_per_rank
        done = self.start // (self.batch_size * self.world_size)  # batches this rank has done
        # the data loader asks worker 0 first: worker w plays logical reader (w + done) % K
        logical = (reader + done) % k
        slot = slot_of[logical * self.world_size + rank]
        skip_batches = max(0, -(-(done - logical) // k))
        return slot, [self.slots[slot][i] for i in orders[slot]], skip_batches * self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        slot, order, skip = self.plan(self.rank, self._worker())
        yield from self._stream(slot, order, skip)

    def _stream(
        self, slot: int, order: list[int], skip: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        shards = [self.index.shards[i] for i in order]
        total = sum(s.num_samples for s in shards)
        length = self.samples_per_reader
        if skip >= length:
            return
        # position p of this reader's stream is sample p % total of its shards in order
        p = skip - skip % total
        pending: list[int] = []  # bad positions waiting for the next good sample
        good_in_round = 0
        while True:
            for shard in shards:
                if p >= length and not pending:
                    return
                first = max(0, skip - p)
                if first >= shard.num_samples:  # skipped by its count: never opened
                    p += shard.num_samples
                    continue
                p += first
                for _, key, members, problem in _read_positions(shard, first):
                    if p >= length and not pending:
                        return
                    sample = None
                    if members is None:
                        self._bad(problem or f"{shard.name}: unreadable sample")
                    else:
                        try:
                            sample = self._decode(shard, key, members)
                        except DataError as e:
                            self._bad(str(e))
                    if sample is None:
                        if p < length:
                            pending.append(p)
                    else:
                        good_in_round += 1
                        img, target = sample
                        for q in [*pending, p] if p < length else pending:
                            seed = _mix(self.seed, self.epoch, slot, q)
                            yield self._transform(img, seed), target
                        pending = []
                    p += 1
            if good_in_round == 0:
                names = ", ".join(s.name for s in shards)
                raise DataError(f"no readable sample in shards {names}")
            good_in_round = 0


class ShardEvalSet(_ShardReader):
    """Evaluation reader: every sample once over all ranks and workers, in index order
    (shards dealt to readers; with fewer shards than readers, samples are dealt instead)."""

    def _readers(self) -> tuple[int, int]:
        info = get_worker_info()
        k = 1 if info is None else info.num_workers
        return self.world_size * k, self._worker() * self.world_size + self.rank

    def _parts(self, num_readers: int, reader: int) -> tuple[list[ShardInfo], int, int]:
        shards = self.index.shards
        if len(shards) >= num_readers:
            mine = assign_slots([s.num_samples for s in shards], num_readers)[reader]
            return [shards[i] for i in sorted(mine)], 1, 0
        return list(shards), num_readers, reader  # every reader reads all, keeps 1 in n

    def __len__(self) -> int:
        """Samples this rank reads (over its workers)."""
        k = self.readers_per_rank
        total = 0
        for w in range(k):
            shards, every, offset = self._parts(
                self.world_size * k, w * self.world_size + self.rank
            )
            n = sum(s.num_samples for s in shards)
            total += len(range(offset, n, every))
        return total

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        shards, every, offset = self._parts(*self._readers())
        g = 0  # position over this reader's shards
        for shard in shards:
            for _, key, members, problem in _read_positions(shard):
                mine = g % every == offset
                g += 1
                if not mine:
                    continue
                if members is None:
                    self._bad(problem or f"{shard.name}: unreadable sample")
                    continue
                try:
                    img, target = self._decode(shard, key, members)
                except DataError as e:
                    self._bad(str(e))
                    continue
                yield self._transform(img, None), target


def verify_shards(index: ShardIndex) -> list[str]:
    """One line per problem: a local shard whose size or SHA-256 differs from the index, or
    whose tar does not deliver every sample the index lists (remote shards: the read only)."""
    problems = []
    for shard in index.shards:
        if not _is_url(shard.url):
            path = Path(shard.url)
            if not path.exists():
                problems.append(f"{shard.name}: missing ({path})")
                continue
            if shard.sha256 and file_sha256(path) != shard.sha256:
                problems.append(
                    f"{shard.name}: SHA-256 differs from the index{_truncation_hint(shard)}"
                )
        bad = next(
            (problem for _, _, members, problem in _read_positions(shard) if members is None), None
        )
        if bad:
            problems.append(bad)
    return problems
