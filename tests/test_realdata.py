"""Real PASCAL VOC 2007 photographs (``../shared/realdata``; skipped where it is absent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import mlic
from mlic.cli import demo_overrides
from mlic.data.voc import VOC_CLASSES, load_voc
from mlic.engine.trainer import train
from test_train import read_metrics, tiny_cfg

REAL = (
    Path(__file__).resolve().parents[2]
    / "shared/realdata/voc2007-trainval-subset/VOCdevkit/VOC2007"
)
pytestmark = pytest.mark.skipif(
    not (REAL / "ImageSets" / "Main" / "trainval.txt").exists(),
    reason="../shared/realdata (real VOC 2007 subset) is not here",
)


def test_voc_reader_on_the_real_subset() -> None:
    trainval = load_voc(REAL, "trainval")
    train_split, val_split = load_voc(REAL, "train"), load_voc(REAL, "val")
    assert len(trainval) == 765 and len(train_split) == 579 and len(val_split) == 186
    assert trainval.names == list(VOC_CLASSES) and len(trainval.names) == 20
    assert all(p.exists() for p in trainval.images)
    t = trainval.targets
    # README: 1.62 classes per image counting difficult-only objects, 1.48 without
    assert (t == 1).sum() / len(t) == pytest.approx(1.48, abs=0.01)
    assert (t != 0).sum() / len(t) == pytest.approx(1.62, abs=0.01)
    counts = dict(zip(trainval.names, (t == 1).sum(axis=0).tolist(), strict=True))
    assert counts["person"] == max(counts.values())
    # an image whose only objects of a class are all difficult: that class is ignored (-1)
    assert (t == -1).any() and not ((t == -1) & (t == 1)).any()


def test_difficult_only_objects_are_ignored_not_negative() -> None:
    """Checked against the XML itself for every image with an ignored class."""
    import xml.etree.ElementTree as ET

    ann = load_voc(REAL, "trainval")
    rows, cols = np.nonzero(ann.targets == -1)
    assert len(rows) > 0
    for r, c in zip(rows[:20], cols[:20], strict=True):
        xml = REAL / "Annotations" / f"{ann.images[r].stem}.xml"
        objs = [
            (o.findtext("name"), o.findtext("difficult")) for o in ET.parse(xml).iterfind("object")
        ]
        flags = [d for n, d in objs if n == ann.names[c]]
        assert flags and all(d == "1" for d in flags)


def test_one_epoch_on_a_few_real_photographs(tmp_path: Path) -> None:
    cfg = tiny_cfg(
        REAL,
        tmp_path,
        "real",
        **{
            "data.train": "train",
            "data.val": "val",
            "data.max_train_images": "40",
            "data.max_val_images": "16",
            "train.epochs": "1",
            "data.image_size": "96",
        },
    )
    result = train(cfg)
    rows = read_metrics(tmp_path / "real")
    assert len(rows) == 1 and 0.0 <= result["best_mAP"] <= 1.0
    _, meta = mlic.load_checkpoint(tmp_path / "real" / "best.safetensors")
    assert meta["label_names"] == list(VOC_CLASSES) and len(meta["thresholds"]) == 20


def test_demo_runs_on_a_voc_folder() -> None:
    """``mlic demo data.root=<VOC folder>``: the same recipe on the real photographs."""
    out = demo_overrides([f"data.root={REAL.parent.parent}"])  # the folder holding VOCdevkit
    assert "data.format=voc" in out and f"data.root={REAL}" in out
    assert "data.train=train" in out and "data.val=val" in out  # no test.txt in the subset
    assert demo_overrides(["train.epochs=1"]) == ["train.epochs=1"]  # the generated set
    assert demo_overrides([f"data.root={REAL}", "data.val=train"])[-2] == "data.val=train"
