"""Example images for the ``mlic serve`` page: a few files of the served run's own val split.

Chosen once, at start-up, in the main process (before the HTTP process forks): at most
:data:`MAX_EXAMPLES` image files that the run's data config lists for its val split, that
lie inside the data root (no symbolic link out of it), are regular files no larger than
``--max-upload-mb`` and start like an image. A request names an index into that list,
never a path, so no request makes the server open a file it did not choose at start-up.
A checkpoint without a run config, a Hugging Face Hub model (its data locations are never
used), a streamed format (shards, HF datasets) or a val split that is not on disk: no
examples, no error.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

__all__ = ["MAX_EXAMPLES", "Example", "find_examples", "read_example", "add_example_routes"]

log = logging.getLogger("mlic.serve")

MAX_EXAMPLES = 6
MAX_TRIED = 24  # files looked at to find them (a val split whose files are gone costs little)
MAX_TRUE_LABELS = 20  # ground-truth labels listed per example
_INDEX = re.compile(r"[0-9]{1,2}")  # ASCII digits only: int() would also take '٣' or ' 1'
# First bytes -> the media type an example is served as (anything else is not offered).
_MAGIC = (
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
)


@dataclass(frozen=True)
class Example:
    """One example image: where it is, the name the page shows, its true labels."""

    path: Path
    name: str
    labels: list[str]
    media_type: str


def _media_type(head: bytes) -> str | None:
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return next((t for magic, t in _MAGIC if head.startswith(magic)), None)


def _checked(path: Path, root: Path, max_bytes: int) -> str | None:
    """The media type of ``path`` when it may be offered (inside ``root``, a regular file of
    1..``max_bytes`` bytes, an image by its first bytes), else None."""
    try:
        real = path.resolve()
        if not real.is_relative_to(root):
            return None
        info = os.stat(real)
        if not stat.S_ISREG(info.st_mode) or not 0 < info.st_size <= max_bytes:
            return None
        with open(real, "rb") as f:
            return _media_type(f.read(16))
    except (OSError, RuntimeError):  # RuntimeError: a symbolic-link loop (older Pythons)
        return None


def _val_split(target: str, label_names: list[str]) -> tuple[Any, Path] | None:
    """(the val split's annotations, the data root) of the run ``target`` names, or None."""
    from mlic.config import load_config
    from mlic.data.dataset import load_split
    from mlic.data.sources import STREAM_FORMATS
    from mlic.data.voc import load_voc
    from mlic.evaluate import resolve_target
    from mlic.hub_files import in_hub_cache, is_hub_id

    if is_hub_id(target):
        return None
    ckpt, run_cfg = resolve_target(target)
    if run_cfg is None or in_hub_cache(ckpt):
        return None
    data = load_config(run_cfg).data
    if data.format in STREAM_FORMATS or not data.root:
        return None
    root = Path(data.root).resolve()
    if data.format == "demo":  # load_split would generate a missing demo set: only read one
        voc = root / "VOCdevkit" / "VOC2007"
        return (load_voc(voc, data.val), root) if voc.is_dir() else None
    return load_split(data, "val", class_names=label_names), root


def find_examples(target: str, label_names: list[str], max_bytes: int) -> list[Example]:
    """Up to :data:`MAX_EXAMPLES` image files spread over the val split of the run that
    ``target`` names (see the module's docstring); [] when there are none."""
    try:
        found = _val_split(target, label_names)
    except Exception as e:  # noqa: BLE001 -- examples are optional: any failure means none
        log.info("mlic serve: no example images (%s)", e)
        return []
    if found is None or len(found[0]) == 0:
        return []
    ann, root = found
    n = len(ann)
    tried = sorted({i * n // MAX_TRIED for i in range(MAX_TRIED)})  # spread over the split
    picks = tried[:: max(1, len(tried) // MAX_EXAMPLES)] + tried  # spread first, then the rest
    out: list[Example] = []
    for i in dict.fromkeys(picks):
        if len(out) == MAX_EXAMPLES:
            break
        media_type = _checked(ann.images[i], root, max_bytes)
        if media_type is None:
            continue
        labels = [name for name, t in zip(ann.names, ann.targets[i], strict=True) if t == 1]
        out.append(Example(ann.images[i], ann.images[i].name, labels[:MAX_TRUE_LABELS], media_type))
    return out


def read_example(example: Example, max_bytes: int) -> bytes | None:
    """The file's bytes, or None when it changed since start-up into something not offered."""
    try:
        with open(example.path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError:
        return None
    if len(data) > max_bytes or _media_type(data[:16]) != example.media_type:
        return None
    return data


def add_example_routes(app: Any, examples: list[Example], max_bytes: int, auth: list) -> None:
    """``GET /examples`` (index, file name, true labels of each) and ``GET /examples/<index>``
    (the image's bytes; 404 for anything but the index of one)."""

    @app.get("/examples", dependencies=auth, summary="Example images from the run's val split")
    async def list_examples() -> list[dict[str, Any]]:
        return [{"index": i, "name": e.name, "labels": e.labels} for i, e in enumerate(examples)]

    @app.get("/examples/{index}", dependencies=auth, summary="One example image's file")
    async def get_example(index: str) -> Response:
        i = int(index) if _INDEX.fullmatch(index) else -1
        data = None
        if 0 <= i < len(examples):
            data = await run_in_threadpool(read_example, examples[i], max_bytes)
        if data is None:
            raise HTTPException(404, "no such example")
        headers = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}
        return Response(data, media_type=examples[i].media_type, headers=headers)
