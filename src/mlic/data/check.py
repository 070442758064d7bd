"""Nothing lost, nothing let in: image checks and annotation warnings (``mlic data check``).

Two levels of image check, because their costs differ by orders of magnitude:

- **fast** (header + end marker): the file exists, is a regular file (not a FIFO or
  device), is an image PIL identifies, is not larger than
  :data:`~mlic.data.transforms.MAX_IMAGE_PIXELS` (decompression-bomb guard), and a JPEG/PNG
  ends with its end marker (so a file cut short is found). ``Image.open`` reads a few
  hundred bytes and the tail one seek, so 120k COCO images take seconds. It misses corrupt
  pixel data in the middle of a complete file.
- **full** (decode): every image is decoded exactly as training decodes it
  (:func:`~mlic.data.transforms.load_image`: EXIF orientation, colour conversion), JPEGs at
  1/8 scale through libjpeg's DCT-domain downscaling -- which still reads every byte of the
  entropy-coded data, so truncation is found. ``Image.verify()`` is not used: it does not
  decode and passes truncated JPEGs.

Why the trainer does only the fast check by default (``data.image_check=fast``): a full
decode of COCO's 120k images costs minutes of CPU at the start of *every* run, while a
file that is truncated but has a valid header is rare, and if it reaches a data-loader
worker it still fails with a :class:`~mlic.errors.DataError` naming the file. The full check
is one command away (``mlic data check CONFIG``, or ``data.image_check=full``) and belongs
before a long run on a new copy of a data set. Decoding runs in a thread pool: PIL releases
the GIL while decoding, so threads scale with cores without pickling images between processes.

Broken images stop training with the list of every one of them, or, with
``data.skip_bad_images=true``, are removed from the :class:`~mlic.data.Annotations` before
the label statistics are computed, logged, and listed in ``bad_images.txt`` in the run
folder; an image that still fails in a data-loader worker later is skipped and counted
there too (:class:`~mlic.data.dataset.SkippedImage`). Annotation warnings (e.g. images with no labels) are logged summarised: the count
and the first ten.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlic.data import Annotations
from mlic.data.transforms import NOT_FOUND
from mlic.errors import ConfigError, DataError
from mlic.files import write_text

__all__ = [
    "CHECK_DRAFT_SIZE",
    "IMAGE_CHECKS",
    "CheckReport",
    "check_images",
    "data_check",
    "drop_images",
    "find_broken_images",
    "screen_splits",
    "summarize_warnings",
]

log = logging.getLogger("mlic")

#: Short side (pixels) JPEGs are decoded at by the full check: the smallest libjpeg scale
#: (1/8) for any photo, which still decodes every byte of the file.
CHECK_DRAFT_SIZE = 32
#: Values of ``data.image_check``.
IMAGE_CHECKS = ("fast", "full", "off")
_CHUNK = 64  # images per thread-pool task


# ----------------------------------------------------------------------------- annotations
def summarize_warnings(warnings: Sequence[str], limit: int = 10) -> str:
    """``"<n> annotation warning(s)"`` and the first ``limit`` of them, one per line."""
    n = len(warnings)
    head = f"{n} annotation warning(s)" + (f", the first {limit}:" if n > limit else ":")
    lines = [head] + [f"  {w}" for w in warnings[:limit]]
    if n > limit:
        lines.append(f"  ... and {n - limit} more")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- images
def _check_chunk(paths: list[Path], start: int, full: bool) -> list[tuple[int, str]]:
    from mlic.data.transforms import load_image, probe_image

    out = []
    for i, path in enumerate(paths):
        try:
            if full:
                load_image(path, draft_size=CHECK_DRAFT_SIZE)
            else:
                probe_image(path)
        except DataError as e:
            out.append((start + i, str(e)))
    return out


def _default_workers(full: bool) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpus = cpus or 1
    # decoding is CPU-bound (GIL released); header reads wait on the disk, so overlap more
    return cpus if full else min(32, 4 * cpus)


def find_broken_images(
    paths: Sequence[str | Path],
    full: bool = True,
    workers: int | None = None,
    progress: Callable[[int], Any] | None = None,
) -> list[tuple[int, str]]:
    """``(index, problem)`` of every path that fails the check, in path order.

    ``full``: decode every image (finds truncation); else read headers only. ``workers``:
    threads (default: the CPU count for decoding, 4x that for header reads). ``progress``
    is called with the number of images done after each chunk.
    """
    paths = [Path(p) for p in paths]
    n_workers = max(1, workers or _default_workers(full))
    starts = range(0, len(paths), _CHUNK)
    found: list[tuple[int, str]] = []
    if n_workers == 1 or len(paths) <= _CHUNK:
        for s in starts:
            found += _check_chunk(paths[s : s + _CHUNK], s, full)
            if progress is not None:
                progress(min(s + _CHUNK, len(paths)))
        return found
    with ThreadPoolExecutor(n_workers, thread_name_prefix="mlic-check") as pool:
        results = pool.map(lambda s: _check_chunk(paths[s : s + _CHUNK], s, full), starts)
        for s, res in zip(starts, results, strict=True):
            found += res
            if progress is not None:
                progress(min(s + _CHUNK, len(paths)))
    return found


def check_images(
    annotations: Annotations | Sequence[str | Path],
    workers: int | None = None,
    full: bool = True,
) -> list[str]:
    """Every problem with the images of ``annotations`` (or a list of paths), one string each.

    Each string starts with the file's path (``"<path>: image file not found"``,
    ``"<path>: cannot decode image (...)"``). ``full=True`` decodes every image (see the
    module docstring for why that is needed for truncation); ``full=False`` reads headers.
    An empty list means every image will load.
    """
    paths = annotations.images if isinstance(annotations, Annotations) else annotations
    return [msg for _, msg in find_broken_images(paths, full=full, workers=workers)]


def drop_images(annotations: Annotations, indices: Sequence[int]) -> Annotations:
    """``annotations`` without the rows ``indices`` (same classes, warnings kept)."""
    drop = set(int(i) for i in indices)
    keep = [i for i in range(len(annotations)) if i not in drop]
    out = annotations.subset(keep)
    out.warnings = list(annotations.warnings)
    return out


# ----------------------------------------------------------------------------- training
#: how many broken images an error lists (`mlic data check CONFIG` lists them all)
LISTED_PROBLEMS = 10


def _broken_images_message(
    splits: dict[str, Annotations],
    broken: dict[str, list[tuple[int, str]]],
    lines: list[str],
    mode: str,
    counts: str,
) -> str:
    """One error for the broken images of a run's splits: how many, the first few, and where
    missing files were looked for; never "skip them" when that would drop a whole split."""
    missing = {
        name: [i for i, msg in found if msg.endswith(NOT_FOUND)] for name, found in broken.items()
    }
    head = f"{len(lines)} broken image(s) found by the {mode} image check ({counts})"
    where = []
    for name, idx in missing.items():
        if idx:
            folders = sorted({str(splits[name].images[i].parent) for i in idx})
            shown = ", ".join(folders[:3]) + (", ..." if len(folders) > 3 else "")
            where.append(
                f"{len(idx)} of the {len(splits[name])} {name} images are not found (looked for "
                f"in {shown}: image paths are relative to data.{name}_images, by default the "
                f"annotation file's folder or the format's image folder under data.root)"
            )
    whole = [name for name, found in broken.items() if found and len(found) == len(splits[name])]
    if whole:
        advice = (
            f"every image of the {' and '.join(whole)} split{'s' if len(whole) > 1 else ''} is "
            "broken or missing: check "
            "data.root and the image folders; data.skip_bad_images=true would drop them all"
        )
    else:
        hint = "" if mode == "full" else "; `mlic data check CONFIG` also decodes every image"
        advice = f"fix or remove them, or set data.skip_bad_images=true to train without them{hint}"
    more = len(lines) - LISTED_PROBLEMS
    listed = lines[:LISTED_PROBLEMS]
    if more > 0:
        listed.append(f"... and {more} more (mlic data check CONFIG lists every one)")
    return ". ".join([head, *where, advice]) + ":\n  " + "\n  ".join(listed)


def screen_splits(
    splits: dict[str, Annotations],
    data_cfg: Any,
    run_dir: Path | None = None,
    is_main: bool = True,
    skipped: list[str] | None = None,
) -> dict[str, Annotations]:
    """What ``mlic train`` does with freshly read splits before anything else sees them.

    Logs each split's annotation warnings (summarised), checks every image per
    ``data_cfg.image_check`` and then either raises :class:`DataError` listing every broken
    image, or -- with ``data_cfg.skip_bad_images`` -- returns the splits without them, after
    logging each one and writing them to ``run_dir/bad_images.txt`` (main process only).
    ``skipped``: a list the skipped images' lines are appended to, for a caller that writes
    the run folder itself later (``mlic train`` touches no run folder before its data is valid).
    """
    mode = getattr(data_cfg, "image_check", "fast")
    if mode not in IMAGE_CHECKS:
        raise ConfigError(
            f"data.image_check={mode!r} is not allowed; choose one of {list(IMAGE_CHECKS)}"
        )
    if is_main:
        for name, ann in splits.items():
            if ann.warnings:
                log.warning("%s split (%s): %s", name, ann.source, summarize_warnings(ann.warnings))
    if mode == "off":
        return splits
    t0 = time.perf_counter()
    broken = {
        name: find_broken_images(ann.images, full=mode == "full") for name, ann in splits.items()
    }
    secs = time.perf_counter() - t0
    lines = [f"{name}: {msg}" for name, found in broken.items() for _, msg in found]
    counts = ", ".join(f"{len(ann)} {name}" for name, ann in splits.items())
    if not lines:
        if is_main:
            log.info("image check (%s): all images readable (%s; %.1f s)", mode, counts, secs)
        return splits
    if not data_cfg.skip_bad_images:
        raise DataError(_broken_images_message(splits, broken, lines, mode, counts))
    if skipped is not None:
        skipped += lines
    out = {}
    for name, ann in splits.items():
        out[name] = drop_images(ann, [i for i, _ in broken[name]])
        if len(out[name]) == 0:
            raise DataError(f"{name} split ({ann.source}): every image is broken; nothing to use")
    if is_main:
        where = ""
        if run_dir is not None:
            run_dir = Path(run_dir)
            write_text(run_dir / "bad_images.txt", "\n".join(lines) + "\n")
            where = f"; listed in {run_dir / 'bad_images.txt'}"
        kept = ", ".join(f"{len(ann)} {name}" for name, ann in out.items())
        log.warning(
            "skipping %d broken image(s) (data.skip_bad_images=true; %s image check)%s; "
            "training on %s images:\n  %s",
            len(lines),
            mode,
            where,
            kept,
            "\n  ".join(lines),
        )
    return out


# ----------------------------------------------------------------------------- mlic data check
@dataclass
class CheckReport:
    """Result of :func:`data_check`: the splits read, and per split its problems and warnings."""

    splits: dict[str, Annotations]
    problems: dict[str, list[str]] = field(default_factory=dict)
    full: bool = True
    seconds: float = 0.0

    @property
    def num_problems(self) -> int:
        return sum(len(p) for p in self.problems.values())

    def lines(self) -> list[str]:
        """Human-readable report, one line per split, problem and warning summary."""
        kind = "full decode" if self.full else "header-only"
        out = []
        for name, ann in self.splits.items():
            probs = self.problems.get(name, [])
            out.append(
                f"{name}: {len(ann)} images, {ann.num_classes} classes, "
                f"{len(probs)} broken ({ann.source})"
            )
            out += [f"  {p}" for p in probs]
            if ann.warnings:
                out += ["  " + ln for ln in summarize_warnings(ann.warnings).splitlines()]
        n = sum(len(a) for a in self.splits.values())
        out.append(
            f"{self.num_problems} broken image(s) among {n} ({kind} check, {self.seconds:.1f} s)"
        )
        return out


def _read_splits(cfg: Any) -> dict[str, Annotations]:
    from mlic.data.dataset import load_split

    train = load_split(cfg.data, "train")
    return {"train": train, "val": load_split(cfg.data, "val", class_names=train.names)}


def data_check(
    cfg: Any, full: bool = True, workers: int | None = None, progress: bool = False
) -> CheckReport:
    """Read both splits of ``cfg.data`` (annotation errors raise, naming file and line) and
    check every image; nothing is trained. ``full``: decode every image."""
    splits = _read_splits(cfg)
    t0 = time.perf_counter()
    problems = {}
    for name, ann in splits.items():
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(ann), desc=f"checking {name}", leave=False)
        cb = (lambda done, b=bar: b.update(done - b.n)) if bar is not None else None
        problems[name] = [m for _, m in find_broken_images(ann.images, full, workers, cb)]
        if bar is not None:
            bar.close()
    return CheckReport(splits, problems, full=full, seconds=time.perf_counter() - t0)
