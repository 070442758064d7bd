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

import errno
import hashlib
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlic.engine.faults import maybe_kill
from mlic.errors import DataError, MlicError, WriteError

__all__ = [
    "MAX_ANNOTATION_BYTES",
    "MAX_IMAGE_BYTES",
    "atomic_write",
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


_IO_MARKERS = ("write failed", "PytorchStreamWriter", "inline_container", "No space", "I/O error",
               "Permission denied", "Read-only file system", "Disk quota")  # fmt: skip


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
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


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
