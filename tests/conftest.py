"""Shared fixtures: small real-format datasets written by the tests themselves."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(min(2, os.cpu_count() or 1))

TINY_BACKBONE = "test_resnet"  # timm's tiny test network: real ResNet blocks, ~0.1 M parameters


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def write_image(path: Path, seed: int, size: int = 48) -> None:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, quality=90)


def no_hang(fn: Any, *args: Any, seconds: float = 60) -> Any:
    """Run ``fn`` in a thread; fail (instead of hanging the suite) if it blocks."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 -- handed to the test
            out["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{fn.__name__} blocked (reading a FIFO?)"
    if "error" in out:
        raise out["error"]
    return out.get("value")


def one_error_line(argv: list[str], capsys: pytest.CaptureFixture, seconds: float = 60) -> str:
    """Run the CLI with ``argv``; assert exit code 2 and one ``mlic: error:`` line; return it."""
    from mlic.cli import main

    try:
        code = no_hang(main, argv, seconds=seconds)
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlic: error: "), err
    return lines[0]


def voc_xml(filename: str, objects: list[tuple[str, int]]) -> str:
    objs = "".join(
        f"<object><name>{n}</name><difficult>{d}</difficult>"
        "<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>10</xmax><ymax>10</ymax></bndbox></object>"
        for n, d in objects
    )
    return f"<annotation><filename>{filename}</filename><size><width>48</width><height>48</height><depth>3</depth></size>{objs}</annotation>"


def make_voc(
    root: Path, splits: dict[str, list[list[tuple[str, int]]]], labels_txt: list[str] | None = None
) -> Path:
    """Write a VOC2007 tree; ``splits`` maps split -> per-image object lists [(name, difficult)]."""
    voc = root / "VOCdevkit" / "VOC2007"
    (voc / "Annotations").mkdir(parents=True, exist_ok=True)
    (voc / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    k = 0
    for split, images in splits.items():
        ids = []
        for objects in images:
            image_id = f"{k:06d}"
            write_image(voc / "JPEGImages" / f"{image_id}.jpg", k)
            (voc / "Annotations" / f"{image_id}.xml").write_text(
                voc_xml(f"{image_id}.jpg", objects)
            )
            ids.append(image_id)
            k += 1
        (voc / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    if labels_txt:
        (voc / "labels.txt").write_text("\n".join(labels_txt) + "\n")
    return voc


def make_coco(
    root: Path, categories: list[tuple[int, str]], images: list[list[int]]
) -> tuple[Path, Path]:
    """Write an instances JSON + images; ``images`` lists category ids per image."""
    img_dir = root / "images"
    anns, imgs = [], []
    for i, cats in enumerate(images):
        name = f"{i:012d}.jpg"
        write_image(img_dir / name, 100 + i)
        imgs.append({"id": 1000 + i, "file_name": name, "width": 48, "height": 48})
        for c in cats:
            anns.append(
                {"id": len(anns) + 1, "image_id": 1000 + i, "category_id": c, "bbox": [0, 0, 5, 5]}
            )
    path = root / "instances_train2014.json"
    path.write_text(
        json.dumps(
            {
                "images": imgs,
                "annotations": anns,
                "categories": [{"id": c, "name": n} for c, n in categories],
            }
        )
    )
    return path, img_dir


@pytest.fixture(autouse=True)
def _own_working_directory(tmp_path_factory: pytest.TempPathFactory, monkeypatch) -> Path:
    """Every test runs in an empty folder of its own: none reads or writes the folder pytest
    was started from (where `mlic demo` may have left runs/demo, or a user keeps data/)."""
    cwd = tmp_path_factory.mktemp("cwd")
    monkeypatch.chdir(cwd)
    return cwd


@pytest.fixture
def tiny_voc(tmp_path: Path) -> Path:
    """A 5-class VOC-layout set with train (24) and val (12) images of random pixels."""
    names = ["cat", "dog", "car", "person", "tree"]
    rng = np.random.default_rng(0)

    def sample(n: int) -> list[list[tuple[str, int]]]:
        out = []
        for _ in range(n):
            k = rng.integers(1, 3)
            chosen = rng.choice(len(names), size=k, replace=False)
            out.append([(names[c], 0) for c in chosen])
        return out

    return make_voc(tmp_path, {"train": sample(24), "val": sample(12)}, labels_txt=names)


from serve_fixtures import served  # noqa: E402,F401  (session fixture of the serve tests)
