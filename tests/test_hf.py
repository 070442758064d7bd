"""``data.format=hf``: sets built here with ``datasets`` itself -- save_to_disk and parquet;
ClassLabel ids, class-name strings and 1/0/-1 multi-hot labels; custom column names;
streaming over ranks; training and evaluation."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

datasets = pytest.importorskip("datasets")

from conftest import TINY_BACKBONE  # noqa: E402
from mlic.config import load_config  # noqa: E402
from mlic.data.hf import HFStreamSet, open_hf_split  # noqa: E402
from mlic.errors import DataError  # noqa: E402

NAMES = ["cat", "dog", "car"]


def jpeg(seed: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (48, 48, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def label_ids(n: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [
        sorted(rng.choice(3, size=int(rng.integers(1, 3)), replace=False).tolist())
        for _ in range(n)
    ]


def classlabel_dict(root: Path) -> tuple[Path, dict[str, list[list[int]]]]:
    feats = datasets.Features(
        {"image": datasets.Image(), "labels": datasets.Sequence(datasets.ClassLabel(names=NAMES))}
    )
    ids = {"train": label_ids(20, 0), "validation": label_ids(8, 1)}
    dd = datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict(
                {
                    "image": [{"bytes": jpeg(100 * k + i), "path": None} for i in range(len(v))],
                    "labels": v,
                },
                features=feats,
            )
            for k, (split, v) in enumerate(ids.items())
        }
    )
    dd.save_to_disk(str(root / "saved"))
    return root / "saved", ids


def cfg(root: Path, out: Path, *extra: str):
    return load_config(
        None,
        [
            "data.format=hf",
            f"data.root={root}",
            "data.val=validation",
            "data.image_size=48",
            "data.batch_size=4",
            "data.workers=0",
            f"model.backbone={TINY_BACKBONE}",
            "model.pretrained=false",
            "train.epochs=1",
            f"run.output_dir={out}",
            "run.name=h",
            "run.progress=false",
            "run.tensorboard=false",
            *extra,
        ],
    )


def test_save_to_disk_classlabel_trains_and_evaluates(tmp_path: Path) -> None:
    from mlic.engine.checkpoint import read_metadata
    from mlic.engine.trainer import train
    from mlic.evaluate import evaluate_checkpoint

    root, ids = classlabel_dict(tmp_path)
    src = open_hf_split(cfg(root, tmp_path).data, "train")
    assert src.names == NAMES
    want = np.zeros((20, 3), np.int8)
    for i, row in enumerate(ids["train"]):
        want[i, row] = 1
    assert (src.targets == want).all()
    train(cfg(root, tmp_path))
    meta = read_metadata(tmp_path / "h" / "best.safetensors")
    assert meta["label_names"] == NAMES and meta["dataset"] == "hf"
    ev = evaluate_checkpoint(tmp_path / "h", ["run.progress=false"], output=tmp_path / "ev")
    assert ev["metrics"]["mAP"] == pytest.approx(meta["metrics"]["mAP"], abs=1e-6)


def write_parquet(root: Path, split: str, rows: list, feats) -> None:
    ds = datasets.Dataset.from_dict(
        {"img": [{"bytes": jpeg(i), "path": None} for i in range(len(rows))], "tags": rows},
        features=feats,
    )
    (root / "data").mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))


def test_parquet_with_names_and_multihot_and_custom_columns(tmp_path: Path) -> None:
    strings = datasets.Features(
        {"img": datasets.Image(), "tags": datasets.Sequence(datasets.Value("string"))}
    )
    rows = [["dog"], ["cat", "car"], ["car"], ["dog", "cat"]]
    write_parquet(tmp_path / "names", "train", rows, strings)
    over = ["data.image_column=img", "data.label_column=tags", "data.train=train"]
    src = open_hf_split(cfg(tmp_path / "names", tmp_path, *over).data, "train")
    assert src.names == ["car", "cat", "dog"]  # sorted names of the training split
    assert src.targets.tolist() == [[0, 0, 1], [1, 1, 0], [1, 0, 0], [0, 1, 1]]
    multihot = datasets.Features(
        {"img": datasets.Image(), "tags": datasets.Sequence(datasets.Value("int8"), length=3)}
    )
    rows = [[1, 0, -1], [0, 1, 0], [1, 1, 0]]
    write_parquet(tmp_path / "mh", "train", rows, multihot)
    (tmp_path / "mh" / "classes.txt").write_text("\n".join(NAMES) + "\n")
    src = open_hf_split(
        cfg(tmp_path / "mh", tmp_path, *over, "data.classes=classes.txt").data, "train"
    )
    assert src.names == NAMES and src.targets.tolist() == rows  # -1 (ignore) kept
    with pytest.raises(DataError, match="no column 'pixels'"):
        open_hf_split(
            cfg(tmp_path / "mh", tmp_path, *over, "data.image_column=pixels").data, "train"
        )


def sha(x: torch.Tensor) -> str:
    return hashlib.sha1(bytes(x.numpy())).hexdigest()


def test_streaming_ranks_cover_the_set_with_equal_steps_and_resume(
    tmp_path: Path, monkeypatch
) -> None:
    # datasets sleeps 5 s after each pass over a parquet stream (a guard for an Arrow thread
    # shutdown issue); negligible per epoch of a real set, 40 s over this test's passes
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)
    feats = datasets.Features(
        {"img": datasets.Image(), "tags": datasets.Sequence(datasets.ClassLabel(names=NAMES))}
    )
    write_parquet(tmp_path / "pq", "train", label_ids(11, 3), feats)
    write_parquet(tmp_path / "pq", "validation", label_ids(5, 4), feats)
    c = cfg(
        tmp_path / "pq",
        tmp_path,
        "data.image_column=img",
        "data.label_column=tags",
        "data.streaming=true",
    )
    src = open_hf_split(c.data, "train")
    assert src.streaming and src.num_samples == 11
    every = {sha(x) for x, _ in HFStreamSet(src, None, None, False, raw_bytes=True)}
    assert len(every) == 11
    seen, lengths = set(), []
    for rank in (0, 1):
        s = HFStreamSet(
            src, None, None, True, batch_size=2, seed=5, world_size=2, rank=rank, raw_bytes=True
        )
        s.set_epoch(1)
        items = [sha(x) for x, _ in s]
        lengths.append(len(items))
        seen |= set(items)
        s.set_epoch(1, start=2 * 2 * 2)  # 2 batches of 2 on each of 2 ranks done
        assert [sha(x) for x, _ in s] == items[4:]  # resume continues at the same sample
    assert lengths[0] == lengths[1] == len(s) // 2  # equal steps
    assert seen == every  # the union over ranks: the whole set
    from mlic.engine.trainer import train

    result = train(c)
    assert result["best_epoch"] == 1
