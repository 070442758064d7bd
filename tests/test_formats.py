"""VG-500, NUS-WIDE and Open Images readers in their distributed layouts; annotation problems
(duplicates, missing keys, images without labels, classes without positives) in every reader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import make_coco, make_voc, write_image
from mlic.config import load_config
from mlic.data.coco import load_coco
from mlic.data.csv import load_csv
from mlic.data.dataset import load_split
from mlic.data.labels import LabelSet
from mlic.data.nuswide import load_nuswide
from mlic.data.openimages import load_openimages, read_class_descriptions
from mlic.data.vg import load_vg500
from mlic.data.voc import load_voc
from mlic.errors import ConfigError, DataError
from mlic.metrics import average_precision_per_class, multilabel_metrics


# ----------------------------------------------------------------------------- VG-500
def make_vg500(
    root: Path, splits: dict[str, dict[str, list[int]]], second: tuple[str, ...] = ()
) -> Path:
    """SSGRL's files: ``<split>_list_500.txt`` + one ``vg_category_500_labels_index.json``;
    images in ``VG_100K`` (or ``VG_100K_2`` for names in ``second``)."""
    root.mkdir(parents=True, exist_ok=True)
    index: dict[str, list[int]] = {}
    for split, entries in splits.items():
        (root / f"{split}_list_500.txt").write_text("".join(f"{n}\n" for n in entries))
        index.update(entries)
        for k, name in enumerate(entries):
            write_image(root / ("VG_100K_2" if name in second else "VG_100K") / name, k)
    (root / "vg_category_500_labels_index.json").write_text(json.dumps(index))
    return root


def test_vg500_reads_ssgrl_layout(tmp_path: Path) -> None:
    vg = make_vg500(
        tmp_path / "VG",
        {
            "train": {"2328403.jpg": [0, 17, 499], "1592810.jpg": [17], "498046.jpg": []},
            "test": {"2336863.jpg": [3]},
        },
        second=("1592810.jpg",),
    )
    ann = load_vg500(vg, "train")
    assert ann.num_classes == 500 and ann.names[:3] == ["0", "1", "2"]
    assert [p.name for p in ann.images] == ["2328403.jpg", "1592810.jpg", "498046.jpg"]
    assert ann.images[1] == vg / "VG_100K_2" / "1592810.jpg"  # found in the second folder
    assert all(p.exists() for p in ann.images)
    assert np.flatnonzero(ann.targets[0]).tolist() == [0, 17, 499]
    assert np.flatnonzero(ann.targets[1]).tolist() == [17] and ann.targets.dtype == np.int8
    assert ann.warnings == ["498046.jpg: no labels (kept as an all-negative image)"]
    test = load_vg500(vg, "test")
    assert len(test) == 1 and test.targets[0, 3] == 1
    assert len(load_vg500(vg, "test_list_500.txt")) == 1  # a list-file name works too


def test_vg500_category_files(tmp_path: Path) -> None:
    vg = make_vg500(tmp_path / "VG", {"train": {"1.jpg": [1]}})
    names = [f"object{i}" for i in range(500)]
    (vg / "cats.json").write_text(json.dumps(names))
    (vg / "cats_index.json").write_text(json.dumps({n: i for i, n in enumerate(names)}))
    (vg / "cats.txt").write_text("\n".join(names) + "\n")
    for f in ("cats.json", "cats_index.json", "cats.txt"):
        assert load_vg500(vg, "train", categories_file=f).names == names, f
    (vg / "short.txt").write_text("a\nb\n")
    with pytest.raises(DataError, match=r"short\.txt: 2 category names, expected 500"):
        load_vg500(vg, "train", categories_file="short.txt")


def test_vg500_errors_name_file_and_line(tmp_path: Path) -> None:
    vg = make_vg500(tmp_path / "VG", {"train": {"1.jpg": [1], "2.jpg": [2]}})
    (vg / "train_list_500.txt").write_text("1.jpg\n2.jpg\n1.jpg\n")
    with pytest.raises(
        DataError, match=r"train_list_500\.txt:3: duplicate image '1\.jpg' \(first on line 1\)"
    ):
        load_vg500(vg, "train")
    (vg / "train_list_500.txt").write_text("1.jpg\n3.jpg\n")
    with pytest.raises(DataError, match=r"train_list_500\.txt:2: image '3\.jpg' has no entry"):
        load_vg500(vg, "train")
    (vg / "train_list_500.txt").write_text("1.jpg\n")
    (vg / "vg_category_500_labels_index.json").write_text('{"1.jpg": [3, 500]}')
    with pytest.raises(DataError, match=r"entry '1\.jpg' has label index 500 outside 0\.\.499"):
        load_vg500(vg, "train")
    (vg / "vg_category_500_labels_index.json").write_text('{"1.jpg": [3,\n')
    with pytest.raises(DataError, match=r"labels_index\.json:2: invalid JSON"):
        load_vg500(vg, "train")
    with pytest.raises(
        DataError, match=r"split 'val' not found; available: \['train_list_500\.txt'\]"
    ):
        load_vg500(vg, "val")


# ----------------------------------------------------------------------------- NUS-WIDE
def make_nuswide(
    root: Path, concepts: list[str], splits: dict[str, list[tuple[str, list[str]]]]
) -> Path:
    """Official layout: Concepts81.txt, ImageList/<Split>Imagelist.txt with Windows paths
    (CRLF), Groundtruth/TrainTestLabels/Labels_<concept>_<Split>.txt, Flickr/<dir>/<file>."""
    (root / "ImageList").mkdir(parents=True)
    (root / "Groundtruth" / "TrainTestLabels").mkdir(parents=True)
    (root / "Concepts81.txt").write_text("".join(f"{c}\r\n" for c in concepts))
    for split, images in splits.items():
        cap = split.capitalize()
        lines = [rel.replace("/", "\\") for rel, _ in images]
        (root / "ImageList" / f"{cap}Imagelist.txt").write_text("\r\n".join(lines) + "\r\n")
        for c in concepts:
            col = "".join(f"{int(c in labels)}\n" for _, labels in images)
            (root / "Groundtruth" / "TrainTestLabels" / f"Labels_{c}_{cap}.txt").write_text(col)
        for k, (rel, _) in enumerate(images):
            write_image(root / "Flickr" / rel, k)
    return root


def test_nuswide_reads_official_layout(tmp_path: Path) -> None:
    concepts = ["animal", "beach", "sky", "water"]
    nus = make_nuswide(
        tmp_path / "NUS-WIDE",
        concepts,
        {
            "train": [
                ("actor/0001_2124494179.jpg", ["sky"]),
                ("beach/0002_55.jpg", ["beach", "water", "sky"]),
                ("zebra/0003_9.jpg", []),
            ],
            "test": [("actor/0004_1.jpg", ["animal"])],
        },
    )
    ann = load_nuswide(nus, "train")
    assert ann.names == concepts
    assert ann.images[0] == nus / "Flickr" / "actor" / "0001_2124494179.jpg"
    assert all(p.exists() for p in ann.images)
    assert ann.targets.tolist() == [[0, 0, 1, 0], [0, 1, 1, 1], [0, 0, 0, 0]]
    assert ann.warnings == ["zebra/0003_9.jpg: no labels (kept as an all-negative image)"]
    assert load_nuswide(nus, "Test").targets.tolist() == [[1, 0, 0, 0]]


def test_nuswide_errors(tmp_path: Path) -> None:
    nus = make_nuswide(
        tmp_path / "N", ["sky", "water"], {"train": [("a/1.jpg", ["sky"]), ("a/2.jpg", [])]}
    )
    labels = nus / "Groundtruth" / "TrainTestLabels"
    (labels / "Labels_water_Train.txt").write_text("0\n2\n")
    with pytest.raises(
        DataError, match=r"Labels_water_Train\.txt:2: label must be 0 or 1, got '2'"
    ):
        load_nuswide(nus, "train")
    (labels / "Labels_water_Train.txt").write_text("0\n1\n1\n")
    with pytest.raises(
        DataError, match=r"Labels_water_Train\.txt: 3 labels but the image list has 2"
    ):
        load_nuswide(nus, "train")
    (labels / "Labels_water_Train.txt").unlink()
    with pytest.raises(DataError, match=r"Labels_water_Train\.txt: NUS-WIDE label file not found"):
        load_nuswide(nus, "train")
    with pytest.raises(
        DataError, match=r"split 'val' not known; choose one of \['train', 'test', 'all'\]"
    ):
        load_nuswide(nus, "val")
    (nus / "ImageList" / "TrainImagelist.txt").write_text("a\\1.jpg\r\na\\1.jpg\r\n")
    with pytest.raises(DataError, match=r"TrainImagelist\.txt:2: duplicate image 'a/1\.jpg'"):
        load_nuswide(nus, "train")


# ----------------------------------------------------------------------------- Open Images
LABELS_HEADER = "ImageID,Source,LabelName,Confidence\n"


def test_openimages_verified_labels_and_ignore(tmp_path: Path) -> None:
    (tmp_path / "classes.csv").write_text(
        "LabelName,DisplayName\n/m/01g317,Person\n/m/0bt9lr,Dog\n/m/01yrx,Cat\n"
    )
    (tmp_path / "labels.csv").write_text(
        LABELS_HEADER
        + (
            "000002b66c9c498e,verification,/m/01g317,1\n"
            "000002b66c9c498e,verification,/m/0bt9lr,0\n"
            "000002b97e5471a0,crowdsource-verification,/m/01yrx,1\n"
            "000002b97e5471a0,verification,/m/0ggbz1,1\n"  # not in the class list
            "000002c707c9895e,verification,/m/01g317,1\n"
            "000002c707c9895e,crowdsource-verification,/m/01g317,0\n"  # disagreeing verdicts
            "00000b4dcff7f799,verification,/m/0bt9lr,0\n"
        )
    )
    ann = load_openimages(tmp_path / "labels.csv", tmp_path / "img", tmp_path / "classes.csv")
    assert ann.names == ["Person", "Dog", "Cat"]
    assert ann.images[0] == tmp_path / "img" / "000002b66c9c498e.jpg"
    assert ann.targets.tolist() == [
        [1, 0, -1],  # verified present, verified absent, unverified = ignore
        [-1, -1, 1],
        [-1, -1, -1],  # conflict -> ignore
        [-1, 0, -1],
    ]
    assert any(
        "1 row(s) with 1 label name(s) not in the class list left out (/m/0ggbz1)" in w
        for w in ann.warnings
    )
    assert "000002c707c9895e: conflicting verdicts for /m/01g317 (set to ignore)" in ann.warnings
    assert sum("no labels" in w for w in ann.warnings) == 2
    # LabelSet counts only verified positives; -1 entries do not count as negatives in AP
    assert LabelSet.from_targets(ann.names, ann.targets).counts.tolist() == [1, 0, 1]


def test_openimages_classes_and_errors(tmp_path: Path) -> None:
    (tmp_path / "c.csv").write_text("/m/01h44,Bat\n/m/01h8tj,Bat\n/m/0k4j,Car\n")  # no header
    mids, names = read_class_descriptions(tmp_path / "c.csv")
    assert mids == ["/m/01h44", "/m/01h8tj", "/m/0k4j"]
    assert names == ["Bat (/m/01h44)", "Bat (/m/01h8tj)", "Car"]  # duplicates made unique
    (tmp_path / "c.csv").write_text("/m/0k4j,Car\n/m/0k4j,Auto\n")
    with pytest.raises(DataError, match=r"c\.csv:2: duplicate label name '/m/0k4j'"):
        read_class_descriptions(tmp_path / "c.csv")
    lab = tmp_path / "l.csv"
    lab.write_text(LABELS_HEADER + "a,verification,/m/0k4j,1\nb,verification,/m/01h44,1.0\n")
    ann = load_openimages(lab, tmp_path)
    assert ann.names == ["/m/01h44", "/m/0k4j"] and ann.targets.tolist() == [[-1, 1], [1, -1]]
    assert load_openimages(lab, tmp_path, class_names=["/m/0k4j"]).targets.tolist() == [[1], [-1]]
    lab.write_text(LABELS_HEADER + "a,verification,/m/0k4j,1\nb,machine,/m/0k4j,0.7\n")
    with pytest.raises(DataError, match=r"l\.csv:3: Confidence must be 0 or 1 .* got '0\.7'"):
        load_openimages(lab, tmp_path)
    lab.write_text(LABELS_HEADER + "a,verification,/m/0k4j\n")
    with pytest.raises(DataError, match=r"l\.csv:2: expected 4 columns, got 3"):
        load_openimages(lab, tmp_path)
    lab.write_text("ImageID,Source,Label,Confidence\n")
    with pytest.raises(DataError, match=r"l\.csv:1: missing column\(s\) \['LabelName'\]"):
        load_openimages(lab, tmp_path)


# ----------------------------------------------------------------------------- load_split wiring
def _data(**over: str):
    return load_config(None, [f"data.{k}={v}" for k, v in over.items()]).data


def test_load_split_reads_the_new_formats(tmp_path: Path) -> None:
    make_vg500(tmp_path / "VG", {"train": {"1.jpg": [1]}, "test": {"2.jpg": [2], "3.jpg": [1]}})
    cfg = _data(format="vg500", root=str(tmp_path / "VG"), train="train", val="test")
    train = load_split(cfg, "train")
    val = load_split(cfg, "val", class_names=train.names)
    assert (len(train), len(val), val.num_classes) == (1, 2, 500)

    make_nuswide(
        tmp_path / "N",
        ["sky", "sea"],
        {"train": [("a/1.jpg", ["sky"])], "test": [("b/2.jpg", ["sea"])]},
    )
    cfg = _data(format="nuswide", root=str(tmp_path / "N"), train="train", val="test")
    assert load_split(cfg, "val", class_names=["sky", "sea"]).targets.tolist() == [[0, 1]]

    oi = tmp_path / "OI"
    oi.mkdir()
    (oi / "classes.csv").write_text("/m/a,A\n/m/b,B\n")
    (oi / "train.csv").write_text(LABELS_HEADER + "x,verification,/m/b,1\n")
    (oi / "val.csv").write_text(LABELS_HEADER + "y,verification,/m/a,0\n")
    cfg = _data(
        format="openimages",
        root=str(oi),
        train="train.csv",
        val="val.csv",
        train_images="train",
        val_images="validation",
        classes="classes.csv",
    )
    train = load_split(cfg, "train")
    val = load_split(cfg, "val", class_names=train.names)
    assert train.names == ["A", "B"] and val.targets.tolist() == [[0, -1]]
    assert val.images == [oi / "validation" / "y.jpg"]
    with pytest.raises(DataError, match="data.train_images must name the OpenImages image folder"):
        load_split(_data(format="openimages", root=str(oi), train="train.csv"), "train")
    with pytest.raises(ConfigError, match="data.format='vg200' is not allowed"):
        _data(format="vg200")


# ----------------------------------------------------------------------------- annotation problems
def test_images_without_labels_are_kept_and_named(tmp_path: Path) -> None:
    voc = make_voc(tmp_path / "v", {"train": [[("cat", 0)], [], [("dog", 1)]]})
    ann = load_voc(voc, "train")
    assert len(ann) == 3
    assert ann.warnings == [
        "000001: no labels (kept as an all-negative image)",
        "000002: no labels (kept as an all-negative image)",  # only a difficult object
    ]
    path, img_dir = make_coco(tmp_path / "c", [(1, "person")], [[1], []])
    coco = load_coco(path, img_dir)
    assert coco.warnings == [
        "000000000001.jpg (image id 1001): no labels (kept as an all-negative image)"
    ]
    write_image(tmp_path / "im0.jpg", 0)
    (tmp_path / "t.csv").write_text("image,labels\nim0.jpg,cat\nim1.jpg,\n")
    assert load_csv(tmp_path / "t.csv", tmp_path).warnings == [
        "im1.jpg (line 3): no labels (kept as an all-negative image)"
    ]
    cfg = _data(format="voc", root=str(voc), max_train_images="1")
    assert load_split(cfg, "train").warnings == ann.warnings  # kept through the limit


def test_duplicate_images_are_errors_in_every_reader(tmp_path: Path) -> None:
    voc = make_voc(tmp_path / "v", {"train": [[("cat", 0)], [("dog", 0)]]})
    (voc / "ImageSets" / "Main" / "train.txt").write_text("000000\n000001\n000000\n")
    with pytest.raises(
        DataError, match=r"train\.txt:3: duplicate image id '000000' \(first on line 1\)"
    ):
        load_voc(voc, "train")
    path, img_dir = make_coco(tmp_path / "c", [(1, "person")], [[1], [1]])
    data = json.loads(path.read_text())
    data["images"][1]["id"] = data["images"][0]["id"]
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"images\[1\]: duplicate image id 1000"):
        load_coco(path, img_dir)
    (tmp_path / "d.csv").write_text("image,labels\na.jpg,cat\nb.jpg,dog\na.jpg,dog\n")
    with pytest.raises(DataError, match=r"d\.csv:4: duplicate image 'a\.jpg' \(first on line 2\)"):
        load_csv(tmp_path / "d.csv", tmp_path)


def test_coco_annotation_entry_missing_key(tmp_path: Path) -> None:
    path, img_dir = make_coco(tmp_path, [(1, "person")], [[1], [1]])
    data = json.loads(path.read_text())
    del data["annotations"][1]["category_id"]
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"annotations\[1\]: missing key 'category_id'"):
        load_coco(path, img_dir)
    data["annotations"] = data["annotations"][:1]
    del data["images"][0]["file_name"]
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"images\[0\]: missing key 'file_name'"):
        load_coco(path, img_dir)


def test_class_without_training_positives_is_left_out_of_map() -> None:
    targets = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, -1]], dtype=np.int8)
    scores = np.array([[0.9, 0.2, 0.5], [0.1, 0.8, 0.4], [0.7, 0.6, 0.3], [0.2, 0.1, 0.9]])
    ap = average_precision_per_class(scores, targets)
    assert np.isnan(ap[2]) and not np.isnan(ap[:2]).any()
    assert multilabel_metrics(scores, targets)["mAP"] == pytest.approx(np.mean(ap[:2]))
    assert LabelSet.from_targets(["a", "b", "c"], targets).counts.tolist() == [2, 2, 0]
