"""A small multi-label demo set built offline from real photographs, in PASCAL VOC layout.

Why it exists: the demo and the end-to-end tests need a data set that (a) needs no
download, (b) looks like natural images so an ImageNet backbone transfers to it, and (c)
has label co-occurrence that graph-based models can use. Flat synthetic shapes fail (b).

How it is made: object cut-outs are taken, with hand-chosen tight boxes, from the sample
photographs that ship inside installed packages (scikit-image's ``skimage.data`` and
matplotlib's Grace Hopper portrait). Each image is a random crop of a real textured
backdrop (grass, gravel, brick, lunar surface, deep-sky, wood, paper, ...) with colour
jitter, onto which 1-4 classes are pasted at varied scale, position, flip, small rotation
and brightness, with feathered alpha edges; objects may overlap partly. Which classes go
together is decided by a *scene* (``DEMO_SCENES``): each image first draws a scene, then
each class of that scene with its scene-conditional probability, plus rare random others,
so e.g. ``cat`` and ``cup`` co-occur far more often than independence predicts.
Very small or heavily occluded objects are marked ``<difficult>1</difficult>`` (the VOC
"ignore" label), except that an image always keeps at least one non-difficult object.

Output (``root/VOCdevkit/VOC2007``)::

    JPEGImages/000001.jpg ...        RGB, image_size x image_size, JPEG quality 90
    Annotations/000001.xml ...       VOC XML: filename, size, objects (name, difficult, bndbox)
    ImageSets/Main/train.txt, val.txt, trainval.txt (+ test.txt when num_test > 0)
    ImageSets/Main/<class>_<split>.txt   per-class lists (1 / -1 / 0 difficult), as in VOC
    labels.txt                       class names in target order
    demo.json                        generation parameters; written last (completion marker)

Generation is deterministic for a seed: image ``i`` of a split depends only on
``(seed, split, i)``, so a smaller set is a prefix of a larger one.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from mlic.errors import DataError

__all__ = [
    "DEMO_CLASSES",
    "DEMO_SCENES",
    "MARKER",
    "demo_is_complete",
    "ensure_demo",
    "generate_demo",
]

#: Class names in target-column order (alphabetical, so any loader that sorts agrees).
DEMO_CLASSES: list[str] = [
    "astronaut",
    "cameraman",
    "cat",
    "clock",
    "coin",
    "cup",
    "flag",
    "helmet",
    "motorcycle",
    "officer",
    "rocket",
    "shuttle",
]

#: Scene -> {class: probability that an image of this scene contains it}.
#: The scenes share some classes (helmet, cameraman, flag, coin) so the label graph is
#: connected but clustered.
DEMO_SCENES: dict[str, dict[str, float]] = {
    "space": {"rocket": 0.75, "shuttle": 0.55, "astronaut": 0.6, "helmet": 0.35, "flag": 0.12},
    "home": {"cat": 0.8, "cup": 0.7, "clock": 0.45, "coin": 0.15},
    "street": {"motorcycle": 0.8, "helmet": 0.5, "cameraman": 0.45},
    "ceremony": {"officer": 0.75, "flag": 0.7, "coin": 0.5, "cameraman": 0.25},
}

#: Probability of adding each class outside the image's scene (label noise / rare pairs).
_P_RANDOM_EXTRA = 0.025
_MAX_LABELS = 4
_JPEG_QUALITY = 90
MARKER = "demo.json"
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class _Cutout:
    """A hand-chosen tight box ``(x0, y0, x1, y1)`` around one object in a source photo."""

    label: str
    photo: str
    box: tuple[int, int, int, int]
    shape: str  # "rect" or "ellipse": the alpha mask, feathered at the edge


@dataclass(frozen=True)
class _Backdrop:
    """A region of a photo that holds no demo class; ``tint`` colours grey textures."""

    photo: str
    box: tuple[int, int, int, int] | None
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)
    flip_vertical: bool = True  # textures and sky have no "up"; rooms and paper do


_CUTOUTS: tuple[_Cutout, ...] = (
    _Cutout("astronaut", "astronaut", (105, 5, 320, 330), "rect"),
    _Cutout("shuttle", "astronaut", (358, 0, 488, 285), "rect"),
    _Cutout("helmet", "astronaut", (286, 340, 512, 512), "ellipse"),
    _Cutout("flag", "astronaut", (0, 0, 76, 252), "rect"),
    _Cutout("flag", "hopper", (0, 0, 112, 320), "rect"),
    _Cutout("cat", "chelsea", (40, 0, 420, 300), "rect"),
    _Cutout("cup", "coffee", (55, 10, 490, 395), "ellipse"),
    _Cutout("rocket", "rocket", (290, 118, 352, 410), "rect"),
    _Cutout("cameraman", "camera", (0, 60, 345, 512), "rect"),
    _Cutout("clock", "clock", (138, 88, 275, 222), "ellipse"),
    _Cutout("motorcycle", "motorcycle", (85, 85, 695, 460), "rect"),
    _Cutout("officer", "hopper", (140, 15, 385, 395), "rect"),
    _Cutout("coin", "coins", (300, 8, 368, 80), "ellipse"),
    _Cutout("coin", "coins", (15, 225, 78, 290), "ellipse"),
    _Cutout("coin", "coins", (312, 152, 380, 220), "ellipse"),
    _Cutout("coin", "coins", (240, 90, 300, 150), "ellipse"),
    _Cutout("coin", "coins", (180, 178, 240, 240), "ellipse"),
    _Cutout("coin", "coins", (125, 20, 180, 80), "ellipse"),
)

#: Regions with no demo class, pasted like objects so that "a pasted patch" alone does not
#: mean "a labelled object" (launch towers next to rockets, a skyline, shelves, ...).
_CLUTTER: tuple[_Cutout, ...] = (
    _Cutout("", "rocket", (0, 0, 95, 427), "rect"),  # launch tower
    _Cutout("", "rocket", (545, 0, 640, 427), "rect"),  # launch tower
    _Cutout("", "camera", (355, 95, 512, 235), "rect"),  # skyline
    _Cutout("", "motorcycle", (560, 0, 741, 90), "rect"),  # garage shelf
    _Cutout("", "retina", (0, 0, 1411, 1411), "ellipse"),  # fundus photo
    _Cutout("", "tissue", (0, 0, 512, 512), "rect"),
    _Cutout("", "hubble", (0, 0, 1000, 872), "rect"),
    _Cutout("", "page", (0, 0, 384, 191), "rect"),
    _Cutout("", "gravel", (0, 0, 512, 512), "ellipse"),
)

_BACKDROPS: dict[str, _Backdrop] = {
    "grass": _Backdrop("grass", None, (0.72, 1.0, 0.55)),
    "gravel": _Backdrop("gravel", None, (1.0, 0.93, 0.82)),
    "brick": _Backdrop("brick", None, (1.08, 0.78, 0.66)),
    "moon": _Backdrop("moon", None),
    "deep_sky": _Backdrop("hubble", None),
    "night_sky": _Backdrop("rocket", (100, 0, 540, 110)),
    "wood": _Backdrop("coffee", (495, 0, 600, 400), flip_vertical=False),
    "paper": _Backdrop("page", None, (1.0, 0.97, 0.88), flip_vertical=False),
    "notes": _Backdrop("text", None, (0.95, 0.95, 1.0), flip_vertical=False),
    "garage_floor": _Backdrop("motorcycle", (0, 315, 115, 500), flip_vertical=False),
    "lawn": _Backdrop("camera", (415, 250, 512, 512), (0.75, 1.0, 0.6), flip_vertical=False),
}

#: Backdrops each scene prefers (an image uses one of these 75% of the time, else any).
_SCENE_BACKDROPS: dict[str, tuple[str, ...]] = {
    "space": ("moon", "deep_sky", "night_sky"),
    "home": ("wood", "brick", "paper", "notes"),
    "street": ("gravel", "grass", "garage_floor", "lawn"),
    "ceremony": ("brick", "grass", "lawn", "wood"),
}


@lru_cache(maxsize=1)
def _photos() -> dict[str, np.ndarray]:
    """The source photographs as RGB uint8 arrays, loaded from installed packages only."""
    try:
        import matplotlib.cbook
        import skimage.data as sk

        gray = {
            "camera": sk.camera,
            "clock": sk.clock,
            "coins": sk.coins,
            "moon": sk.moon,
            "page": sk.page,
            "text": sk.text,
            "brick": sk.brick,
            "grass": sk.grass,
            "gravel": sk.gravel,
        }
        color = {
            "astronaut": sk.astronaut,
            "chelsea": sk.chelsea,
            "coffee": sk.coffee,
            "rocket": sk.rocket,
            "hubble": sk.hubble_deep_field,
            "retina": sk.retina,
            "tissue": sk.immunohistochemistry,
            "motorcycle": lambda: sk.stereo_motorcycle()[0],
        }
        out = {k: np.repeat(f()[:, :, None], 3, axis=2) for k, f in gray.items()}
        out.update({k: np.ascontiguousarray(f()[:, :, :3]) for k, f in color.items()})
        hopper = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
        with Image.open(hopper) as im:
            out["hopper"] = np.asarray(im.convert("RGB"))
    except Exception as e:  # missing package / file: say what the demo needs
        raise DataError(
            "the demo set is built from sample photos bundled with scikit-image and "
            f"matplotlib, and one could not be loaded ({type(e).__name__}: {e})"
        ) from e
    for v in out.values():
        v.setflags(write=False)
    return out


# ----------------------------------------------------------------------------- drawing


def _jitter_colour(img: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Random brightness, contrast and saturation on a float RGB image in [0, 255]."""
    b = 1.0 + rng.uniform(-strength, strength)
    c = 1.0 + rng.uniform(-strength, strength)
    s = 1.0 + rng.uniform(-strength, strength)
    grey = img.mean(axis=2, keepdims=True)
    img = grey + s * (img - grey)
    img = (img - img.mean()) * c + img.mean()
    return np.clip(img * b, 0.0, 255.0)


def _backdrop(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random crop of backdrop ``name``, resized to ``size``, flipped, tinted, jittered."""
    spec = _BACKDROPS[name]
    photo = _photos()[spec.photo]
    x0, y0, x1, y1 = spec.box or (0, 0, photo.shape[1], photo.shape[0])
    bw, bh = x1 - x0, y1 - y0
    side = rng.uniform(0.4, 1.0) * min(bw, bh)
    aspect = np.exp(rng.uniform(-0.25, 0.25))
    cw = int(min(bw, max(8.0, side * aspect)))
    ch = int(min(bh, max(8.0, side / aspect)))
    cx = x0 + int(rng.integers(0, bw - cw + 1))
    cy = y0 + int(rng.integers(0, bh - ch + 1))
    crop = Image.fromarray(photo[cy : cy + ch, cx : cx + cw])
    img = np.asarray(crop.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
    if rng.random() < 0.5:
        img = img[:, ::-1]
    if spec.flip_vertical and rng.random() < 0.5:
        img = img[::-1]
    tint = np.asarray(spec.tint, np.float32) * rng.uniform(0.92, 1.08, size=3).astype(np.float32)
    return _jitter_colour(img * tint, rng, 0.25)


def _feather_mask(h: int, w: int, shape: str) -> np.ndarray:
    """Alpha in [0, 1] of a rectangle or inscribed ellipse with a soft ~6% edge."""
    feather = max(1.5, 0.06 * min(h, w))
    ys = np.arange(h, dtype=np.float32)[:, None] + 0.5
    xs = np.arange(w, dtype=np.float32)[None, :] + 0.5
    if shape == "ellipse":
        rx, ry = w / 2.0, h / 2.0
        r = np.sqrt(((xs - rx) / rx) ** 2 + ((ys - ry) / ry) ** 2)
        dist = (1.0 - r) * min(rx, ry)
    else:
        dist = np.minimum(np.minimum(xs, w - xs), np.minimum(ys, h - ys))
    return np.clip(dist / feather, 0.0, 1.0)


def _cutout_image(cut: _Cutout, scale: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """RGBA float array of one object: jittered crop, resized to ``scale`` (sqrt-area / size),
    flipped, slightly rotated, colour-jittered, with a feathered alpha channel."""
    photo = _photos()[cut.photo]
    x0, y0, x1, y1 = cut.box
    w0, h0 = x1 - x0, y1 - y0
    # Move each edge a little (mostly inwards) so no two pastes use the identical crop.
    dx0, dx1 = (rng.uniform(-0.02, 0.05, size=2) * w0).astype(int)
    dy0, dy1 = (rng.uniform(-0.02, 0.05, size=2) * h0).astype(int)
    x0, x1 = max(0, x0 + dx0), min(photo.shape[1], x1 - dx1)
    y0, y1 = max(0, y0 + dy0), min(photo.shape[0], y1 - dy1)
    aspect = (x1 - x0) / (y1 - y0)
    w = scale * size * np.sqrt(aspect)
    h = scale * size / np.sqrt(aspect)
    shrink = min(1.0, 0.95 * size / max(w, h))
    w, h = max(4, round(w * shrink)), max(4, round(h * shrink))
    rgb = Image.fromarray(photo[y0:y1, x0:x1]).resize((w, h), Image.Resampling.BICUBIC)
    alpha = Image.fromarray((_feather_mask(h, w, cut.shape) * 255).astype(np.uint8))
    rgba = rgb.copy()
    rgba.putalpha(alpha)
    if rng.random() < 0.5:
        rgba = rgba.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rng.random() < 0.5:
        angle = float(rng.uniform(-12.0, 12.0))
        rgba = rgba.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)
    out = np.asarray(rgba, dtype=np.float32)
    out[..., :3] = _jitter_colour(out[..., :3], rng, 0.2)
    out[..., 3] /= 255.0
    return out


@dataclass
class _Placed:
    label: str | None  # None for clutter
    mask: np.ndarray  # bool [S, S]: pixels this object covers (alpha > 0.5)
    visible: np.ndarray  # bool [S, S]: ... and not covered by later objects
    area: int
    tiny: bool
    truncated: bool


def _place(
    obj: np.ndarray, placed: list[_Placed], size: int, rng: np.random.Generator, min_visible: float
) -> tuple[int, int, np.ndarray] | None:
    """Find a position for ``obj`` (RGBA) that leaves every earlier object at least
    ``min_visible`` visible and keeps >= 80% of ``obj`` inside; None if none of a few tries do."""
    h, w = obj.shape[:2]
    alpha_full = obj[..., 3] > 0.5
    total = max(1, int(alpha_full.sum()))
    for _ in range(16):
        x = int(rng.integers(-int(0.15 * w), max(-int(0.15 * w), size - int(0.85 * w)) + 1))
        y = int(rng.integers(-int(0.15 * h), max(-int(0.15 * h), size - int(0.85 * h)) + 1))
        mask = np.zeros((size, size), dtype=bool)
        cx0, cy0, cx1, cy1 = max(0, x), max(0, y), min(size, x + w), min(size, y + h)
        if cx1 <= cx0 or cy1 <= cy0:
            continue
        mask[cy0:cy1, cx0:cx1] = alpha_full[cy0 - y : cy1 - y, cx0 - x : cx1 - x]
        if mask.sum() < 0.8 * total:
            continue
        if all((p.visible & ~mask).sum() >= min_visible * p.area for p in placed):
            return x, y, mask
    return None


def _composite(canvas: np.ndarray, obj: np.ndarray, x: int, y: int) -> None:
    """Alpha-blend RGBA ``obj`` onto ``canvas`` in place with its top-left at (x, y)."""
    size = canvas.shape[0]
    h, w = obj.shape[:2]
    cx0, cy0, cx1, cy1 = max(0, x), max(0, y), min(size, x + w), min(size, y + h)
    patch = obj[cy0 - y : cy1 - y, cx0 - x : cx1 - x]
    a = patch[..., 3:4]
    region = canvas[cy0:cy1, cx0:cx1]
    region *= 1.0 - a
    region += a * patch[..., :3]


def _draw_labels(rng: np.random.Generator) -> tuple[str, list[str]]:
    """Scene, then 1-4 distinct classes: scene members by their probabilities + rare extras."""
    scene = list(DEMO_SCENES)[int(rng.integers(len(DEMO_SCENES)))]
    probs = DEMO_SCENES[scene]
    draws = rng.random(len(DEMO_CLASSES))
    labels = [
        c for c, u in zip(DEMO_CLASSES, draws, strict=True) if u < probs.get(c, _P_RANDOM_EXTRA)
    ]
    if not labels:
        members = list(probs)
        p = np.asarray([probs[c] for c in members])
        labels = [members[int(rng.choice(len(members), p=p / p.sum()))]]
    if len(labels) > _MAX_LABELS:
        keep = sorted(rng.choice(len(labels), size=_MAX_LABELS, replace=False).tolist())
        labels = [labels[i] for i in keep]
    return scene, labels


def _clutter(rng: np.random.Generator) -> _Cutout:
    """A random sub-region (40-100% per side) of a random clutter source."""
    src = _CLUTTER[int(rng.integers(len(_CLUTTER)))]
    x0, y0, x1, y1 = src.box
    w = max(8, int((x1 - x0) * rng.uniform(0.4, 1.0)))
    h = max(8, int((y1 - y0) * rng.uniform(0.4, 1.0)))
    x = x0 + int(rng.integers(0, x1 - x0 - w + 1))
    y = y0 + int(rng.integers(0, y1 - y0 - h + 1))
    return _Cutout("", src.photo, (x, y, x + w, y + h), src.shape)


def _render(size: int, rng: np.random.Generator) -> tuple[np.ndarray, list[dict]]:
    """One demo image (uint8 [S, S, 3]) and its objects (label, 1-based box, difficult)."""
    scene, labels = _draw_labels(rng)
    preferred = _SCENE_BACKDROPS[scene]
    names = preferred if rng.random() < 0.75 else tuple(_BACKDROPS)
    canvas = _backdrop(names[int(rng.integers(len(names)))], size, rng)

    instances: list[str | None] = []  # None: a clutter patch that is no class
    for label in labels:
        n = 1 + int(rng.choice(3, p=[0.5, 0.3, 0.2])) if label == "coin" else 1
        instances += [label] * n
    num_objects = len(instances)
    instances += [None] * int(rng.choice(3, p=[0.45, 0.35, 0.20]))
    instances = [instances[i] for i in rng.permutation(len(instances))]
    crowd = max(0.6, 1.0 - 0.1 * (num_objects - 1))  # more objects -> smaller on average

    placed: list[_Placed] = []
    for label in instances:
        tiny = False
        if label is None:
            cut = _clutter(rng)
            scale = rng.uniform(0.15, 0.45)
        else:
            options = [c for c in _CUTOUTS if c.label == label]
            cut = options[int(rng.integers(len(options)))]
            tiny = num_objects > 1 and any(p.label for p in placed) and rng.random() < 0.07
        if tiny:
            scale = rng.uniform(0.10, 0.15)
        elif label is not None:
            mode = rng.choice(3, p=[0.4, 0.42, 0.18])
            scale = rng.uniform(*((0.15, 0.27), (0.27, 0.46), (0.46, 0.66))[mode]) * crowd
            scale = max(scale, 0.15)
        min_visible = 0.3 if rng.random() < 0.12 else 0.6  # sometimes allow heavy occlusion
        for _attempt in range(3):
            obj = _cutout_image(cut, scale, size, rng)
            spot = _place(obj, placed, size, rng, min_visible)
            if spot is not None:
                break
            scale = max(0.12, scale * 0.8)
        if spot is None:
            continue
        x, y, mask = spot
        _composite(canvas, obj, x, y)
        for p in placed:
            p.visible &= ~mask
        full = int((obj[..., 3] > 0.5).sum())
        placed.append(
            _Placed(label, mask, mask.copy(), int(mask.sum()), tiny, mask.sum() < 0.97 * full)
        )

    objects = []
    for p in (p for p in placed if p.label is not None):
        ys, xs = np.nonzero(p.visible)
        visible = len(xs) / max(1, p.area)
        objects.append(
            {
                "name": p.label,
                "difficult": bool(p.tiny or visible < 0.5),
                "truncated": bool(p.truncated),
                "box": (int(xs.min()) + 1, int(ys.min()) + 1, int(xs.max()) + 1, int(ys.max()) + 1),
                "visible_px": len(xs),
            }
        )
    if objects and all(o["difficult"] for o in objects):  # never leave an image with only ignores
        max(objects, key=lambda o: o["visible_px"])["difficult"] = False
    image = np.clip(canvas + 0.5, 0, 255).astype(np.uint8)
    return image, objects


# ----------------------------------------------------------------------------- writing


def _annotation_xml(image_id: str, size: int, objects: list[dict]) -> str:
    """VOC-style XML text for one image (no paths or timestamps, so it is reproducible)."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "VOC2007"
    ET.SubElement(root, "filename").text = f"{image_id}.jpg"
    source = ET.SubElement(root, "source")
    ET.SubElement(source, "database").text = "mlic demo (scikit-image and matplotlib sample photos)"
    sz = ET.SubElement(root, "size")
    ET.SubElement(sz, "width").text = str(size)
    ET.SubElement(sz, "height").text = str(size)
    ET.SubElement(sz, "depth").text = "3"
    ET.SubElement(root, "segmented").text = "0"
    for o in objects:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = o["name"]
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = str(int(o["truncated"]))
        ET.SubElement(obj, "difficult").text = str(int(o["difficult"]))
        box = ET.SubElement(obj, "bndbox")
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), o["box"], strict=True):
            ET.SubElement(box, tag).text = str(value)
    ET.indent(root, space="\t")
    return ET.tostring(root, encoding="unicode") + "\n"


def _class_flags(objects: list[dict]) -> dict[str, int]:
    """VOC per-class flag of one image: 1 any non-difficult instance, 0 only difficult ones."""
    flags: dict[str, int] = {}
    for o in objects:
        flags[o["name"]] = max(flags.get(o["name"], 0), 0 if o["difficult"] else 1)
    return flags


def _params(num_train: int, num_val: int, num_test: int, image_size: int, seed: int) -> dict:
    return {
        "format_version": _FORMAT_VERSION,
        "num_train": int(num_train),
        "num_val": int(num_val),
        "num_test": int(num_test),
        "image_size": int(image_size),
        "seed": int(seed),
    }


def _write_set(out: Path, params: dict) -> None:
    """Write every file of the set into the (empty, private) folder ``out``; marker last."""
    size = params["image_size"]
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    splits = {"train": params["num_train"], "val": params["num_val"], "test": params["num_test"]}
    ids: dict[str, list[str]] = {}
    flags: dict[str, list[dict[str, int]]] = {}
    counter = 0
    for split_no, (split, count) in enumerate(splits.items()):
        ids[split], flags[split] = [], []
        for i in range(count):
            counter += 1
            image_id = f"{counter:06d}"
            rng = np.random.default_rng([params["seed"], split_no, i])
            image, objects = _render(size, rng)
            Image.fromarray(image).save(
                out / "JPEGImages" / f"{image_id}.jpg", quality=_JPEG_QUALITY
            )
            (out / "Annotations" / f"{image_id}.xml").write_text(
                _annotation_xml(image_id, size, objects)
            )
            ids[split].append(image_id)
            flags[split].append(_class_flags(objects))
    ids["trainval"] = ids["train"] + ids["val"]
    flags["trainval"] = flags["train"] + flags["val"]
    main = out / "ImageSets" / "Main"
    for split in ("train", "val", "trainval", "test"):
        if split == "test" and not ids["test"]:
            continue
        (main / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids[split]))
        for cls in DEMO_CLASSES:
            lines = (
                f"{i} {f.get(cls, -1):2d}\n" for i, f in zip(ids[split], flags[split], strict=True)
            )
            (main / f"{cls}_{split}.txt").write_text("".join(lines))
    (out / "labels.txt").write_text("".join(f"{c}\n" for c in DEMO_CLASSES))
    info = {**params, "classes": DEMO_CLASSES, "scenes": DEMO_SCENES}
    (out / MARKER).write_text(json.dumps(info, indent=2) + "\n")


def _read_marker(voc: Path) -> dict | None:
    try:
        return json.loads((voc / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _is_demo_folder(voc: Path) -> bool:
    """True when ``voc`` was written by this module (so it may be replaced)."""
    if _read_marker(voc) is not None:
        return True
    try:
        return (voc / "labels.txt").read_text().split() == DEMO_CLASSES
    except OSError:
        return False


def demo_is_complete(voc: str | Path, **params: int) -> bool:
    """Whether ``voc`` holds a finished demo set, generated with ``params`` when given."""
    info = _read_marker(Path(voc))
    if info is None:
        return False
    return all(info.get(k) == v for k, v in params.items())


def generate_demo(
    root: str | Path,
    num_train: int = 600,
    num_val: int = 300,
    image_size: int = 192,
    seed: int = 0,
    overwrite: bool = False,
    num_test: int = 0,
) -> Path:
    """Write the demo set under ``root/VOCdevkit/VOC2007`` and return that folder.

    The set is written into a private temporary folder next to the target and renamed into
    place only when complete (marker file last), so readers never see a half-written set
    and concurrent callers (e.g. several training processes) cannot corrupt each other.

    Args:
        root: folder to hold ``VOCdevkit``.
        num_train, num_val, num_test: images per split (``test.txt`` only if num_test > 0).
        image_size: side of the square images, in pixels.
        seed: the same seed gives the same annotations and images.
        overwrite: replace an existing demo set (one already complete with the same
            parameters is kept: its content is identical). A folder not written by this
            module is never deleted.

    Raises:
        DataError: the target exists (and ``overwrite`` is False, or it is not a demo set),
            or an argument is out of range.
    """
    if min(num_train, num_val) < 1 or num_test < 0:
        raise DataError(
            f"demo set needs num_train, num_val >= 1 and num_test >= 0, got {num_train}, {num_val}, {num_test}"
        )
    if image_size < 32:
        raise DataError(f"demo image_size must be >= 32 pixels, got {image_size}")
    params = _params(num_train, num_val, num_test, image_size, seed)
    devkit = Path(root) / "VOCdevkit"
    target = devkit / "VOC2007"
    if target.exists():
        if not overwrite:
            raise DataError(f"{target} already exists; pass overwrite=True to replace it")
        if not _is_demo_folder(target):
            raise DataError(f"{target} exists and is not an mlic demo set; refusing to delete it")
    devkit.mkdir(parents=True, exist_ok=True)
    tmp = devkit / f".VOC2007.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        _write_set(tmp, params)
        # A complete set with the same parameters has the same content: if another process
        # finished first, keep its copy (it may already be reading it) and drop ours.
        if target.exists() and not demo_is_complete(target, **params):
            trash = devkit / f".VOC2007.old-{uuid.uuid4().hex[:8]}"
            target.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        if not target.exists():
            tmp.rename(target)
    except OSError as e:
        # Lost a rename race to another process that wrote the same set: that's fine.
        if not demo_is_complete(target, **params):
            raise DataError(f"{target}: could not write the demo set ({e})") from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def ensure_demo(
    root: str | Path,
    num_train: int = 600,
    num_val: int = 300,
    image_size: int = 192,
    seed: int = 0,
    num_test: int = 0,
) -> Path:
    """Return ``root/VOCdevkit/VOC2007``, generating it first unless a complete demo set
    with these parameters is already there (an incomplete or different one is replaced)."""
    params = _params(num_train, num_val, num_test, image_size, seed)
    target = Path(root) / "VOCdevkit" / "VOC2007"
    if demo_is_complete(target, **params):
        return target
    return generate_demo(
        root,
        num_train=num_train,
        num_val=num_val,
        num_test=num_test,
        image_size=image_size,
        seed=seed,
        overwrite=True,
    )
