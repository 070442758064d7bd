"""Safe file I/O: atomic writes with one-line failures, and reads of regular files only.

Every file mlic writes (checkpoints, resume states, predictions, reports, metrics, exports,
statistics) goes through :func:`atomic_write`: the content is written to a temporary file in
the target's folder, fsynced, and renamed over the target. A crash, a full disk or a
permission problem therefore never leaves a half-written file, and the previous file (if
any) survives; the failure is a :class:`~mlic.errors.WriteError` naming the file and the
cause, not a traceback from deep inside a serialiser.

Every file mlic reads as an image, annotation, config or checkpoint is opened through
:func:`require_regular_file` / :func:`read_regular_bytes`: a FIFO, socket or device named
``x.jpg`` would block a reader forever (or stream without end); these refuse anything that
is not a regular file and anything larger than a size bound, naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlic.errors import ConfigError, DataError, MlicError, RunBusyError, WriteError
from mlic.faults import maybe_kill

__all__ = [
    "MAX_ANNOTATION_BYTES",
    "MAX_IMAGE_BYTES",
    "RUN_FILES",
    "RUN_LOCK",
    "RunLock",
    "atomic_write",
    "display_path",
    "is_run_folder",
    "location_problem",
    "path_inside",
    "refuse_run_file",
    "read_regular_bytes",
    "read_regular_text",
    "require_regular_file",
    "file_sha256",
    "save_npy",
    "savefig",
    "write_text",
]

#: Largest image file mlic opens (bytes). The largest images accepted by pixel count
#: (:data:`~mlic.data.transforms.MAX_IMAGE_PIXELS`, ~179 MP) are far smaller as JPEG/PNG.
MAX_IMAGE_BYTES = 1 << 30
#: Largest annotation / config / JSON file mlic parses (bytes); COCO 2017 train is ~450 MB.
MAX_ANNOTATION_BYTES = 4 << 30


def _write_cause(e: BaseException) -> str:
    """A short human cause for a failed write: disk full, permission denied, ..."""
    if isinstance(e, OSError) and e.errno is not None:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return "disk full (no space left on device)"
        if e.errno in (errno.EACCES, errno.EPERM):
            return "permission denied"
        if e.errno == errno.EROFS:
            return "read-only file system"
        return e.strerror or str(e)
    first = (str(e).strip().splitlines() or [type(e).__name__])[-1].strip()
    # torch.save on a full disk: "PytorchStreamWriter failed writing file data/0: file write failed"
    return f"{type(e).__name__}: {first}"


def _disk_full(folder: Path) -> bool:
    try:
        return os.statvfs(folder).f_bavail == 0
    except OSError:
        return False


_IO_MARKERS = (
    "write failed",
    "PytorchStreamWriter",
    "inline_container",
    "No space",
    "I/O error",
    "Permission denied",
    "Read-only file system",
    "Disk quota",
)


def _is_io_failure(e: BaseException, folder: Path) -> bool:
    """Whether ``e`` (raised while writing) is the file system's failure, not a program error.

    ``OSError`` always is; serialisers wrap it in their own types (torch.save: a
    ``RuntimeError`` from its C++ stream writer; safetensors: ``SafetensorError``), recognised
    by their message or by a full disk.
    """
    if isinstance(e, OSError):
        return True
    text = str(e)
    return any(m in text for m in _IO_MARKERS) or _disk_full(folder)


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp_path)`` then atomically rename ``tmp_path`` to ``path``.

    The temporary file is in the same folder (so the rename is atomic), fsynced before the
    rename, given the usual file mode, and removed on any failure; the previous ``path`` is
    untouched unless the whole write succeeded. An ``OSError`` or a serialiser's error while
    writing raises :class:`WriteError` ``"<path>: cannot write (<cause>)"``.
    """
    path = Path(path)
    tmp_path: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        write(tmp_path)
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        maybe_kill("kill_in_write", path.name)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp_path, path)
    except MlicError:
        raise
    except Exception as e:
        if not _is_io_failure(e, path.parent):
            raise  # a bug in the serialiser or the caller: keep its traceback
        cause = _write_cause(e)
        if not isinstance(e, OSError) and _disk_full(path.parent):
            cause = f"disk full (no space left on device; {cause})"
        raise WriteError(f"{path}: cannot write ({cause}); any previous file is unchanged") from e
    finally:
        if tmp_path is not None and tmp_path.exists():
            tmp_path.unlink()
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; a non-UTF-8 file name in ``text``
    (surrogate escapes) is written as ``\\udcNN`` rather than failing the write."""
    return atomic_write(
        path, lambda tmp: tmp.write_text(text, encoding="utf-8", errors="backslashreplace")
    )


def save_npy(path: str | Path, array: Any) -> Path:
    """``np.save`` to ``path`` atomically (no pickle: object arrays are refused by numpy)."""
    import numpy as np

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)

    return atomic_write(path, write)


def savefig(fig: Any, path: str | Path, **kwargs: Any) -> Path:
    """``fig.savefig`` to ``path`` atomically; the format comes from ``path``'s suffix."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, **kwargs))


# ----------------------------------------------------------------------------- reading
def _a(what: str) -> str:
    return f"an {what}" if what[:1] in "aeiou" else f"a {what}"


def require_regular_file(
    path: str | Path, what: str = "file", max_bytes: int | None = None, error: type = DataError
) -> int:
    """Raise ``error`` naming ``path`` unless it is an existing regular file of at most
    ``max_bytes``; return its size. Symbolic links are followed (to a regular file: fine)."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except PermissionError:
        raise error(f"{path}: permission denied") from None
    except OSError as e:
        raise error(f"{path}: cannot read {what} ({e.strerror or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{path}: is a folder, not {_a(what)}")
    if not stat.S_ISREG(st.st_mode):
        kind = (
            "a FIFO (named pipe)"
            if stat.S_ISFIFO(st.st_mode)
            else "a socket"
            if stat.S_ISSOCK(st.st_mode)
            else "a device"
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
            else "not a regular file"
        )
        raise error(f"{path}: is {kind}, not a regular file; refusing to open it as {_a(what)}")
    if max_bytes is not None and st.st_size > max_bytes:
        raise error(f"{path}: {what} too large ({st.st_size:,} bytes > {max_bytes:,})")
    return st.st_size


def read_regular_bytes(
    path: str | Path, what: str = "file", max_bytes: int | None = None, error: type = DataError
) -> bytes:
    """The bytes of ``path``, which must be a regular file of at most ``max_bytes``.

    Opened with ``O_NONBLOCK`` and checked with ``fstat`` on the open descriptor, so a FIFO
    swapped in after a check can not block the reader either.
    """
    path = Path(path)
    require_regular_file(path, what, max_bytes, error)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except PermissionError:
        raise error(f"{path}: permission denied") from None
    except OSError as e:
        raise error(f"{path}: cannot read {what} ({e.strerror or e})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{path}: not a regular file; refusing to read it as {_a(what)}")
        if max_bytes is not None and st.st_size > max_bytes:
            raise error(f"{path}: {what} too large ({st.st_size:,} bytes > {max_bytes:,})")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    except OSError as e:
        raise error(f"{path}: cannot read {what} ({e.strerror or e})") from None
    finally:
        os.close(fd)
    if max_bytes is not None and len(data) > max_bytes:
        raise error(f"{path}: {what} too large (> {max_bytes:,} bytes)")
    return data


def read_regular_text(
    path: str | Path,
    what: str = "file",
    max_bytes: int | None = MAX_ANNOTATION_BYTES,
    error: type = DataError,
) -> str:
    """The UTF-8 text of a regular file (see :func:`read_regular_bytes`); bad UTF-8 names the file."""
    data = read_regular_bytes(path, what, max_bytes, error)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise error(f"{path}: {what} is not UTF-8 text (byte {e.start})") from None


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks (checkpoint hashes, shard checksums)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- names and places
def display_path(path: str | Path) -> str:
    """``path`` as printable UTF-8 text: bytes of a file name that are not UTF-8 (kept by
    Python as surrogate escapes) become ``\\xNN``, so a CSV, a JSON line or a terminal can
    hold the name; UTF-8 names are unchanged."""
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def location_problem(value: str, patterns: bool = True) -> str | None:
    """Why ``value``, read from a file (a downloaded config, a shard index), may not be used
    as a data location; None when it is a plain path relative to the folder it describes.

    Such a file may only name places inside that folder: not a ``pipe:`` command, not a URL
    (``s3://``, ``https://``, ``file:``), not an absolute or ``~`` path, no ``..`` component,
    no brace pattern (it could expand to ``..``) and no control characters. Values the user
    typed are not checked here: only they may point elsewhere.
    """
    text = str(value)
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        return "holds control characters"
    if text.startswith("pipe:"):
        return "is a pipe: command"
    if "://" in text or _SCHEME.match(text):
        return "is a URL"
    if text.startswith(("/", "\\")):
        return "is an absolute path"
    if text.startswith("~"):
        return "is a home-folder path"
    if ".." in re.split(r"[/\\]", text):
        return "leaves its folder (..)"
    if patterns and ("{" in text or "}" in text):
        return "is a brace pattern"
    return None


def path_inside(folder: str | Path, name: str, where: str) -> Path:
    """``folder / name`` for a file name read from an annotation row (CSV, COCO's
    ``file_name``, VOC's ``<filename>``, a list file), refusing a name that would leave the
    folder (absolute, ``~``, ``..``, a URL or ``pipe:``): a data file names only files inside
    the folder it describes. ``where`` names the file and line or key for the error."""
    problem = location_problem(name, patterns=False)  # braces are never expanded here
    if problem:
        raise DataError(
            f"{where}: image {name[:120]!r} {problem}; image paths in annotations are "
            f"relative to {display_path(folder)} and stay inside it (point data.root, "
            "data.train_images or data.val_images at the folder that holds them)"
        )
    return Path(folder) / name


#: What a training run writes in its folder (:mod:`mlic.engine.trainer`); no other
#: command may write over these (``RUN_LOCK`` exists while a run holds the folder).
RUN_LOCK = ".mlic.lock"
RUN_FILES = frozenset(
    {
        *("config.yaml", "metrics.csv", "report.md", "bad_images.txt", "bad_samples.txt"),
        *("best.safetensors", "last.resume.pt", "best_val_scores.npy", "val_targets.npy"),
        *("best_calib_scores.npy", "calib_targets.npy"),
        *("per_class_ap.png", "pr_curves.png", "labels", "tb", RUN_LOCK),
    }
)


def is_run_folder(folder: str | Path) -> bool:
    """Whether ``folder`` is a training run's folder (its ``config.yaml`` and run state)."""
    folder = Path(folder)
    if not (folder / "config.yaml").is_file():
        return False
    marks = ("best.safetensors", "last.resume.pt", "metrics.csv", "labels", RUN_LOCK)
    return any((folder / m).exists() for m in marks)


def refuse_run_file(path: str | Path, option: str, inputs: tuple[str | Path, ...] = ()) -> None:
    """Raise ConfigError when writing ``path`` (given as ``option``) would replace a file a
    training run owns (``RUN_FILES`` in a run folder, or anything under its ``labels/``,
    ``tb/``) or one of the command's own ``inputs``. Called before any work is done."""
    target = Path(os.path.abspath(path))
    resolved = target.resolve()
    for where in {target, resolved}:
        for folder in where.parents:
            if is_run_folder(folder):
                owned = where.relative_to(folder).parts[0]
                if owned in RUN_FILES:
                    raise ConfigError(
                        f"{option} {display_path(path)}: would replace {owned} of the training "
                        f"run in {display_path(folder)}; choose another file name"
                    )
                break
    for given in inputs:
        if Path(str(given)).exists() and resolved == Path(str(given)).resolve():
            raise ConfigError(
                f"{option} {display_path(path)}: is the command's own input; choose another file"
            )


class RunLock:
    """An exclusive ``fcntl.flock`` on ``<folder>/.mlic.lock`` for as long as a run writes
    the folder: a second process asking for it fails at once with one line naming the
    folder and the holder's pid. The kernel drops the lock when the holder exits or
    crashes, so a killed run never leaves the folder locked.

    Folders made for the lock are removed again on release if the run left nothing in them
    (a run refused at start-up leaves no trace). The lock file itself is removed by its
    holder while still held; a process that opened the old file and locked it afterwards
    sees that the path now names another file (or none) and tries again.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / RUN_LOCK
        self._fd: int | None = None
        self._made: list[Path] = []

    def acquire(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # not POSIX: no advisory locks, run unlocked
            return self
        if self.folder.exists() and not self.folder.is_dir():
            raise ConfigError(f"{display_path(self.folder)}: exists and is not a folder")
        missing = [p for p in [self.folder, *self.folder.parents] if not p.exists()]
        self.folder.mkdir(parents=True, exist_ok=True)
        self._made = missing  # deepest first
        for _ in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "?"
                os.close(fd)
                raise RunBusyError(
                    f"{display_path(self.folder)}: another mlic process (pid {holder}) is writing "
                    "this run folder; wait for it to finish or choose another run.name"
                ) from None
            except OSError as e:  # a file system without locks (some network mounts)
                os.close(fd)
                logging.getLogger("mlic").warning("%s: cannot lock (%s)", self.path, e.strerror)
                return self
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                self._fd = fd
                return self
            os.close(fd)  # the holder removed that file as we locked it: lock the new one
        raise RunBusyError(f"{display_path(self.folder)}: could not lock the run folder")

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            os.close(self._fd)
            self._fd = None
        for folder in self._made:  # only folders this lock made, and only if left empty
            with contextlib.suppress(OSError):
                folder.rmdir()
        self._made = []

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
