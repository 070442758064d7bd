"""`mlic data check|stats`, and what `mlic train` does with broken images before training."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from conftest import TINY_BACKBONE, make_voc
from mlic.cli import main
from mlic.config import load_config
from mlic.engine.trainer import train
from mlic.errors import DataError

NAMES = ["cat", "dog", "car"]


@pytest.fixture
def voc(tmp_path: Path) -> Path:
    """8 train + 4 val images: train image 1 truncated, train image 2 gone, one unlabelled."""
    splits = {
        "train": [
            [("cat", 0), ("dog", 0)],
            [("dog", 0)],
            [("car", 0)],
            [("cat", 0)],
            [("dog", 0), ("car", 0)],
            [("cat", 0)],
            [],
            [("car", 0), ("cat", 0)],
        ],
        "val": [[("cat", 0)], [("dog", 0)], [("car", 0)], [("cat", 0), ("dog", 0)]],
    }
    root = make_voc(tmp_path / "data", splits, labels_txt=NAMES)
    return root


def break_images(voc: Path) -> tuple[Path, Path]:
    truncated, gone = voc / "JPEGImages" / "000001.jpg", voc / "JPEGImages" / "000002.jpg"
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    gone.unlink()
    return truncated, gone


def write_config(tmp_path: Path, voc: Path) -> Path:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  format: voc\n  root: {voc}\n  workers: 0\n")
    return cfg


def test_data_check_lists_every_broken_image(
    voc: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg = write_config(tmp_path, voc)
    assert main(["data", "check", str(cfg), "-q"]) == 0
    out = capsys.readouterr().out
    assert "train: 8 images, 3 classes, 0 broken" in out and "val: 4 images" in out
    assert "000006: no labels" in out  # the annotation warning is reported too
    truncated, gone = break_images(voc)
    assert main(["data", "check", str(cfg), "-q", "--workers", "2"]) == 1
    out = capsys.readouterr().out
    assert f"  {truncated}: cannot decode image" in out and f"  {gone}: image file not found" in out
    assert "2 broken image(s) among 12 (full decode check" in out
    assert main(["data", "check", str(cfg), "-q", "--fast"]) == 1  # headers + end markers
    out = capsys.readouterr().out
    assert str(gone) in out and f"{truncated}: truncated JPEG" in out and "header-only" in out


def test_data_check_annotation_error_names_the_file(
    voc: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (voc / "Annotations" / "000003.xml").write_text("<annotation><object>\n</annotation>")
    assert main(["data", "check", str(write_config(tmp_path, voc))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mlic: error: ") and "000003.xml:2: malformed XML" in err


def test_data_stats_writes_markdown_and_plots(
    voc: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out_dir = tmp_path / "stats"
    code = main(["data", "stats", str(write_config(tmp_path, voc)), "--output", str(out_dir)])
    assert code == 0
    printed = capsys.readouterr().out
    # train: 2+1+1+1+2+1+0+2 = 10 positives over 8 images
    assert "train: 8 images, 3 classes, 1.25 labels/image, 1 without labels, 0 broken" in printed
    assert "val: 4 images, 3 classes, 1.25 labels/image" in printed
    md = (out_dir / "stats.md").read_text()
    assert "| train | 8 | 3 | 1.250 | 2 | 0.4167 | 1 | 0 | 0 |" in md
    assert "| cat | 4 | 2 |" in md and "| dog | 3 | 2 |" in md and "| car | 3 | 1 |" in md
    assert "![co-occurrence](cooccurrence.png)" in md and "- warning: 000006: no labels" in md
    for png in ("class_frequency.png", "cooccurrence.png"):
        with Image.open(out_dir / png) as im:
            assert im.format == "PNG" and min(im.size) > 100
    break_images(voc)
    assert main(["data", "stats", str(write_config(tmp_path, voc)), "--output", str(out_dir)]) == 1
    assert "- broken: `" in (out_dir / "stats.md").read_text()


def _train_cfg(voc: Path, out: Path, **over: str):
    base = {
        "data.format": "voc",
        "data.root": str(voc),
        "data.image_size": "32",
        "data.batch_size": "4",
        "data.workers": "0",
        "model.backbone": TINY_BACKBONE,
        "model.pretrained": "false",
        "train.epochs": "1",
        "train.ema": "false",
        "run.output_dir": str(out),
        "run.name": "r",
        "run.progress": "false",
        "run.tensorboard": "false",
    }
    base.update(over)
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


def test_train_stops_on_broken_images_or_skips_and_lists_them(
    voc: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    truncated, gone = break_images(voc)
    with pytest.raises(DataError) as e:
        train(_train_cfg(voc, tmp_path / "runs"))
    msg = str(e.value)
    # the fast check reads headers and end markers: the missing and the truncated file
    assert msg.startswith("2 broken image(s) found by the fast image check") and str(gone) in msg
    assert f"{truncated}: truncated JPEG" in msg
    assert not (tmp_path / "runs" / "r").exists()  # stopped before anything was written
    with pytest.raises(DataError, match="2 broken image"):  # the full check also finds truncation
        train(_train_cfg(voc, tmp_path / "runs", **{"data.image_check": "full"}))

    with caplog.at_level(logging.INFO, logger="mlic"):
        # (no calibration hold-out: the label statistics below are of every image left)
        result = train(
            _train_cfg(
                voc,
                tmp_path / "runs",
                **{
                    "data.image_check": "full",
                    "data.skip_bad_images": "true",
                    "data.calibration": "none",
                },
            )
        )
    listed = (result["run_dir"] / "bad_images.txt").read_text()
    assert f"train: {truncated}: cannot decode image" in listed and f"train: {gone}:" in listed
    assert (
        "skipping 2 broken image(s)" in caplog.text and "training on 6 train, 4 val" in caplog.text
    )
    assert "1 annotation warning(s):\n  000006: no labels" in caplog.text
    # label statistics come from the 6 images left, not the 8 listed
    stats = json.loads((result["run_dir"] / "labels" / "labels.json").read_text())
    assert stats["num_images"] == 6 and stats["counts"] == [4, 2, 2]  # cat, dog, car
    assert (result["run_dir"] / "best.safetensors").exists()


def test_a_wrong_image_folder_is_one_short_error_that_says_where_it_looked(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A CSV whose paths do not resolve (the photos are elsewhere): a short error with how many
    are missing, where they were looked for, a few of them, and no "skip them" advice that
    would drop every image."""
    rows = "".join(f"img/{i:04d}.jpg,{'cat' if i % 2 else 'dog'}\n" for i in range(300))
    for split in ("train", "val"):
        (tmp_path / f"{split}.csv").write_text("image,labels\n" + rows)
    argv = [
        "train",
        "demo",
        "data.format=csv",
        f"data.root={tmp_path}",
        "data.train=train.csv",
        "data.val=val.csv",
        f"run.output_dir={tmp_path / 'runs'}",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    line, listed = err[0], err[1:]  # the error, then the first broken files, indented
    assert line.startswith("mlic: error: ") and len(listed) == 11, err  # 10 and "... 590 more"
    assert listed[-1].strip().startswith("... and 590 more") and "Traceback" not in err
    assert "600 broken image(s)" in line
    assert f"300 of the 300 train images are not found (looked for in {tmp_path / 'img'}" in line
    assert "data.train_images" in line and "would drop them all" in line
    assert "set data.skip_bad_images=true to train" not in line
    assert not (tmp_path / "runs").exists()
