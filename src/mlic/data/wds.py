"""WebDataset tar shards: ``mlic data pack`` writes them, ``data.format=wds`` trains from them.

Why WebDataset (the ``webdataset`` library) rather than litdata: a shard is a plain POSIX tar
file any tool can list, copy, checksum or serve over HTTP/S3, with no server-side index and
no framework-specific chunk format, readable by ``webdataset`` and any other WebDataset
reader. mlic writes them with :mod:`tarfile` (fixed time stamps: the same data packs to the
same bytes) and streams ``https://`` / ``s3://`` through ``curl`` / ``aws`` itself. Reading
is a sequential pass over each tar, which is what makes a streamed ``https://`` or ``s3://``
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

**Hostile indexes and shards.** ``dataset.json`` is checked field by field (one error naming
the file and key): shard names must be plain file names inside the index's own folder (no
path, ``..``, URL or ``pipe:``; no symbolic link out of the folder), counts whole numbers in
bounds and plausible for the shard's size on disk. Only the data spec the user typed may be a
``pipe:`` command; ``https://`` and ``s3://`` run ``curl`` / ``aws s3 cp`` with an argument
list, never a shell. A tar member larger than :data:`~mlic.files.MAX_IMAGE_BYTES` (16 MiB
for ``.json``) is refused from its header, before any of it is read or decompressed; a
shard is read as plain or gzip-, bz2- or xz-compressed tar. With ``data.skip_bad_images``,
:data:`MAX_BAD_IN_A_ROW` bad samples in a row end the pass: skipping is for bad samples, not
for a dataset that holds none.

**Packing is restartable.** Each shard is written under a temporary name (``.shard-*.tar
.partial``) and renamed when complete; ``dataset.json`` comes last. A pack killed midway
leaves its lock file ``.mlic-pack``; a re-run into that folder removes what the unfinished
pack wrote and starts again.

**Bad data.** A truncated or corrupt shard raises :class:`~mlic.errors.DataError` naming the
shard (and how far it got); an undecodable image names ``shard/key.ext``. With
``data.skip_bad_images=true`` such samples are skipped -- logged, appended to the run's
``bad_samples.txt`` and counted -- and, in training, each skipped position is filled by the
next good sample of the same reader, so the step count (and resume positions) stay exact.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from mlic.data import Annotations
from mlic.data.labels import LabelSet, check_class_names
from mlic.data.transforms import apply_seeded, decode_image
from mlic.errors import DataError
from mlic.faults import maybe_kill  # a leaf module (as mlic.files uses it): the kill tests
from mlic.files import MAX_IMAGE_BYTES, file_sha256, read_regular_bytes, write_text

__all__ = [
    "INDEX_NAME",
    "MAX_BAD_IN_A_ROW",
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
PACK_LOCK = ".mlic-pack"

# Bounds on what an index or a shard may claim: a hostile file must not exhaust the machine.
#: Largest ``dataset.json`` read (bytes).
MAX_INDEX_BYTES = 1 << 30
#: Most shards one index may list, and most samples one shard may claim.
MAX_SHARDS = 1_000_000
MAX_SHARD_SAMPLES = 100_000_000
#: Largest ``.json`` (labels) member of a sample; other members: MAX_IMAGE_BYTES.
MAX_JSON_MEMBER_BYTES = 16 << 20
#: Most tar members per sample (skipped ones included) before a shard counts as corrupt.
MAX_MEMBERS_PER_SAMPLE = 64
#: Bad samples in a row after which a reader stops even with ``data.skip_bad_images``.
MAX_BAD_IN_A_ROW = 10_000
#: Most shard URLs one brace pattern may expand to.
MAX_PATTERN_URLS = 1_000_000
# A shard name in an index: one plain file name (no folder, scheme, pipe: or leading dot).
_SHARD_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+=-]{0,254}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
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


class _ShardWriter:
    """Writes ``shard-%06d.tar`` files into ``out``, each under a temporary name
    (``.shard-NNNNNN.tar.partial``) until it is complete, fsynced and renamed: a killed pack
    never leaves a truncated file under a shard's name. Members carry a fixed time stamp, so
    packing the same data with the same seed gives the same bytes (and SHA-256)."""

    def __init__(self, out: Path, max_bytes: int, max_count: int) -> None:
        self.out = out
        self.max_bytes = max_bytes
        self.max_count = max_count
        self.done: list[tuple[str, int]] = []  # (name, samples) of the complete shards
        self._file: BinaryIO | None = None
        self._tar: tarfile.TarFile | None = None
        self._count = 0
        self._size = 0

    @property
    def name(self) -> str:
        return f"shard-{len(self.done):06d}.tar"

    def _partial(self) -> Path:
        return self.out / f".{self.name}.partial"

    def write(self, key: str, members: dict[str, bytes]) -> str:
        """Add one sample (``{ext: bytes}``); returns the name of the shard it went to."""
        if self._tar is not None and (
            self._count >= self.max_count or self._size >= self.max_bytes
        ):
            self._finish()
        if self._tar is None:
            self._file = open(self._partial(), "wb")  # noqa: SIM115 -- closed by _finish/abort
            self._tar = tarfile.open(  # noqa: SIM115 -- closed by _finish
                fileobj=self._file, mode="w|", format=tarfile.USTAR_FORMAT
            )
        for ext in sorted(members):
            data = members[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            info.uname = info.gname = "bigdata"  # as webdataset's writer
            self._tar.addfile(info, io.BytesIO(data))
            self._size += len(data)
        self._count += 1
        return self.name

    def _finish(self) -> None:
        assert self._tar is not None and self._file is not None
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._partial(), self.out / self.name)
        self.done.append((self.name, self._count))
        self._tar, self._file, self._count, self._size = None, None, 0, 0

    def close(self) -> None:
        if self._tar is not None:
            self._finish()

    def abort(self) -> None:
        """Drop the shard being written (an error midway): only complete shards remain."""
        if self._file is not None:
            if self._tar is not None:
                with contextlib.suppress(Exception):  # its last blocks into the doomed file
                    self._tar.close()
            self._file.close()
            self._partial().unlink(missing_ok=True)
        self._tar = self._file = None


def _claim_pack_folder(out: Path) -> BinaryIO:
    """Lock ``out`` for one pack (``.mlic-pack``, an flock the kernel drops if the pack is
    killed); remove what an unfinished, killed pack left there. Returns the open lock file.

    A folder with ``dataset.json`` holds a finished pack, and shards without an index or a
    pack lock are not ours to remove: both are refused.
    """
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    if (out / INDEX_NAME).exists():
        raise DataError(f"{out}: already holds shards; pack into an empty folder")
    unfinished = (out / PACK_LOCK).exists()
    if not unfinished and any(out.glob("shard-*.tar")):
        raise DataError(
            f"{out}: holds shard-*.tar files but no {INDEX_NAME}, not from an unfinished "
            "`mlic data pack`; pack into an empty folder"
        )
    lock = open(out / PACK_LOCK, "a+b")  # noqa: SIM115 -- held until the pack ends
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise DataError(f"{out}: another `mlic data pack` is writing this folder") from None
    if unfinished:
        left = [
            p
            for p in out.iterdir()
            if re.fullmatch(r"(\.)?shard-\d{6}\.tar(\.partial)?", p.name) and p.is_file()
        ]
        for p in left:
            p.unlink()
        log.warning("%s: removed %d file(s) of an unfinished pack; packing again", out, len(left))
    return lock


def pack_shards(
    ann: Annotations,
    out: str | Path,
    shard_size: str | int = "1GB",
    max_samples_per_shard: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Write ``ann`` as WebDataset shards + ``dataset.json`` into ``out``; returns the index.

    Image files are copied byte for byte (no re-encoding); each must be a regular file (a
    FIFO would block the pack). Samples go in a ``seed``-ed random order. A shard is closed
    once it holds ``shard_size`` bytes (or ``max_samples_per_shard`` samples). An unreadable
    file is a DataError naming it. Restartable: see the module docstring.
    """
    from tqdm import tqdm

    out = Path(out)
    lock = _claim_pack_folder(out)
    order = np.random.default_rng(seed).permutation(len(ann))
    writer = _ShardWriter(out, parse_size(shard_size), max_samples_per_shard or 10**12)
    try:
        for done, i in enumerate(
            tqdm(order.tolist(), desc="pack", disable=not progress, unit="img")
        ):
            path = ann.images[i]
            ext = path.suffix.lower().lstrip(".") or "jpg"
            ext = "jpg" if ext == "jpeg" else ext
            if ext not in IMAGE_EXTS:
                raise DataError(f"{path}: unsupported image extension {ext!r} for a shard")
            data = read_regular_bytes(path, "image", MAX_IMAGE_BYTES)  # never a FIFO
            meta = {"target": ann.targets[i].tolist(), "path": str(path)}
            writer.write(f"{i:09d}", {ext: data, "json": json.dumps(meta).encode()})
            maybe_kill("kill_in_pack", done + 1)
        writer.close()
    except BaseException:
        writer.abort()
        lock.close()  # the lock file stays: a re-run knows the pack is unfinished
        raise
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
            for name, n in writer.done
        ],
    }
    write_text(out / INDEX_NAME, json.dumps(index, separators=(",", ":")))  # last: the pack is done
    (out / PACK_LOCK).unlink(missing_ok=True)
    lock.close()
    return index


# ----------------------------------------------------------------------------- index
@dataclass
class ShardInfo:
    """One shard: where to read it, its file name (for messages) and what the index says.

    ``local``: ``url`` is a file path (None: decided from ``url``); ``user_spec``: ``url``
    comes from the data spec the user typed, so it may be a ``pipe:`` command."""

    url: str
    name: str
    num_samples: int
    bytes: int | None = None
    sha256: str | None = None
    local: bool | None = None
    user_spec: bool = False

    def __post_init__(self) -> None:
        if self.local is None:
            self.local = not _is_url(self.url)


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

    def fingerprint(self) -> str:
        """A short hash of what the shards hold (names, counts, checksums, label statistics):
        a resume on shards re-packed with other labels sees another value."""
        import hashlib

        h = hashlib.sha256(json.dumps(self.names).encode())
        for s in self.shards:
            h.update(f"{s.name}\0{s.num_samples}\0{s.sha256 or s.bytes}\0".encode())
        h.update(np.ascontiguousarray(self.counts, dtype=np.int64).tobytes())
        h.update(np.ascontiguousarray(self.cooccurrence, dtype=np.int64).tobytes())
        return h.hexdigest()[:16]


def _is_url(spec: str) -> bool:
    return "://" in spec or spec.startswith("pipe:")


class _CommandStream(io.RawIOBase):
    """The standard output of a command as a readable stream. A non-zero exit is an OSError
    when the output ends (with the command's last error line), not a silently short file."""

    def __init__(self, args: list[str] | str, shell: bool, what: str) -> None:
        super().__init__()
        self.what = what
        self._err = tempfile.TemporaryFile()  # noqa: SIM115 -- closed by close()
        try:
            self.proc = subprocess.Popen(
                args,
                shell=shell,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=self._err,
            )
        except OSError as e:  # curl / aws not installed
            self._err.close()
            raise DataError(f"{what}: cannot run it ({e.strerror or e})") from None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        assert self.proc.stdout is not None
        n = self.proc.stdout.readinto(buffer)
        if not n:
            code = self.proc.wait()
            if code != 0:
                self._err.seek(0)
                lines = self._err.read(4096).decode("utf-8", "replace").strip().splitlines()
                raise OSError(f"{self.what} exited with status {code}: {(lines or [''])[-1][:200]}")
        return n or 0

    def close(self) -> None:
        if not self.closed:
            if self.proc.stdout is not None:
                self.proc.stdout.close()
            if self.proc.poll() is None:  # closed before the end: stop the command
                self.proc.kill()
            self.proc.wait()
            self._err.close()
        super().close()


_S3_URL = re.compile(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\x00-\x1f\x7f]*)?$")


def _command(url: str, allow_pipe: bool) -> tuple[list[str] | str, bool, str]:
    """``(command, shell?, what)`` that writes ``url``'s bytes to its standard output.

    Only a ``pipe:`` spec the user typed runs through a shell; ``http(s)://`` and ``s3://``
    run ``curl`` / ``aws`` with the URL as one argument, never pasted into a command line."""
    if url.startswith("pipe:"):
        if not allow_pipe:
            raise DataError(
                f"{url[:80]!r}: a pipe: command is accepted only as the data spec typed on the "
                "command line or in your config, never from inside a data file"
            )
        return url[len("pipe:") :], True, "pipe: command"
    if any(ord(c) < 32 or ord(c) == 127 for c in url):
        raise DataError(f"{url[:80]!r}: URL holds control characters")
    scheme = url.split("://", 1)[0].lower()
    if scheme in ("http", "https"):
        return (
            [
                "curl",
                "--fail",
                "--silent",
                "--show-error",
                "--location",
                "--proto",
                "=http,https",
                "--proto-redir",
                "=http,https",
                "--connect-timeout",
                "30",
                "--retry",
                "3",
                "--",
                url,
            ],
            False,
            "curl",
        )
    if scheme == "s3":
        if not _S3_URL.match(url):
            raise DataError(f"{url[:80]!r}: not an s3://BUCKET/KEY URL")
        return ["aws", "s3", "cp", "--only-show-errors", url, "-"], False, "aws s3 cp"
    raise DataError(
        f"{url[:80]!r}: unsupported URL scheme {scheme!r} (local paths, file://, http(s)://, "
        "s3://; pipe: only as the data spec itself)"
    )


def _open_local(path: Path, what: str = "shard") -> BinaryIO:
    """A regular file opened for reading: never a FIFO (it would block) or a device."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise DataError(f"{path}: cannot open {what} ({e.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise DataError(
            f"{path}: not a regular file (a FIFO, device or folder); not read as {what}"
        )
    return os.fdopen(fd, "rb")


def open_stream(url: str, local: bool | None = None, allow_pipe: bool = False) -> BinaryIO:
    """A readable binary stream for a local path (``local``, or no scheme), ``file://``,
    ``https://`` / ``http://`` (curl), ``s3://`` (``aws s3 cp URL -``) or -- only with
    ``allow_pipe``, for a spec the user typed -- ``pipe:COMMAND``."""
    if local or (local is None and not _is_url(url)):
        return _open_local(Path(url))
    if url.startswith("file://"):
        return _open_local(Path(url.removeprefix("file://")))
    args, shell, what = _command(url, allow_pipe)
    return io.BufferedReader(_CommandStream(args, shell, what), buffer_size=1 << 16)


def _expand(spec: str) -> list[str]:
    from itertools import islice

    from braceexpand import braceexpand

    urls = list(
        islice((u for part in spec.split("::") for u in braceexpand(part)), MAX_PATTERN_URLS + 1)
    )
    if len(urls) > MAX_PATTERN_URLS:
        raise DataError(f"{spec}: pattern names more than {MAX_PATTERN_URLS:,} shards")
    return urls


def _parent(url: str) -> str:
    return url.rsplit("/", 1)[0] if "/" in url else "."


def _brief(value: Any) -> str:
    """A short description of a JSON value for messages (never the whole of a huge one)."""
    if isinstance(value, (list, dict)):
        return f"a {'list' if isinstance(value, list) else 'mapping'} of {len(value):,} items"
    text = repr(value[:60] if isinstance(value, str) else value)
    return text[:80]


def _bad_key(where: str, key: str, problem: str) -> DataError:
    return DataError(f"{where}: key {key}: {problem}")


def _whole(value: Any, where: str, key: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _bad_key(where, key, f"must be a whole number {low:,}..{high:,}, got {_brief(value)}")
    return value


def _check_shard_entry(entry: Any, where: str, i: int) -> dict[str, Any]:
    """One ``shards[i]`` of an index, checked: a plain file name and bounded counts."""
    key = f"shards[{i}]"
    if not isinstance(entry, dict):
        raise _bad_key(
            where, key, f"must be a mapping with name and num_samples, got {_brief(entry)}"
        )
    for field in ("name", "num_samples"):
        if field not in entry:
            raise _bad_key(where, f"{key}.{field}", "missing")
    name = entry["name"]
    if not isinstance(name, str) or not _SHARD_NAME.match(name):
        raise _bad_key(
            where,
            f"{key}.name",
            f"{_brief(name)} is not a plain file name in the "
            "index's folder (no folder, .., URL or pipe:)",
        )
    n = _whole(entry["num_samples"], where, f"{key}.num_samples", 1, MAX_SHARD_SAMPLES)
    size = entry.get("bytes")
    if size is not None:
        _whole(size, where, f"{key}.bytes", 0, 1 << 50)
    sha = entry.get("sha256")
    if sha is not None and not (isinstance(sha, str) and _SHA256.match(sha)):
        raise _bad_key(where, f"{key}.sha256", f"must be 64 hex digits, got {_brief(sha)}")
    return {"name": name, "num_samples": n, "bytes": size, "sha256": sha}


def _int_array(value: Any, shape: tuple[int, ...], where: str, key: str, high: int) -> np.ndarray:
    """A JSON array of whole numbers 0..high of exactly ``shape``, as int64."""
    try:
        arr = np.array(value)
    except (ValueError, TypeError, RecursionError):
        arr = None
    if arr is None or arr.dtype.kind not in "iu" or arr.shape != shape:
        raise _bad_key(
            where, key, f"must be whole numbers of shape {list(shape)}, got {_brief(value)}"
        )
    if arr.size and (arr.min() < 0 or arr.max() > high):
        raise _bad_key(where, key, f"values must be 0..{high:,} (the samples of the shards)")
    return arr.astype(np.int64)


def _check_index(
    meta: Any, where: str
) -> tuple[list[str], list[dict[str, Any]], np.ndarray, np.ndarray]:
    """``(names, shard entries, counts [C], cooccurrence [C, C])`` of a parsed index, every
    field checked; a bad one is a DataError naming ``where`` and the key."""
    if not isinstance(meta, dict) or meta.get("format") != "mlic-wds":
        raise DataError(f"{where}: not an mlic shard index (written by `mlic data pack`)")
    for key in ("names", "shards"):
        if key not in meta:
            raise _bad_key(where, key, "missing")
    names = meta["names"]
    if not isinstance(names, list) or not names:
        raise _bad_key(
            where, "names", f"must be a non-empty list of class names, got {_brief(names)}"
        )
    names = check_class_names(names, f"{where}: key names")
    shards = meta["shards"]
    if not isinstance(shards, list) or not 1 <= len(shards) <= MAX_SHARDS:
        raise _bad_key(
            where, "shards", f"must be a list of 1..{MAX_SHARDS:,} shards, got {_brief(shards)}"
        )
    entries = [_check_shard_entry(e, where, i) for i, e in enumerate(shards)]
    seen: set[str] = set()
    for i, e in enumerate(entries):
        if e["name"] in seen:
            raise _bad_key(where, f"shards[{i}].name", f"{e['name']!r} is listed twice")
        seen.add(e["name"])
    total = sum(e["num_samples"] for e in entries)
    if (
        "num_samples" in meta
        and _whole(meta["num_samples"], where, "num_samples", 1, total) != total
    ):
        raise _bad_key(
            where, "num_samples", f"{meta['num_samples']:,}, but the shards list {total:,}"
        )
    c = len(names)
    counts = _int_array(meta.get("counts", [0] * c), (c,), where, "counts", total)
    co = meta.get("cooccurrence")
    co = (
        np.zeros((c, c), np.int64)
        if co is None
        else _int_array(co, (c, c), where, "cooccurrence", total)
    )
    return names, entries, counts, co


def _check_local_shard(path: Path, entry: dict[str, Any], where: str, i: int) -> None:
    """A local shard named by an index: a regular, non-empty file large enough for the
    samples the index claims (deflate packs at most ~1,000:1: a sample, two tar members of
    >= 1 KiB, takes >= 2 bytes even compressed). A missing file is reported when read."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise DataError(f"{path}: cannot read shard ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise DataError(
            f"{path}: not a regular file (a FIFO, device or folder); not read as a shard"
        )
    if st.st_size == 0:
        raise DataError(f"{path}: empty shard (0 bytes); pack it again or drop it from {where}")
    if entry["num_samples"] > st.st_size // 2:
        raise _bad_key(
            where,
            f"shards[{i}].num_samples",
            f"{entry['num_samples']:,} samples cannot fit in {path.name} ({st.st_size:,} bytes)",
        )


def _read_index(index_url: str, allow_pipe: bool) -> Any:
    """The parsed JSON of a shard index (bounded read); DataError naming it otherwise."""
    try:
        with open_stream(index_url, allow_pipe=allow_pipe) as f:
            raw = f.read(MAX_INDEX_BYTES + 1)
    except DataError:
        raise
    except Exception as e:  # curl/aws failures surface as OSError/ValueError
        raise DataError(f"{index_url}: cannot read the shard index ({e})") from e
    if len(raw) > MAX_INDEX_BYTES:
        raise DataError(f"{index_url}: shard index larger than {MAX_INDEX_BYTES:,} bytes")
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise DataError(f"{index_url}: not a JSON shard index ({e.msg})") from e
    except (ValueError, RecursionError) as e:  # not UTF-8; nested too deeply
        raise DataError(f"{index_url}: not a JSON shard index ({type(e).__name__})") from e


def open_shards(spec: str, index: str | None = None) -> ShardIndex:
    """Resolve ``data.train``/``data.val`` for ``wds``: a shard folder, a brace pattern or a
    URL pattern; ``index`` = the ``dataset.json`` to use (default: beside the shards).

    ``spec`` and ``index`` are what the user typed (either may be ``pipe:``); names read from
    the index never leave its folder. Every shard named must be in the index (its sample
    count is what makes equal steps possible); a missing index or shard is a DataError.
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
    names, entries, counts, co = _check_index(_read_index(index_url, True), index_url)
    shards = []
    if urls is None:
        base = Path(spec)
        inside = base.resolve()
        for i, e in enumerate(entries):
            path = base / e["name"]
            if not path.resolve().is_relative_to(inside):  # a symbolic link out of the folder
                raise _bad_key(
                    index_url, f"shards[{i}].name", f"{e['name']!r} links outside {base}"
                )
            _check_local_shard(path, e, index_url, i)
            shards.append(
                ShardInfo(
                    str(path), e["name"], e["num_samples"], e["bytes"], e["sha256"], local=True
                )
            )
    else:
        by_name = {e["name"]: (i, e) for i, e in enumerate(entries)}
        for u in urls:
            name = u.rsplit("/", 1)[-1]
            if name not in by_name:
                raise DataError(f"{u}: shard not listed in {index_url}")
            i, e = by_name[name]
            local = not _is_url(u) or u.startswith("file://")
            url = u.removeprefix("file://") if local else u
            if local:
                _check_local_shard(Path(url), e, index_url, i)
            shards.append(
                ShardInfo(
                    url,
                    name,
                    e["num_samples"],
                    e["bytes"],
                    e["sha256"],
                    local=local,
                    user_spec=True,
                )
            )
    if len(shards) != len(entries):  # a subset: statistics are the whole pack's
        log.info("%s: %d of %d shards selected", spec, len(shards), len(entries))
    return ShardIndex(names, shards, counts, co, source=spec)


# ----------------------------------------------------------------------------- reading
def _members(shard: ShardInfo) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {ext: bytes})`` per sample of a shard, in tar order (a sequential pass).

    Only image and ``.json`` members are read, each only after its header shows it within
    bounds: a member too large (a gzip bomb) or too many members for the samples the index
    lists end the shard as corrupt, nothing of them read. Raises tarfile / OS errors as they
    come; :func:`_read_positions` names the shard.
    """
    from webdataset.tariterators import base_plus_ext

    stream = open_stream(shard.url, local=shard.local, allow_pipe=shard.user_spec)
    most = (shard.num_samples + 1) * MAX_MEMBERS_PER_SAMPLE
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            key, group = None, {}
            for seen, member in enumerate(tar, 1):
                if seen > most:
                    raise tarfile.ReadError(f"more than {most:,} tar members")
                bound = MAX_JSON_MEMBER_BYTES if member.name.endswith(".json") else MAX_IMAGE_BYTES
                if member.size > bound:
                    raise tarfile.ReadError(
                        f"member {member.name[:80]} declares {member.size:,} bytes, more than "
                        f"{bound:,}; not read"
                    )
                if not member.isfile():
                    continue
                prefix, ext = base_plus_ext(member.name)
                if prefix is None:
                    continue
                if prefix != key:
                    if key is not None:
                        yield key, group
                    key, group = prefix, {}
                ext = ext.lower()
                if ext != "json" and ext not in IMAGE_EXTS:
                    group[ext] = b""  # named in messages, never read
                    continue
                f = tar.extractfile(member)
                data = f.read(member.size) if f is not None else b""
                if len(data) != member.size:
                    raise tarfile.ReadError(f"member {member.name} cut short")
                group[ext] = data
            if key is not None:
                yield key, group
    finally:
        stream.close()


def _truncation_hint(shard: ShardInfo) -> str:
    if not shard.local or shard.bytes is None:
        return ""
    try:
        size = os.path.getsize(shard.url)
    except OSError:
        return ""
    return f"; file is {size:,} bytes, index says {shard.bytes:,}" if size != shard.bytes else ""


def _check_count(shard: ShardInfo, found: int) -> None:
    """A whole local shard (its size as the index says) that ends cleanly after ``found`` of
    the samples its index claims: the index is wrong, not a sample -- refused even with
    ``data.skip_bad_images`` (its missing samples would be skipped one by one)."""
    if not shard.local or shard.bytes is None:
        return
    try:
        whole = os.path.getsize(shard.url) == shard.bytes
    except OSError:
        return
    if whole:
        raise DataError(
            f"{shard.name}: holds {found:,} samples but {INDEX_NAME} says "
            f"{shard.num_samples:,}; the index does not describe this shard"
        )


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
        _check_count(shard, pos)
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


def record_bad_sample(
    message: str, skip_bad: bool, bad_log: str | Path | None, epoch: int, in_a_row: int = 1
) -> None:
    """A bad sample of a streamed source: a DataError, or with ``skip_bad`` a warning and one
    line in ``bad_log`` (the run's ``bad_samples.txt``, when given). The ``in_a_row``-th bad
    sample without a good one between is a DataError from :data:`MAX_BAD_IN_A_ROW` on: a
    source that yields nothing readable must end the pass, not log forever."""
    if not skip_bad:
        raise DataError(message)
    if in_a_row >= MAX_BAD_IN_A_ROW:
        raise DataError(
            f"{in_a_row:,} bad samples in a row, the last: {message}; stopping "
            "(data.skip_bad_images skips bad samples, not a source with none readable)"
        )
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
        self.bad_in_a_row = 0  # bad samples since the last good one (bounded)

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
        except (ValueError, KeyError, TypeError, RecursionError) as e:  # JSON, UTF-8, nesting
            raise DataError(
                f"{shard.name}/{key}.json: unreadable labels ({type(e).__name__})"
            ) from None
        if (
            not isinstance(target, list)
            or len(target) != self.num_classes
            or any(isinstance(v, bool) or v not in (-1, 0, 1) for v in target)
        ):
            raise DataError(
                f"{shard.name}/{key}.json: target must be {self.num_classes} values of 1/0/-1"
            )
        t = torch.tensor(target, dtype=torch.float32)  # [C]
        data = members[ext]
        if self.raw_bytes:
            return torch.frombuffer(bytearray(data), dtype=torch.uint8), t  # [L]
        img = decode_image(Path(f"{shard.name}/{key}.{ext}"), self.draft_size, data=data)
        return img, t  # [3, H, W] uint8

    def _bad(self, message: str) -> None:
        """Raise, or (``skip_bad``) log and record a bad sample; too many in a row raise."""
        self.bad_in_a_row += 1
        record_bad_sample(message, self.skip_bad, self.bad_log, self.epoch, self.bad_in_a_row)

    def _transform(self, img: torch.Tensor, seed: int | None) -> torch.Tensor:
        return img if self.raw_bytes else apply_seeded(self.transform, img, seed)


class ShardTrainSet(_ShardReader):
    """Training reader: a seeded, rank- and worker-disjoint, equal-length stream of
    ``(image uint8 [3, S, S], target float [C])`` (see the module docstring).

    ``len()`` is the global number of samples per epoch, padding included, so
    ``ceil(len / (batch_size * world_size))`` is each rank's number of batches.
    ``set_epoch(epoch, start)``: ``start`` = global samples already consumed this epoch.
    """

    def __init__(
        self,
        index: ShardIndex,
        transform: Callable | None,
        draft_size: int | None,
        batch_size: int,
        seed: int = 0,
        **kw: Any,
    ) -> None:
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
            log.info(
                "%s: %d shards for %d ranks: %d data-loader workers per rank instead of %d",
                index.source,
                n,
                self.world_size,
                n // self.world_size,
                self.workers,
            )
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
                        self.bad_in_a_row = 0
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
                self.bad_in_a_row = 0
                yield self._transform(img, None), target


def verify_shards(index: ShardIndex) -> list[str]:
    """One line per problem: a local shard whose size or SHA-256 differs from the index, or
    whose tar does not deliver every sample the index lists (remote shards: the read only)."""
    problems = []
    for shard in index.shards:
        if shard.local:
            path = Path(shard.url)
            if not path.exists():
                problems.append(f"{shard.name}: missing ({path})")
                continue
            if shard.sha256 and file_sha256(path) != shard.sha256:
                problems.append(
                    f"{shard.name}: SHA-256 differs from the index{_truncation_hint(shard)}"
                )
        try:
            bad = next((p for _, _, members, p in _read_positions(shard) if members is None), None)
        except DataError as e:  # a shard the index does not describe
            bad = str(e)
        if bad:
            problems.append(bad)
    return problems
