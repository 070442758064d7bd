"""The generated demo set: VOC layout, real-photo images, determinism, label structure."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mlic.data.demo import DEMO_CLASSES, DEMO_SCENES, MARKER, ensure_demo, generate_demo
from mlic.data.voc import load_voc
from mlic.errors import DataError

SMALL = {"num_train": 40, "num_val": 20, "image_size": 96}


@pytest.fixture(scope="module")
def small_voc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_demo(tmp_path_factory.mktemp("demo_small"), seed=0, **SMALL)


@pytest.fixture(scope="module")
def medium_train(tmp_path_factory: pytest.TempPathFactory):
    """200 training images (small pixels: label statistics do not depend on image size)."""
    voc = generate_demo(
        tmp_path_factory.mktemp("demo_medium"), num_train=200, num_val=1, image_size=64
    )
    return voc, load_voc(voc, "train")


def _xml_objects(path: Path) -> list[tuple[str, int, tuple[int, ...]]]:
    root = ET.parse(path).getroot()
    out = []
    for obj in root.iter("object"):
        box = obj.find("bndbox")
        coords = tuple(int(box.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax"))
        out.append((obj.findtext("name"), int(obj.findtext("difficult")), coords))
    return out


def _split_ids(voc: Path, split: str) -> list[str]:
    return (voc / "ImageSets" / "Main" / f"{split}.txt").read_text().split()


def test_layout_and_xml(small_voc: Path) -> None:
    assert small_voc.name == "VOC2007" and small_voc.parent.name == "VOCdevkit"
    train, val = _split_ids(small_voc, "train"), _split_ids(small_voc, "val")
    assert len(train) == 40 and len(val) == 20 and not set(train) & set(val)
    assert _split_ids(small_voc, "trainval") == train + val
    assert (small_voc / "labels.txt").read_text().split() == DEMO_CLASSES
    assert len(DEMO_CLASSES) >= 10 and len(set(DEMO_CLASSES)) == len(DEMO_CLASSES)
    assert (small_voc / MARKER).is_file()
    assert not list(small_voc.parent.glob(".VOC2007.*")), "temporary folders left behind"

    for image_id in train + val:
        root = ET.parse(small_voc / "Annotations" / f"{image_id}.xml").getroot()
        assert root.tag == "annotation"
        assert root.findtext("filename") == f"{image_id}.jpg"
        assert [root.findtext(f"size/{t}") for t in ("width", "height", "depth")] == [
            "96",
            "96",
            "3",
        ]
        objects = _xml_objects(small_voc / "Annotations" / f"{image_id}.xml")
        assert objects, image_id
        assert 1 <= len({name for name, _, _ in objects}) <= 4
        assert any(d == 0 for _, d, _ in objects), f"{image_id}: only difficult objects"
        for name, difficult, (x0, y0, x1, y1) in objects:
            assert name in DEMO_CLASSES and difficult in (0, 1)
            assert 1 <= x0 <= x1 <= 96 and 1 <= y0 <= y1 <= 96

    # Per-class VOC lists agree with the XML: 1 / 0 (difficult only) / -1.
    first = train[0]
    names = {n: d for n, d, _ in _xml_objects(small_voc / "Annotations" / f"{first}.xml")}
    for cls in DEMO_CLASSES:
        line = (small_voc / "ImageSets" / "Main" / f"{cls}_train.txt").read_text().splitlines()[0]
        image_id, flag = line.split()
        expected = -1 if cls not in names else (0 if names[cls] else 1)
        assert image_id == first and int(flag) == expected


def test_images_are_textured_rgb_jpegs(small_voc: Path) -> None:
    for image_id in _split_ids(small_voc, "trainval")[:20]:
        with Image.open(small_voc / "JPEGImages" / f"{image_id}.jpg") as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (96, 96)
            pixels = np.asarray(im, dtype=np.float32)
        # Photographic content: many distinct colours and local texture, not flat fills.
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 1000
        assert np.abs(np.diff(pixels, axis=1)).mean() > 2.0


def test_voc_loader_reads_it(small_voc: Path) -> None:
    ann = load_voc(small_voc, "train")
    assert ann.names == DEMO_CLASSES
    assert ann.targets.shape == (40, len(DEMO_CLASSES))
    assert ((ann.targets == 1).sum(1) >= 1).all()
    assert all(p.is_file() for p in ann.images)
    assert len(load_voc(small_voc, "val")) == 20


def test_deterministic_for_a_seed(tmp_path: Path, small_voc: Path) -> None:
    again = generate_demo(tmp_path / "a", seed=0, **SMALL)
    for sub in ("Annotations", "ImageSets/Main"):
        for f in sorted((small_voc / sub).iterdir()):
            assert (again / sub / f.name).read_bytes() == f.read_bytes(), f.name
    for split in ("train", "val"):
        np.testing.assert_array_equal(
            load_voc(small_voc, split).targets, load_voc(again, split).targets
        )
    image = "JPEGImages/000001.jpg"
    assert (again / image).read_bytes() == (small_voc / image).read_bytes()

    other = generate_demo(tmp_path / "b", seed=1, **SMALL)
    assert not np.array_equal(
        load_voc(small_voc, "train").targets, load_voc(other, "train").targets
    )
    xml = "Annotations/000001.xml"
    assert (other / xml).read_bytes() != (small_voc / xml).read_bytes()


def test_smaller_set_is_a_prefix(tmp_path: Path, small_voc: Path) -> None:
    """Image i of a split depends only on (seed, split, i)."""
    small = generate_demo(tmp_path, num_train=5, num_val=3, image_size=96, seed=0)
    for i in range(1, 6):
        name = f"Annotations/{i:06d}.xml"
        assert (small / name).read_bytes() == (small_voc / name).read_bytes()


def test_scene_pairs_cooccur(medium_train) -> None:
    _, ann = medium_train
    present = ann.targets == 1
    assert (present.sum(0) >= 5).all(), dict(zip(ann.names, present.sum(0).tolist(), strict=True))
    counts = np.bincount((ann.targets != 0).sum(1), minlength=6)
    assert counts[0] == 0 and counts[5:].sum() == 0  # 1-4 labels per image
    col = {n: i for i, n in enumerate(ann.names)}
    assert {"cat", "cup"} <= DEMO_SCENES["home"].keys()
    assert {"rocket", "shuttle"} <= DEMO_SCENES["space"].keys()
    for a, b in (("cat", "cup"), ("rocket", "shuttle")):
        pa, pb = present[:, col[a]].mean(), present[:, col[b]].mean()
        both = (present[:, col[a]] & present[:, col[b]]).mean()
        assert both > 2.0 * pa * pb, (a, b, both, pa * pb)  # lift far above independence
    # Classes from different scenes rarely meet.
    cross = (present[:, col["cat"]] & present[:, col["rocket"]]).mean()
    assert cross < 0.5 * present[:, col["cat"]].mean() * present[:, col["rocket"]].mean() + 0.01


def test_some_objects_are_difficult(medium_train) -> None:
    voc, ann = medium_train
    flags = [
        d
        for image_id in _split_ids(voc, "train")
        for _, d, _ in _xml_objects(voc / "Annotations" / f"{image_id}.xml")
    ]
    fraction = np.mean(flags)
    assert 0.005 < fraction < 0.15, fraction
    assert (ann.targets == -1).any()


def test_generate_refuses_to_clobber(tmp_path: Path) -> None:
    voc = generate_demo(tmp_path, num_train=2, num_val=1, image_size=64)
    with pytest.raises(DataError, match="already exists"):
        generate_demo(tmp_path, num_train=2, num_val=1, image_size=64)
    assert generate_demo(tmp_path, num_train=3, num_val=1, image_size=64, overwrite=True) == voc
    assert len(_split_ids(voc, "train")) == 3

    real = tmp_path / "real" / "VOCdevkit" / "VOC2007"
    (real / "Annotations").mkdir(parents=True)
    with pytest.raises(DataError, match="not an mlic demo set"):
        generate_demo(tmp_path / "real", num_train=2, num_val=1, overwrite=True)
    assert (real / "Annotations").is_dir()
    with pytest.raises(DataError, match="num_train"):
        generate_demo(tmp_path / "x", num_train=0, num_val=1)


def test_ensure_demo_reuses_or_regenerates(tmp_path: Path) -> None:
    kw = {"num_train": 3, "num_val": 2, "image_size": 64}
    voc = ensure_demo(tmp_path, **kw)
    assert len(_split_ids(voc, "trainval")) == 5
    sentinel = voc / "sentinel"
    sentinel.write_text("kept")
    assert ensure_demo(tmp_path, **kw) == voc and sentinel.exists()  # complete: reused

    (voc / MARKER).unlink()  # as if interrupted before the marker: regenerate
    assert ensure_demo(tmp_path, **kw) == voc
    assert (voc / MARKER).exists() and not sentinel.exists()

    voc = ensure_demo(tmp_path, **{**kw, "num_train": 4})  # other parameters: regenerate
    assert len(_split_ids(voc, "train")) == 4
    assert not list(voc.parent.glob(".VOC2007.*"))


def test_concurrent_ensure_demo_agree(tmp_path: Path) -> None:
    """Several processes (e.g. DDP ranks) may call ensure_demo at once; all get one set."""
    kw = {"num_train": 6, "num_val": 2, "image_size": 48}
    with ThreadPoolExecutor(3) as pool:
        paths = list(pool.map(lambda _: ensure_demo(tmp_path, **kw), range(3)))
    assert len(set(paths)) == 1
    assert len(load_voc(paths[0], "trainval")) == 8
    assert not list(paths[0].parent.glob(".VOC2007.*"))
