"""Image decoding and train/eval transforms.

Decoding uses JPEG DCT-domain downscaling (``Image.draft``) so a large JPEG is decoded at
roughly the target size, applies EXIF orientation, and converts every colour mode (L, LA,
P, RGBA, CMYK, I;16) to RGB. :func:`decode_image` (the data sets' decoder, so that of
``mlic train`` and ``mlic eval``) takes the common case -- an RGB or greyscale JPEG that needs no
rotation -- straight to a uint8 tensor through libjpeg-turbo (``simplejpeg``) with the same
DCT scaling, 1.2x faster than through a PIL image, and everything else through
:func:`load_image`. Augmentation runs on uint8 tensors; conversion to float and
normalisation come last.

Every failure to read an image -- missing, empty, not a regular file (a FIFO is never
opened), not an image, truncated, larger than :data:`MAX_IMAGE_PIXELS` or
:data:`~mlic.files.MAX_IMAGE_BYTES` -- is a :class:`~mlic.errors.DataError` whose message
starts with the file's path, so a bad file is never anonymous (also inside data-loader
workers). :func:`device_decodable_jpeg` says which files a device JPEG decoder may take
for ``data.gpu_decode`` with the same pixels as :func:`decode_image`.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms import v2

from mlic.errors import ConfigError, DataError
from mlic.files import MAX_IMAGE_BYTES, read_regular_bytes, require_regular_file

__all__ = [
    "IMAGE_FORMATS",
    "MAX_IMAGE_PIXELS",
    "apply_seeded",
    "MultiScaleCrop",
    "RandomSquareCrop",
    "config_transforms",
    "ToNormalizedFloat",
    "build_transform",
    "decode_image",
    "device_decodable_jpeg",
    "load_image",
    "probe_image",
    "to_rgb",
]

# Refuse decompression bombs. PIL itself only warns between this many pixels and twice as
# many (and raises DecompressionBombError above that); we refuse everything above it, from
# the header, before any pixel memory is allocated. 178.9 MP (PIL's default: e.g. 13,377 x
# 13,377) is beyond any real photo data set; a 20,000 x 20,000 file is refused.
MAX_IMAGE_PIXELS = 178_956_970
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
_EXIF_ORIENTATION = 0x0112

# The only formats PIL may open (every ``Image.open`` here passes them): the photo formats
# mlic reads, all decoded inside Pillow. Without the list PIL tries every plugin, and some
# hand the file to an external program (EPS/PS -> Ghostscript). Camera MPO files open as JPEG.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "PPM")

try:  # libjpeg-turbo with DCT scaling, straight to numpy; PIL is the fallback
    import simplejpeg as _simplejpeg
except ImportError:  # pragma: no cover - a declared dependency
    _simplejpeg = None


def _check_size(path: Path, img: Image.Image) -> None:
    w, h = img.size
    if w * h > MAX_IMAGE_PIXELS:
        raise DataError(
            f"{path}: image too large ({w} x {h} = {w * h:,} pixels > {MAX_IMAGE_PIXELS:,}; "
            "possible decompression bomb)"
        )
    if w < 1 or h < 1:
        raise DataError(f"{path}: image has no pixels ({w} x {h})")


#: the problem a missing image file is reported as (data.check counts them apart)
NOT_FOUND = "image file not found"


def _as_data_error(path: Path, e: BaseException) -> DataError:
    """The one-line DataError naming ``path`` for any exception PIL raised on it."""
    if isinstance(e, FileNotFoundError):
        return DataError(f"{path}: {NOT_FOUND}")
    if isinstance(e, IsADirectoryError):
        return DataError(f"{path}: is a folder, not an image file")
    if isinstance(e, PermissionError):
        return DataError(f"{path}: permission denied")
    if isinstance(e, Image.DecompressionBombError):
        return DataError(f"{path}: image too large ({e})")
    if isinstance(e, UnidentifiedImageError):
        size = path.stat().st_size if path.exists() else -1
        what = "empty file (0 bytes)" if size == 0 else "not an image file in an accepted format"
        return DataError(f"{path}: cannot read image: {what}")
    return DataError(f"{path}: cannot decode image ({type(e).__name__}: {e})")


#: Bytes at the end of a JPEG searched for its end-of-image marker (FF D9): files with a
#: little data after the marker (some cameras append it) are not truncated.
_JPEG_TAIL = 4096


def _check_complete(path: Path, fmt: str | None, size: int) -> None:
    """Raise DataError when a JPEG lacks its end-of-image marker or a PNG its IEND chunk.

    A file cut short (interrupted copy or download) keeps a valid header, so only this or a
    full decode finds it; reading the last few KiB costs one seek.
    """
    if fmt not in ("JPEG", "PNG"):
        return
    tail_len = min(size, _JPEG_TAIL if fmt == "JPEG" else 64)
    with open(path, "rb") as f:
        f.seek(size - tail_len)
        tail = f.read(tail_len)
    if fmt == "JPEG" and b"\xff\xd9" not in tail:
        raise DataError(f"{path}: truncated JPEG (no end-of-image marker); cannot decode image")
    if fmt == "PNG" and b"IEND" not in tail:
        raise DataError(f"{path}: truncated PNG (no IEND chunk); cannot decode image")


def probe_image(path: str | Path) -> tuple[int, int]:
    """Cheap check that ``path`` is an image of an acceptable size: ``(width, height)``.

    Reads the header (``Image.open`` is lazy) and the file's last few KiB, so it finds
    missing, empty, non-image, oversized and non-regular files (FIFOs...), and JPEG/PNG files
    cut short (no end marker); corrupt data in the middle of a file needs a decode
    (:func:`load_image`). Raises DataError naming the file.
    """
    path = Path(path)
    size = require_regular_file(path, "image file", MAX_IMAGE_BYTES)
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as img:
            _check_size(path, img)
            _check_complete(path, img.format, size)
            return img.size
    except DataError:
        raise
    except Exception as e:  # untrusted input: PIL raises many types; each names the file
        raise _as_data_error(path, e) from e


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB (alpha composited on white, 16-bit scaled, CMYK converted)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _draft_reduction(width: int, height: int, draft_size: int) -> int:
    """The power-of-two JPEG DCT reduction (1, 2, 4 or 8) for a short side >= ``draft_size``.

    The rule of PIL's ``JpegImageFile.draft`` for the request this module makes, so that
    :func:`load_image` and the libjpeg-turbo path of :func:`decode_image` pick the same one.
    """
    scale = min(width, height) / draft_size
    if scale < 2:
        return 1
    ratio = min(width // (int(width / scale) + 1), height // (int(height / scale) + 1))
    return next(s for s in (8, 4, 2, 1) if ratio >= s)


def _open(path: Path, data: bytes | None) -> Image.Image:
    return Image.open(io.BytesIO(data) if data is not None else path, formats=IMAGE_FORMATS)


def load_image(
    path: str | Path, draft_size: int | None = None, data: bytes | None = None
) -> Image.Image:
    """Decode ``path`` to an RGB PIL image, EXIF orientation applied.

    ``draft_size``: for JPEGs, let libjpeg decode at the smallest power-of-two scale that
    is still at least this many pixels on the short side (much faster for big photos).
    ``data``: the file's bytes, already read (``path`` then only names it in errors).
    Raises DataError naming the file when it is missing, unreadable, truncated or too large.
    """
    path = Path(path)
    if data is None:
        data = read_regular_bytes(path, "image file", MAX_IMAGE_BYTES)
    try:
        with _open(path, data) as img:
            _check_size(path, img)  # before load(): an oversized file allocates nothing
            if draft_size and img.format == "JPEG":
                w, h = img.size
                scale = min(w, h) / draft_size
                if scale >= 2:  # PIL picks _draft_reduction(w, h, draft_size) from this request
                    img.draft("RGB", (int(w / scale) + 1, int(h / scale) + 1))
            img.load()
            if img.format != "JPEG" or "exif" in img.info:  # a JPEG without EXIF has no rotation
                img = ImageOps.exif_transpose(img)
            return to_rgb(img)
    except DataError:
        raise
    except Exception as e:  # untrusted input: PIL raises many types; each names the file
        raise _as_data_error(path, e) from e


def _decode_jpeg_turbo(path: Path, data: bytes, draft_size: int | None) -> torch.Tensor | None:
    """RGB/greyscale JPEG without rotation -> uint8 [3, H, W] via libjpeg-turbo, else None.

    None (the caller falls back to PIL) for anything else: other formats and colour modes
    (CMYK, ...), an EXIF orientation to apply, a file PIL cannot identify, and any error or
    warning of libjpeg-turbo (strict mode), so a bad file gets PIL's verdict and message.
    """
    if _simplejpeg is None:
        return None
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:  # header only
            if img.format != "JPEG" or img.mode not in ("RGB", "L"):
                return None
            _check_size(path, img)
            if "exif" in img.info and img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
                return None
            w, h = img.size
    except DataError:
        raise
    except Exception:
        return None
    s = _draft_reduction(w, h, draft_size) if draft_size else 1
    out_h, out_w = -(-h // s), -(-w // s)  # PIL's draft size: ceil
    try:
        arr = _simplejpeg.decode_jpeg(data, "rgb", min_height=out_h, min_width=out_w, strict=True)
    except ValueError:
        return None
    if arr.shape[:2] != (out_h, out_w):
        return None
    return torch.from_numpy(arr).permute(2, 0, 1)  # [3, H, W] uint8 (an HWC view)


def decode_image(
    path: str | Path, draft_size: int | None = None, data: bytes | None = None
) -> torch.Tensor:
    """Decode ``path`` to a uint8 RGB tensor ``[3, H, W]``: what :func:`load_image` gives,
    as a tensor, with libjpeg-turbo's direct path for plain RGB/greyscale JPEGs.

    The tensor is a channels-last (HWC) view, the layout torchvision's uint8 resize kernels
    are fastest on. Raises DataError naming the file, as :func:`load_image` does.
    ``data``: the encoded bytes, already in memory (a shard member, a dataset cell); ``path``
    then only names the image in errors.
    """
    path = Path(path)
    if data is None:
        data = read_regular_bytes(path, "image file", MAX_IMAGE_BYTES)
    fast = _decode_jpeg_turbo(path, data, draft_size)
    if fast is not None:
        return fast
    return v2.functional.pil_to_tensor(load_image(path, draft_size, data=data))


def _jpeg_frame_marker(data: bytes) -> int | None:
    """The start-of-frame marker (0xC0 baseline, 0xC2 progressive, ...) of a JPEG, or None.

    Walks the marker segments from SOI; None when the structure is broken before a frame.
    """
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return marker
        if marker in (0xD8, 0xD9, 0xDA):  # SOI again, EOI or scan data before any frame
            return None
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


def device_decodable_jpeg(data: bytes, draft_size: int | None = None) -> bool:
    """Whether a device JPEG decoder (``torchvision.io.decode_jpeg``, nvJPEG) gives exactly
    the pixels :func:`decode_image` gives for these bytes.

    True only for what :func:`decode_image` sends down libjpeg-turbo's direct path at full
    scale: a complete (end-of-image marker present) baseline or extended-sequential JPEG,
    RGB or greyscale, without an EXIF rotation, of an accepted size, that the CPU path would
    not decode at a DCT-reduced scale for ``draft_size``. Everything else (progressive,
    CMYK, rotated, truncated, PNG with alpha, 16-bit, TIFF, GIF...) must go through
    :func:`decode_image`, which converts it or refuses it naming the file.
    """
    if _jpeg_frame_marker(data) not in (0xC0, 0xC1):
        return False
    if b"\xff\xd9" not in data[-_JPEG_TAIL:]:
        return False
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:  # header only
            if img.format != "JPEG" or img.mode not in ("RGB", "L"):
                return False
            w, h = img.size
            if w * h > MAX_IMAGE_PIXELS or w < 1 or h < 1:
                return False
            if "exif" in img.info and img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
                return False
    except Exception:  # untrusted bytes: anything PIL cannot read goes the CPU way
        return False
    return not draft_size or _draft_reduction(w, h, draft_size) == 1


class ToNormalizedFloat(torch.nn.Module):
    """uint8 image tensor [3, H, W] -> float32 ``(x / 255 - mean) / std`` in one conversion + one fused pass.

    The same result as ``v2.ToDtype(float32, scale=True)`` followed by ``v2.Normalize``,
    without their two intermediate tensors: the last step of every sample's pipeline.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std_t), persistent=False)  # [3, 1, 1]
        self.register_buffer(
            "shift",
            -torch.tensor(mean, dtype=torch.float32).view(3, 1, 1) / std_t,
            persistent=False,
        )  # [3, 1, 1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [3, H, W] or [B, 3, H, W] uint8 -> float32, same shape and memory format
        # (in-place ops on the fresh float copy: faster than one broadcast addcmul)
        return x.to(torch.float32).mul_(self.scale).add_(self.shift)


class MultiScaleCrop(torch.nn.Module):
    """ML-GCN's training crop (MultiScaleCrop of TSN, Wang et al. 2016), then resize to S x S.

    The crop's width and height are each one of ``scales`` x the image's short side, with the
    two scale indices at most ``max_distort`` apart (so mild aspect changes only); the crop
    sits at one of 13 fixed positions: the four corners, the centre, the four edge middles and
    the four quarter points of the free margin. Randomness comes from torch's global RNG,
    which the data set seeds per (run seed, epoch, image). Works on uint8 tensors [3, H, W].

    One detail of the reference code is left out: it snaps a crop side within 3 px of the
    output size to exactly that size; here every crop is resized, which only differs by a
    sub-pixel rescale.
    """

    def __init__(self, size: int, scales: Sequence[float], max_distort: int = 2) -> None:
        super().__init__()
        if not scales:
            raise ValueError("MultiScaleCrop needs at least one scale")
        self.size = int(size)
        self.scales = [float(x) for x in scales]
        self.max_distort = int(max_distort)

    def crop_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """A random ``(top, left, crop_height, crop_width)`` for an image of this size."""
        base = min(height, width)
        sides = [max(1, int(base * x)) for x in self.scales]
        pairs = [
            (h, w)
            for i, h in enumerate(sides)
            for j, w in enumerate(sides)
            if abs(i - j) <= self.max_distort
        ]
        crop_h, crop_w = pairs[int(torch.randint(len(pairs), ()))]
        h_step, w_step = (height - crop_h) // 4, (width - crop_w) // 4
        # (row, column) in quarter steps: corners, centre, edge midpoints, inner quarters
        grid = [(0, 0), (0, 4), (4, 0), (4, 4), (2, 2)]
        grid += [(2, 0), (2, 4), (4, 2), (0, 2), (1, 1), (1, 3), (3, 1), (3, 3)]
        row, col = grid[int(torch.randint(len(grid), ()))]
        return row * h_step, col * w_step, crop_h, crop_w

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        # img: [3, H, W] uint8 -> [3, S, S] uint8
        top, left, h, w = self.crop_box(img.shape[-2], img.shape[-1])
        return v2.functional.resized_crop(
            img, top, left, h, w, [self.size, self.size], antialias=True
        )


class RandomSquareCrop(torch.nn.Module):
    """SSGRL's training crop: warp to ``resize`` x ``resize``, take a square of side
    ``scale x resize`` (one of ``scales``, uniformly) at a uniformly random position, resize
    it to S x S.

    The official code's ``Resize((640, 640))``, ``RandomChoice`` of ``RandomCrop(640 / 576 /
    512 / 384 / 320)`` and ``Resize((576, 576))``: two resamplings, as there. Randomness from
    torch's global RNG (seeded per sample by the data set). uint8 tensors [3, H, W].
    """

    def __init__(self, size: int, resize: int, scales: Sequence[float]) -> None:
        super().__init__()
        if not scales:
            raise ValueError("RandomSquareCrop needs at least one scale")
        self.size = int(size)
        self.resize = int(resize)
        self.sides = [max(1, min(self.resize, round(self.resize * float(x)))) for x in scales]

    def crop_box(self) -> tuple[int, int, int]:
        """A random ``(top, left, side)`` inside the ``resize`` x ``resize`` warp."""
        side = self.sides[int(torch.randint(len(self.sides), ()))]
        top = int(torch.randint(self.resize - side + 1, ()))
        left = int(torch.randint(self.resize - side + 1, ()))
        return top, left, side

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        # img: [3, H, W] uint8 -> [3, S, S] uint8
        warped = v2.functional.resize(img, [self.resize, self.resize], antialias=True)
        top, left, side = self.crop_box()
        return v2.functional.resized_crop(
            warped, top, left, side, side, [self.size, self.size], antialias=True
        )


def apply_seeded(
    transform: Callable[[torch.Tensor], torch.Tensor] | None,
    img: torch.Tensor,
    seed: int | None,
) -> torch.Tensor:
    """``transform(img)`` with torch's global CPU generator seeded by ``seed`` (the per-sample
    augmentation seed of the data sets), the caller's RNG stream left as it was.

    torchvision's random transforms draw from that generator, so a sample's augmentation
    depends on (run seed, epoch, image) alone: the same with any number of workers, after a
    resume and under DDP. ``seed=None`` applies the transform unseeded; no transform returns
    ``img``. Only the CPU generator is seeded: ``torch.manual_seed`` also seeds every other
    backend, at many times the cost per sample.
    """
    if transform is None:
        return img
    if seed is None:
        return transform(img)
    with torch.random.fork_rng(devices=[]):  # workers=0: do not disturb the caller's stream
        torch.default_generator.manual_seed(seed)
        return transform(img)


def build_transform(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    train: bool,
    randaugment: bool = True,
    randaugment_magnitude: int = 9,
    random_erasing: float = 0.0,
    hflip: bool = True,
    normalize: bool = True,
    crop: str = "none",
    crop_scales: Sequence[float] = (1.0, 0.875, 0.75, 0.66, 0.5),
    crop_max_distort: int = 2,
    resize: int | None = None,
) -> v2.Compose:
    """PIL RGB image or uint8 tensor [3, H, W] -> normalised float tensor [3, S, S].

    Train: resize to S x S, horizontal flip, RandAugment, Cutout-style random erasing (filled
    with the mean colour, i.e. ~0 after normalisation), all on uint8. Eval: resize to S x S
    only. Multi-label images are resized, not centre-cropped, so no labelled object is cut
    away. ``normalize=False`` stops at the uint8 tensor [3, S, S]: data-loader workers then
    hand the training process 4x fewer bytes, and :class:`ToNormalizedFloat` runs on the
    batch on the training device. ``crop="multiscale"`` (training only) replaces the resize by
    :class:`MultiScaleCrop` (ML-GCN's crop + resize). ``resize`` (SSGRL's protocol): eval
    warps to ``resize`` x ``resize`` and takes the centre S x S crop; ``crop="square"``
    (training, needs ``resize``) is :class:`RandomSquareCrop`.
    """
    if crop not in ("none", "multiscale", "square"):
        raise ValueError(f"crop={crop!r}: choose 'none', 'multiscale' or 'square'")
    if (crop == "square" or resize is not None) and (resize is None or resize < image_size):
        raise ConfigError(
            f"data.resize={resize}: crop={crop} needs it set, at least the image size "
            f"{image_size} (data.image_size or the model's default)"
        )
    ops: list[torch.nn.Module] = [v2.PILToTensor()]  # [3, H, W] uint8
    if train and crop == "multiscale":
        ops.append(MultiScaleCrop(image_size, crop_scales, crop_max_distort))
    elif train and crop == "square":
        ops.append(RandomSquareCrop(image_size, resize, crop_scales))
    elif not train and resize is not None:  # warp, then the centre S x S
        ops += [v2.Resize((resize, resize), antialias=True), v2.CenterCrop(image_size)]
    else:
        ops.append(v2.Resize((image_size, image_size), antialias=True))
    if train:
        if hflip:
            ops.append(v2.RandomHorizontalFlip())
        if randaugment:
            ops.append(v2.RandAugment(magnitude=randaugment_magnitude))
    if train and random_erasing > 0:
        fill = [round(255 * m) for m in mean]  # the mean colour: ~0 once normalised
        ops.append(v2.RandomErasing(p=random_erasing, value=fill))
    if normalize:
        ops.append(ToNormalizedFloat(mean, std))
    return v2.Compose(ops)


def config_transforms(
    data: Any, image_size: int, mean: Sequence[float], std: Sequence[float]
) -> tuple[v2.Compose, v2.Compose]:
    """``(train, eval)`` uint8 transforms (``normalize=False``) for a ``data`` config section
    (:class:`~mlic.config.DataConfig`): augmentation, crop and the resize protocol in one place.
    A ``data.resize`` smaller than the image size is a ConfigError naming it."""
    d = data
    augment = (d.randaugment, d.randaugment_magnitude, d.random_erasing, d.hflip)
    crop = {"crop": d.crop, "crop_scales": d.crop_scales, "crop_max_distort": d.crop_max_distort}
    train = build_transform(image_size, mean, std, True, *augment, False, resize=d.resize, **crop)
    evaluation = build_transform(image_size, mean, std, False, normalize=False, resize=d.resize)
    return train, evaluation
