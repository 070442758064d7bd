"""Request validation for ``POST /v1/predict``: uploads -> decoded, resized pixels, or a 4xx.

Everything here runs in the HTTP process, before a request reaches the batching queue,
so that one bad image fails its own request only (LitServe's batched loop fails every
request of a batch when one of them raises). Images are decoded exactly as ``mlic
predict`` decodes files (:func:`mlic.data.transforms.load_image` with the same draft
size, then the evaluation resize), so served probabilities equal the command's.

Nothing here opens a path or a URL: uploads are bytes, and a file name sent by a client
is only echoed back (truncated) in answers and error messages. PIL opens uploads only in the
formats of :data:`~mlic.data.transforms.IMAGE_FORMATS` (all decoded inside Pillow, no external
program); anything else is a 415 naming what it is, from its first bytes, before any plugin runs.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from mlic.data.transforms import IMAGE_FORMATS, build_transform, load_image
from mlic.errors import DataError

__all__ = [
    "Limits",
    "Options",
    "PreparedImage",
    "PreparedRequest",
    "RequestError",
    "ImagePreparer",
    "parse_options",
    "parse_json_body",
    "check_heatmap_count",
    "refused_format",
    "display_name",
]

HEATMAP_CHOICES = ("false", "true", "all")
OVERLAY_MAX_SIDE = 384  # heat-map overlays are drawn on a copy of the photo at most this big
# Heat maps bound the answer: each is a base64 PNG of up to OVERLAY_MAX_SIDE px (~100-300 KB),
# so an answer holds at most MAX_HEATMAP_IMAGES x MAX_HEATMAP_LABELS of them (~20 MB).
MAX_HEATMAP_LABELS = 8  # per image: 'true' the most probable predicted labels, 'all' the top 8
MAX_HEATMAP_IMAGES = 8  # images per request when heat maps are asked for

# First bytes of formats PIL could open but mlic refuses (offset, magic, what to call it):
# only to name the format in the 415; the refusal itself is the allow-list.
_REFUSED_MAGIC = (
    (0, b"%!PS", "PostScript/EPS"),
    (0, b"\xc5\xd0\xd3\xc6", "EPS"),
    (0, b"%PDF", "PDF"),
    (0, b"8BPS", "PSD"),
    (0, b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (0, b"\xffO\xffQ", "JPEG 2000"),
    (4, b"ftyp", "HEIF/AVIF"),
    (0, b"icns", "ICNS"),
    (0, b"\x00\x00\x01\x00", "ICO"),
    (0, b"\x00\x00\x02\x00", "CUR"),
    (0, b"DDS ", "DDS"),
    (0, b"qoif", "QOI"),
    (0, b"SIMPLE", "FITS"),
    (0, b"\x89HDF", "HDF5"),
    (0, b"/* XPM */", "XPM"),
    (0, b"#define", "XBM"),
    (0, b"\xd7\xcd\xc6\x9a", "WMF"),
    (0, b"<?xml", "XML/SVG"),
    (0, b"<svg", "SVG"),
)


class RequestError(Exception):
    """A client mistake: ``status`` (4xx) and a one-line message naming the culprit."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Limits:
    """What one request may carry (set by ``mlic serve`` options)."""

    max_upload_bytes: int = 10 * 2**20  # per image file
    max_images: int = 32  # per request
    max_pixels: int = 40_000_000  # per image, read from the header before decoding


@dataclass
class Options:
    """Per-request options: threshold (None: the checkpoint's), top_k, all scores, heat maps."""

    threshold: float | None = None
    top_k: int | None = None
    scores: bool = False
    heatmaps: str = "false"  # "false" | "true" (predicted labels) | "all" (every label)


@dataclass
class PreparedImage:
    """One validated image: its name (for the answer), model pixels and, for heat maps, a photo."""

    name: str
    pixels: np.ndarray  # uint8 [3, S, S], resized as at evaluation time, not yet normalised
    photo: np.ndarray | None = None  # uint8 [h, w, 3], longest side <= OVERLAY_MAX_SIDE


@dataclass
class PreparedRequest:
    """What crosses from the HTTP process to an inference worker (plain arrays and numbers)."""

    images: list[PreparedImage] = field(default_factory=list)
    options: Options = field(default_factory=Options)


def display_name(raw: str | None, index: int) -> str:
    """A client's file name, printable and short (only ever echoed, never opened)."""
    name = "".join(ch for ch in (raw or "") if ch.isprintable())[:80]
    return name or f"image {index + 1}"


def _parse_bool(key: str, value: Any) -> bool:
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise RequestError(422, f"option {key!r} must be true or false, got {str(value)[:40]!r}")


def _parse_number(key: str, value: Any, kind: type, what: str) -> Any:
    """``kind(value)`` (``float`` or ``int``), or a 422 naming the option and the value.

    nan, inf, booleans and (for ``int``) fractions are refused, not rounded or compared.
    """
    bad = RequestError(422, f"option {key!r} must be {what}, got {str(value)[:40]!r}")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise bad
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise bad from None
    if not math.isfinite(number) or (kind is int and not number.is_integer()):
        raise bad
    return int(number) if kind is int else number


def parse_options(raw: Mapping[str, Any]) -> Options:
    """Query / form / JSON options -> :class:`Options`; an unknown or bad value is a 422."""
    known = {"threshold", "top_k", "scores", "heatmaps"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise RequestError(
            422, f"unknown option {unknown[0]!r}; options are {', '.join(sorted(known))}"
        )
    opts = Options()
    if raw.get("threshold") not in (None, ""):
        opts.threshold = _parse_number("threshold", raw["threshold"], float, "a number")
        if not 0.0 <= opts.threshold <= 1.0:
            raise RequestError(422, f"option 'threshold' must be in [0, 1], got {opts.threshold:g}")
    if raw.get("top_k") not in (None, ""):
        opts.top_k = _parse_number("top_k", raw["top_k"], int, "an integer")
        if opts.top_k < 1:
            raise RequestError(422, f"option 'top_k' must be >= 1, got {opts.top_k}")
    if raw.get("scores") not in (None, ""):
        value = str(raw["scores"]).strip().lower()
        opts.scores = value == "all" or (value != "labels" and _parse_bool("scores", value))
    if raw.get("heatmaps") not in (None, ""):
        value = str(raw["heatmaps"]).strip().lower()
        if value in ("all",):
            opts.heatmaps = "all"
        else:
            opts.heatmaps = "true" if _parse_bool("heatmaps", value) else "false"
    return opts


def parse_json_body(body: bytes) -> dict[str, Any]:
    """A JSON request body -> its top-level object, or a 4xx (never a 500).

    Deep nesting (``[[[[...]]]]``) makes the parser recurse: a 400, as any other bad JSON.
    """
    try:
        doc = json.loads(body)
    except RecursionError:
        raise RequestError(400, "body is not accepted JSON (nested too deeply)") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, over-long numbers
        raise RequestError(400, f"body is not valid JSON ({str(e)[:120]})") from None
    if not isinstance(doc, dict):
        raise RequestError(422, 'JSON body must be an object {"images": [base64, ...]}')
    if "images" not in doc:
        others = ", ".join(repr(str(k)[:40]) for k in list(doc)[:3]) or "none"
        raise RequestError(400, f"JSON body has no 'images' field (fields: {others})")
    return doc


def check_heatmap_count(heatmaps: str, n_images: int) -> None:
    """A 422 when heat maps are asked for more images than one answer may carry."""
    if heatmaps != "false" and n_images > MAX_HEATMAP_IMAGES:
        raise RequestError(
            422,
            f"heat maps for {n_images} images in one request; at most {MAX_HEATMAP_IMAGES} "
            "(send the others in further requests, or without heat maps)",
        )


def refused_format(data: bytes) -> str | None:
    """What a file PIL may not open looks like (``'PostScript/EPS'``...), from its first
    bytes only; None when it looks like nothing known."""
    for offset, magic, what in _REFUSED_MAGIC:
        if data[offset : offset + len(magic)] == magic:
            return what
    return None


class ImagePreparer:
    """Decode and resize uploads exactly as ``mlic predict`` does, under the request limits."""

    def __init__(self, image_size: int, limits: Limits, resize: int | None = None) -> None:
        self.image_size = image_size
        self.limits = limits
        # The evaluation transform without its last step (normalisation runs on the batch
        # in the worker: 4x fewer bytes cross processes, bit-identical result).
        self.resize = build_transform(
            image_size, (0.0,) * 3, (1.0,) * 3, False, normalize=False, resize=resize
        )

    def check_count(self, n: int) -> None:
        if n == 0:
            raise RequestError(
                400, "no image in the request; send files in the multipart field 'images'"
            )
        if n > self.limits.max_images:
            raise RequestError(
                413,
                f"{n} images in one request; at most {self.limits.max_images} (--max-images)",
            )

    def check_size(self, name: str, size: int) -> None:
        if size == 0:
            raise RequestError(400, f"{name}: empty upload (0 bytes)")
        if size > self.limits.max_upload_bytes:
            mb = self.limits.max_upload_bytes / 2**20
            raise RequestError(
                413,
                f"{name}: {size:,} bytes is over the upload limit of {mb:g} MB (--max-upload-mb)",
            )

    def prepare(self, name: str, data: bytes, keep_photo: bool) -> PreparedImage:
        """Bytes of one image file -> :class:`PreparedImage`, or a :class:`RequestError`."""
        self.check_size(name, len(data))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                # The header only, and only the allowed formats' plugins look at it.
                with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:
                    w, h = img.size
                    fmt = img.format
        except UnidentifiedImageError:
            accepted = ", ".join(IMAGE_FORMATS)
            what = refused_format(data)
            if what is not None:
                raise RequestError(
                    415, f"{name}: {what} files are not accepted (accepted formats: {accepted})"
                ) from None
            raise RequestError(
                415, f"{name}: not an image in an accepted format ({accepted})"
            ) from None
        except Image.DecompressionBombError as e:
            raise RequestError(413, f"{name}: image too large ({e})") from None
        except Exception as e:
            raise RequestError(400, f"{name}: unreadable image header ({e})") from None
        if w * h > self.limits.max_pixels:
            raise RequestError(
                413,
                f"{name}: {w} x {h} = {w * h:,} pixels is over the limit of "
                f"{self.limits.max_pixels:,} (decompression bomb?)",
            )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                pil = load_image(f"<{fmt} upload>", draft_size=self.image_size, data=data)
        except DataError as e:
            raise RequestError(400, f"{name}: {str(e).split(': ', 1)[-1]}") from None
        pixels = self.resize(pil).numpy()  # uint8 [3, S, S]
        photo = None
        if keep_photo:
            small = pil.copy()
            small.thumbnail((OVERLAY_MAX_SIDE, OVERLAY_MAX_SIDE), Image.BILINEAR)
            photo = np.asarray(small)  # uint8 [h, w, 3]
        return PreparedImage(name=name, pixels=pixels, photo=photo)

    def from_base64(self, index: int, item: Any, keep_photo: bool) -> PreparedImage:
        """One JSON entry: a base64 string (a ``data:...;base64,`` prefix is allowed), or
        ``{"name": ..., "data": base64}``."""
        name = f"image {index + 1}"
        if isinstance(item, Mapping):
            name = display_name(item.get("name"), index)
            item = item.get("data")
        if not isinstance(item, str):
            raise RequestError(
                422, f"{name}: each entry of 'images' must be a base64 string or {{name, data}}"
            )
        if item.startswith("data:") and "," in item:
            item = item.split(",", 1)[1]
        approx = len(item) * 3 // 4
        if approx > self.limits.max_upload_bytes + 3:
            self.check_size(name, approx)
        try:
            data = base64.b64decode(item, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(422, f"{name}: not valid base64") from None
        return self.prepare(name, data, keep_photo)
