"""Real-format readers (VOC XML, COCO JSON, CSV), LabelSet statistics and loaders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_BACKBONE, make_coco, make_voc, write_image
from mlic.data import Annotations
from mlic.data.coco import load_coco
from mlic.data.csv import load_csv
from mlic.data.dataset import MultiLabelDataset, SeededSampler, build_loader
from mlic.data.labels import LabelSet, load_word_vectors, mlgcn_adjacency
from mlic.data.transforms import build_transform, load_image
from mlic.data.voc import VOC_CLASSES, load_voc
from mlic.errors import DataError


def test_voc_reads_objects_and_difficult(tmp_path: Path) -> None:
    voc = make_voc(
        tmp_path,
        {
            "trainval": [
                [("cat", 0), ("dog", 1)],  # dog only difficult -> ignore
                [("dog", 1), ("dog", 0), ("car", 0)],  # one non-difficult dog -> present
                [("person", 0)],
            ]
        },
    )
    ann = load_voc(voc, "trainval")
    assert ann.names == VOC_CLASSES
    col = {n: i for i, n in enumerate(ann.names)}
    assert ann.targets[0, col["cat"]] == 1 and ann.targets[0, col["dog"]] == -1
    assert ann.targets[1, col["dog"]] == 1 and ann.targets[1, col["car"]] == 1
    assert ann.targets[2].tolist().count(1) == 1 and ann.targets[2, col["person"]] == 1
    assert ann.targets.dtype == np.int8
    assert all(p.exists() for p in ann.images)


def test_voc_unknown_class_names_the_file(tmp_path: Path) -> None:
    voc = make_voc(tmp_path, {"train": [[("cat", 0)], [("unicorn", 0)]]})
    with pytest.raises(DataError, match=r"000001\.xml.*unknown class 'unicorn'"):
        load_voc(voc, "train")


def test_voc_missing_folder_and_split(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="VOC folder not found"):
        load_voc(tmp_path / "nope", "train")
    voc = make_voc(tmp_path, {"train": [[("cat", 0)]]})
    with pytest.raises(DataError, match=r"split 'test' not found; available: \['train'\]"):
        load_voc(voc, "test")


def test_voc_malformed_xml_names_file_and_line(tmp_path: Path) -> None:
    voc = make_voc(tmp_path, {"train": [[("cat", 0)]]})
    (voc / "Annotations" / "000000.xml").write_text(
        "<annotation>\n<object><name>cat</name>\n</annotation>"
    )
    with pytest.raises(DataError, match=r"000000\.xml:3: malformed XML"):
        load_voc(voc, "train")


def test_coco_category_id_order_and_unknown_id(tmp_path: Path) -> None:
    cats = [(18, "dog"), (1, "person"), (3, "car")]
    path, img_dir = make_coco(tmp_path, cats, [[1, 3], [18], [], [1, 1]])
    ann = load_coco(path, img_dir)
    assert ann.names == ["person", "car", "dog"]  # category-id order, not file order
    assert ann.targets.tolist() == [[1, 1, 0], [0, 0, 1], [0, 0, 0], [1, 0, 0]]
    bad, _ = make_coco(tmp_path / "bad", cats, [[1, 7]])
    with pytest.raises(
        DataError, match=r"annotations\[1\]: category_id 7 is not in the file's categories"
    ):
        load_coco(bad, img_dir)


def test_coco_missing_key(tmp_path: Path) -> None:
    p = tmp_path / "x.json"
    p.write_text('{"images": [], "annotations": []}')
    with pytest.raises(DataError, match="missing key 'categories'"):
        load_coco(p, tmp_path)


def test_csv_reader_and_errors(tmp_path: Path) -> None:
    for i in range(3):
        write_image(tmp_path / f"im{i}.jpg", i)
    p = tmp_path / "train.csv"
    p.write_text("image,labels\nim0.jpg,dog;cat\nim1.jpg,cat\nim2.jpg,\n")
    ann = load_csv(p, tmp_path)
    assert ann.names == ["cat", "dog"]
    assert ann.targets.tolist() == [[1, 1], [1, 0], [0, 0]]
    p.write_text("image,labels\nim0.jpg,dog\nim1.jpg,cat,extra\n")
    with pytest.raises(DataError, match=r"train\.csv:3: expected 2 columns"):
        load_csv(p, tmp_path)
    p.write_text("image,labels\nim0.jpg,bird\n")
    with pytest.raises(DataError, match=r"train\.csv:2: unknown label 'bird'"):
        load_csv(p, tmp_path, class_names=["cat", "dog"])


def test_labelset_statistics_and_persistence(tmp_path: Path) -> None:
    targets = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, -1, 1]], dtype=np.int8)
    ls = LabelSet.from_targets(["a", "b", "c"], targets)
    assert ls.counts.tolist() == [3, 2, 2]
    assert ls.cooccurrence.tolist() == [[0, 2, 1], [2, 0, 1], [1, 1, 0]]
    np.testing.assert_allclose(ls.conditional[0], [0, 2 / 3, 1 / 3], rtol=1e-6)
    np.testing.assert_allclose(ls.conditional[1], [1, 0, 0.5], rtol=1e-6)
    ls.save(tmp_path / "labels")
    back = LabelSet.load(tmp_path / "labels")
    assert back.names == ls.names and (back.cooccurrence == ls.cooccurrence).all()
    assert (back.counts == ls.counts).all()


def test_mlgcn_adjacency_threshold_reweight_normalise() -> None:
    cond = np.array([[0, 0.5, 0.1], [0.9, 0, 0.45], [0.2, 0.3, 0]], dtype=np.float32)
    a = mlgcn_adjacency(cond, tau=0.4, p=0.2)
    # before normalisation: row0 -> {1}, row1 -> {0, 2}, row2 -> {} ; self loops 0.8
    raw = np.array([[0.8, 0.2, 0], [0.1, 0.8, 0.1], [0, 0, 0.8]])
    d = raw.sum(1) ** -0.5
    np.testing.assert_allclose(a, d[:, None] * raw * d[None, :], rtol=1e-5)


def test_glove_vectors_matched_by_name() -> None:
    coco_names = ["person", "bicycle", "zebra", "tv"]
    vecs = load_word_vectors("glove", coco_names)
    assert vecs.shape == (4, 300)
    voc = load_word_vectors("glove", ["tvmonitor", "bicycle"])
    np.testing.assert_array_equal(voc[0], vecs[3])  # VOC tvmonitor == COCO tv
    np.testing.assert_array_equal(voc[1], vecs[1])
    assert not np.allclose(vecs[0], vecs[1])
    with pytest.raises(DataError, match="no shipped GloVe vector for class 'flux capacitor'"):
        load_word_vectors("glove", ["flux capacitor"])


def test_word_vectors_from_npy_refuse_pickle(tmp_path: Path) -> None:
    good = tmp_path / "wv.npy"
    np.save(good, np.ones((2, 8), dtype=np.float32))
    assert load_word_vectors(good, ["a", "b"]).shape == (2, 8)
    bad = tmp_path / "obj.npy"
    np.save(bad, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="not a plain .npy array"):
        load_word_vectors(bad, ["a"])
    with pytest.raises(DataError, match=r"expected \[3, D\]"):
        load_word_vectors(good, ["a", "b", "c"])


def test_annotations_validate_shapes() -> None:
    with pytest.raises(DataError, match="2 images but 1 target rows"):
        Annotations(names=["a"], images=[Path("x"), Path("y")], targets=np.zeros((1, 1)))
    with pytest.raises(DataError, match=r"targets must be 1/0/-1, found \[2\]"):
        Annotations(names=["a"], images=[Path("x")], targets=np.array([[2]]))


def test_sampler_shards_cover_everything_and_are_seeded() -> None:
    full = list(SeededSampler(10, shuffle=True, seed=3))
    again = list(SeededSampler(10, shuffle=True, seed=3))
    assert full == again and sorted(i for i, _ in full) == list(range(10))
    shards = [list(SeededSampler(10, True, 3, num_replicas=3, rank=r, pad=False)) for r in range(3)]
    assert sorted(sum(shards, [])) == sorted(full)
    padded = [list(SeededSampler(10, True, 3, num_replicas=3, rank=r, pad=True)) for r in range(3)]
    assert all(len(s) == 4 for s in padded)
    s = SeededSampler(10, True, 3)
    s.set_epoch(0, start=4)
    assert list(s) == full[4:]
    s.set_epoch(1)
    assert list(s) != full


def test_dataset_augmentation_is_reproducible_per_seed(tiny_voc: Path) -> None:
    ann = load_voc(tiny_voc, "train")
    tf = build_transform(32, (0.5,) * 3, (0.5,) * 3, train=True, random_erasing=0.5)
    ds = MultiLabelDataset(ann, tf)
    a, ta = ds[(0, 123)]
    b, _ = ds[(0, 123)]
    c, _ = ds[(0, 124)]
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert ta.tolist() == ann.targets[0].astype(float).tolist()


def test_fused_normalisation_equals_todtype_then_normalize() -> None:
    from torchvision.transforms import v2

    from mlic.data.transforms import ToNormalizedFloat

    x = torch.randint(0, 256, (3, 17, 23), dtype=torch.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    ref = v2.Normalize(list(mean), list(std))(v2.ToDtype(torch.float32, scale=True)(x))
    out = ToNormalizedFloat(mean, std)(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_decode_batch_matches_the_pil_pipeline(tmp_path: Path) -> None:
    from mlic.data.dataset import collate_raw, decode_batch

    write_image(tmp_path / "a.jpg", 1, size=48)
    from PIL import Image as PILImage

    PILImage.open(tmp_path / "a.jpg").convert("RGB").save(tmp_path / "b.png")  # a non-JPEG too
    ann = Annotations(
        names=["x"], images=[tmp_path / "a.jpg", tmp_path / "b.png"], targets=np.ones((2, 1))
    )
    raw = MultiLabelDataset(ann, raw_bytes=True)
    encoded, targets = collate_raw([raw[0], raw[1]])
    assert encoded[0].dtype == torch.uint8 and targets.shape == (2, 1)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    batch = decode_batch(encoded, 32, mean, std, torch.device("cpu"))
    ref = torch.stack(
        [build_transform(32, mean, std, train=False)(load_image(p)) for p in ann.images]
    )
    assert batch.shape == (2, 3, 32, 32)
    torch.testing.assert_close(batch, ref, rtol=0, atol=0.05)
    flipped = decode_batch(encoded, 32, mean, std, torch.device("cpu"), hflip=True)
    for i in range(2):  # each sample is either itself or its mirror image
        assert torch.allclose(flipped[i], batch[i]) or torch.allclose(flipped[i], batch[i].flip(-1))


def test_uint8_batches_normalised_on_device_equal_the_float_pipeline(tiny_voc: Path) -> None:
    # what `mlic train` does (workers ship uint8, the training device normalises) must be
    # bit-identical to normalising every sample in the worker, augmentation and erasing included
    from mlic.engine.loaders import uint8_batch_to_device

    ann = load_voc(tiny_voc, "train")
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    kw = {"train": True, "random_erasing": 0.5}
    as_float = MultiLabelDataset(ann, build_transform(32, mean, std, **kw))
    as_uint8 = MultiLabelDataset(ann, build_transform(32, mean, std, **kw, normalize=False))
    sampler = SeededSampler(len(ann), shuffle=True, seed=3)
    batch, _ = next(iter(build_loader(as_uint8, 6, sampler, workers=0)))
    assert batch.dtype == torch.uint8 and batch.shape == (6, 3, 32, 32)
    prepare = uint8_batch_to_device(mean, std, torch.device("cpu"), channels_last=True)
    out = prepare(batch)
    assert out.dtype == torch.float32 and out.is_contiguous(memory_format=torch.channels_last)
    ref = torch.stack([as_float[key][0] for key in list(sampler)[:6]])
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("world", [1, 2])
def test_sampler_resumed_past_the_end_of_an_epoch_yields_nothing(world: int) -> None:
    """A stop in an epoch's last, partial batch leaves ``start`` (whole batches counted)
    beyond the data: resuming there must yield nothing, not fail."""
    for rank in range(world):
        sampler = SeededSampler(22, True, seed=0, num_replicas=world, rank=rank, pad=True)
        sampler.set_epoch(0, start=24)  # 6 batches of 4 consumed of 22 images
        assert list(sampler) == [] and len(sampler) == 0
        sampler.set_epoch(0, start=20)
        assert len(list(sampler)) == len(sampler) > 0


@pytest.mark.parametrize(
    ("model", "warned"), [("baseline", False), ("q2l", False), ("mlgcn", True)]
)
def test_missing_glove_vectors_are_said_only_by_models_that_use_them(
    model: str, warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Class names without shipped GloVe vectors: a model with label embeddings says it learns
    them instead; a model without any says nothing."""
    import logging

    import mlic
    from mlic.engine.loaders import build_labels

    ann = Annotations(
        names=["desert", "sea"],
        images=[Path("a.jpg"), Path("b.jpg")],
        targets=np.array([[1, 0], [0, 1]], dtype=np.int8),
    )
    with caplog.at_level(logging.WARNING, logger="mlic"):
        labels = build_labels(ann, "glove")
        mlic.create_model(model, 2, labels=labels, backbone=TINY_BACKBONE, pretrained=False)
    said = [r.getMessage() for r in caplog.records if "GloVe" in r.getMessage()]
    assert len(said) == int(warned), said
    if warned:
        assert "'desert'" in said[0] and "learns its label embeddings instead" in said[0]
