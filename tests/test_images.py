"""Images: colour modes decoded to the right RGB values, and every kind of broken file named."""

from __future__ import annotations

import logging
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor

from conftest import write_image
from mlic.data import Annotations, transforms
from mlic.data.check import (
    check_images,
    drop_images,
    find_broken_images,
    screen_splits,
    summarize_warnings,
)
from mlic.data.dataset import MultiLabelDataset, SeededSampler, build_loader
from mlic.data.transforms import (
    MAX_IMAGE_PIXELS,
    build_transform,
    decode_image,
    load_image,
    probe_image,
)
from mlic.errors import ConfigError, DataError


# ----------------------------------------------------------------------------- helpers
def png_1bit(path: Path, width: int, height: int) -> Path:
    """A valid, all-black 1-bit PNG written row by row: 20,000 x 20,000 px is ~50 kB on disk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    z = zlib.compressobj(9)
    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )
    return path


def broken_files(root: Path) -> dict[str, Path]:
    """One file of every broken kind (plus a good one), as the check should meet them."""
    root.mkdir(parents=True, exist_ok=True)
    files = {k: root / f"{k}.jpg" for k in ("good", "truncated", "empty", "text", "vanished")}
    write_image(files["good"], 0, size=64)
    write_image(files["truncated"], 1, size=64)
    data = files["truncated"].read_bytes()
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["empty"].write_bytes(b"")
    files["text"].write_text("this is not a JPEG\n")
    write_image(files["vanished"], 2)
    files["bomb"] = png_1bit(root / "bomb.png", 20_000, 20_000)
    return files


def annotations_of(paths: list[Path]) -> Annotations:
    targets = np.eye(len(paths), 2, dtype=np.int8)
    return Annotations(names=["a", "b"], images=paths, targets=targets, source="test")


# ----------------------------------------------------------------------------- colour modes
def test_rgba_is_composited_over_white(tmp_path: Path) -> None:
    px = np.array([[[255, 0, 0, 0], [0, 0, 255, 255], [0, 0, 0, 128]]], dtype=np.uint8)
    Image.fromarray(px, mode="RGBA").save(tmp_path / "a.png")
    out = np.asarray(load_image(tmp_path / "a.png"))
    assert out.shape == (1, 3, 3) and out.dtype == np.uint8
    assert out[0, 0].tolist() == [255, 255, 255]  # fully transparent -> white, not red
    assert out[0, 1].tolist() == [0, 0, 255]  # opaque unchanged
    np.testing.assert_allclose(out[0, 2], [127, 127, 127], atol=1)  # half black over white


def test_palette_transparency_and_grayscale(tmp_path: Path) -> None:
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 255, 0] + [0, 0, 0] * 255)
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    pal.save(tmp_path / "p.png", transparency=1)
    assert np.asarray(load_image(tmp_path / "p.png")).tolist() == [[[0, 255, 0], [255, 255, 255]]]
    Image.new("L", (3, 2), 77).save(tmp_path / "g.png")
    g = load_image(tmp_path / "g.png")
    assert g.mode == "RGB" and np.asarray(g).reshape(-1, 3).tolist() == [[77, 77, 77]] * 6


def test_16bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    arr = np.array([[0, 32768, 65535, 1000]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode in ("I;16", "I")  # the path under test
    out = np.asarray(load_image(tmp_path / "d.png"))[0, :, 0]
    assert out.tolist() == [0, 128, 255, 4]  # /65535*255, not clipped at 255


def test_cmyk_jpeg_converts_to_expected_rgb(tmp_path: Path) -> None:
    img = Image.new("CMYK", (16, 8), (0, 255, 255, 0))  # magenta + yellow = red
    img.paste((0, 0, 0, 128), (8, 0, 16, 8))  # half black = mid grey
    img.save(tmp_path / "c.jpg", quality=95)
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    out = np.asarray(load_image(tmp_path / "c.jpg")).astype(int)
    np.testing.assert_allclose(out[4, 2], [255, 0, 0], atol=12)
    np.testing.assert_allclose(out[4, 13], [127, 127, 127], atol=12)


def test_exif_orientation_6_is_applied(tmp_path: Path) -> None:
    arr = np.zeros((20, 40, 3), dtype=np.uint8)  # 40 wide, 20 high
    arr[:, :20] = (255, 0, 0)  # left half red
    arr[:, 20:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(arr).save(tmp_path / "r.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "r.jpg")
    assert out.size == (20, 40)  # portrait after rotation
    top, bottom = np.asarray(out)[5, 10].astype(int), np.asarray(out)[35, 10].astype(int)
    np.testing.assert_allclose(top, [255, 0, 0], atol=40)  # left column became the top
    np.testing.assert_allclose(bottom, [0, 0, 255], atol=40)


# ----------------------------------------------------------------------------- broken files
def test_each_broken_kind_raises_dataerror_naming_the_file(tmp_path: Path) -> None:
    f = broken_files(tmp_path)
    f["vanished"].unlink()  # indexed, then deleted
    expect = {
        "truncated": "truncated",
        "empty": "empty file",
        "text": "not an image file",
        "vanished": "image file not found",
        "bomb": "image too large",
    }
    for kind, words in expect.items():
        for decode in (load_image, decode_image):
            with pytest.raises(DataError, match=words) as e:
                decode(f[kind], draft_size=32)
            assert str(e.value).startswith(str(f[kind])), (kind, decode)
    assert load_image(f["good"]).size == (64, 64)
    assert decode_image(f["good"]).shape == (3, 64, 64)


def test_decompression_bomb_is_refused_from_the_header(tmp_path: Path) -> None:
    bomb = png_1bit(tmp_path / "bomb.png", 20_000, 20_000)
    assert bomb.stat().st_size < 200_000  # cheap to make; 400 M pixels when decoded
    with pytest.raises(DataError, match=r"bomb\.png: image too large"):
        probe_image(bomb)
    # between PIL's warning and error limits PIL would decode; we refuse from the header too
    side = int(MAX_IMAGE_PIXELS**0.5) + 100
    big = png_1bit(tmp_path / "big.png", side, side)
    with (
        pytest.warns(Image.DecompressionBombWarning),  # PIL alone would go on and decode it
        pytest.raises(DataError, match=r"big\.png: image too large .* possible decompression bomb"),
    ):
        load_image(big)
    assert probe_image(png_1bit(tmp_path / "ok.png", 300, 200)) == (300, 200)


def test_full_check_lists_every_broken_file_and_fast_check_only_headers(tmp_path: Path) -> None:
    f = broken_files(tmp_path)
    f["vanished"].unlink()
    order = ["good", "truncated", "empty", "text", "vanished", "bomb"]
    ann = annotations_of([f[k] for k in order])
    problems = check_images(ann, workers=2)
    assert [p.split(":")[0] for p in problems] == [str(f[k]) for k in order[1:]]
    assert check_images(ann, workers=1) == problems  # threads do not change the result
    fast = check_images(ann, full=False)
    # a truncated JPEG has a valid header, but no end-of-image marker: the fast check finds it
    assert [p.split(":")[0] for p in fast] == [
        str(f[k]) for k in ("truncated", "empty", "text", "vanished", "bomb")
    ]
    assert find_broken_images([f["good"]] * 200, workers=2) == []


def test_broken_image_in_a_loader_worker_names_the_file(tmp_path: Path) -> None:
    f = broken_files(tmp_path)
    ann = annotations_of([f["good"], f["truncated"]])
    ds = MultiLabelDataset(ann, build_transform(32, (0.5,) * 3, (0.5,) * 3, train=False))
    loader = build_loader(ds, 1, SeededSampler(2, shuffle=False, pad=False), workers=1)
    with pytest.raises(DataError) as e:
        list(loader)
    msg = str(e.value)
    assert msg.startswith(f"{f['truncated']}: cannot decode image") and "truncated" in msg
    assert "worker process 0" in msg and "Traceback" not in msg and "\n" not in msg
    # without workers the error is raised as is
    loader0 = build_loader(ds, 1, SeededSampler(2, shuffle=False, pad=False), workers=0)
    with pytest.raises(DataError, match=r"^" + str(f["truncated"]).replace(".", r"\.")):
        list(loader0)


# ----------------------------------------------------------------------------- before training
def _cfg(check: str = "fast", skip: bool = False) -> SimpleNamespace:
    return SimpleNamespace(image_check=check, skip_bad_images=skip)


def test_screen_stops_with_every_broken_image(tmp_path: Path) -> None:
    f = broken_files(tmp_path / "img")
    splits = {
        "train": annotations_of([f["good"], f["empty"], f["text"]]),
        "val": annotations_of([f["bomb"], f["good"]]),
    }
    with pytest.raises(DataError) as e:
        screen_splits(splits, _cfg(), tmp_path / "run")
    msg = str(e.value)
    assert msg.startswith("3 broken image(s) found by the fast image check")
    for line in (f"train: {f['empty']}", f"train: {f['text']}", f"val: {f['bomb']}"):
        assert line in msg
    assert "data.skip_bad_images=true" in msg and "mlic data check" in msg
    assert not (tmp_path / "run").exists()  # nothing written for a run that did not start


def test_screen_skips_counts_and_lists_bad_images(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    f = broken_files(tmp_path / "img")
    train = annotations_of([f["good"], f["truncated"], f["empty"]])
    train.warnings = [f"img{i}: no labels (kept as an all-negative image)" for i in range(12)]
    splits = {"train": train, "val": annotations_of([f["good"], f["good"]])}
    with caplog.at_level(logging.INFO, logger="mlic"):
        fast = screen_splits(splits, _cfg("fast", skip=True), tmp_path / "run")
    assert len(fast["train"]) == 1  # header + end-marker check: the truncated file is found
    with caplog.at_level(logging.INFO, logger="mlic"):
        out = screen_splits(splits, _cfg("full", skip=True), tmp_path / "run")
    assert out["train"].images == [f["good"]] and len(out["val"]) == 2
    assert out["train"].targets.tolist() == [[1, 0]]  # rows stay aligned with their images
    assert out["train"].warnings == train.warnings
    listed = (tmp_path / "run" / "bad_images.txt").read_text().splitlines()
    assert [ln.split(":")[0] for ln in listed] == ["train", "train"]
    assert str(f["truncated"]) in listed[0] and str(f["empty"]) in listed[1]
    text = caplog.text
    assert "skipping 2 broken image(s)" in text and str(f["truncated"]) in text
    assert "12 annotation warning(s), the first 10:" in text and "img9: no labels" in text
    assert "img10" not in text and "... and 2 more" in text


def test_screen_modes(tmp_path: Path) -> None:
    f = broken_files(tmp_path)
    only_bad = {"train": annotations_of([f["empty"]]), "val": annotations_of([f["good"]])}
    assert screen_splits(only_bad, _cfg("off"))["train"].images == [f["empty"]]
    with pytest.raises(DataError, match="every image is broken"):
        screen_splits(only_bad, _cfg("fast", skip=True))
    with pytest.raises(ConfigError, match=r"data\.image_check='slow' is not allowed"):
        screen_splits(only_bad, _cfg("slow"))


def test_drop_images_and_warning_summary() -> None:
    ann = annotations_of([Path("a.jpg"), Path("b.jpg")])
    ann.warnings = ["a.jpg: no labels"]
    kept = drop_images(ann, [0])
    assert kept.images == [Path("b.jpg")] and kept.warnings == ann.warnings
    assert summarize_warnings(["x: no labels"]) == "1 annotation warning(s):\n  x: no labels"


# ----------------------------------------------------------------------------- decode_image
@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize(
    ("size", "draft"),
    [((640, 480), 224), ((500, 375), 224), ((97, 61), 16), ((800, 300), 64), ((64, 64), None)],
)
def test_decode_image_is_load_image_as_a_tensor(
    tmp_path: Path, mode: str, size: tuple[int, int], draft: int | None
) -> None:
    rng = np.random.default_rng(0)
    w, h = size
    base = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize(size, Image.BICUBIC).convert(mode)  # photo-like, smooth
    img.save(tmp_path / "x.jpg", quality=90)
    calls = []
    real = transforms._simplejpeg.decode_jpeg

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    transforms._simplejpeg.decode_jpeg = spy
    try:
        fast = decode_image(tmp_path / "x.jpg", draft_size=draft)
    finally:
        transforms._simplejpeg.decode_jpeg = real
    assert calls, "a plain RGB/greyscale JPEG takes the libjpeg-turbo path"
    slow = pil_to_tensor(load_image(tmp_path / "x.jpg", draft_size=draft))
    assert fast.dtype == torch.uint8 and fast.shape == slow.shape  # same DCT reduction
    assert (fast.int() - slow.int()).abs().max() <= 1  # same libjpeg-turbo IDCT


def test_decode_image_falls_back_to_pil_for_rotation_and_cmyk(tmp_path: Path) -> None:
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(tmp_path / "r.jpg", exif=exif)
    assert decode_image(tmp_path / "r.jpg").shape == (3, 40, 20)  # rotated as load_image does
    Image.new("CMYK", (16, 8), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=95)
    red = decode_image(tmp_path / "c.jpg")[:, 4, 2].int()
    np.testing.assert_allclose(red.numpy(), [255, 0, 0], atol=12)
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "a.png")
    assert decode_image(tmp_path / "a.png").min() == 255  # transparent -> white, via PIL
