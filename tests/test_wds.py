"""WebDataset shards: ``mlic data pack``, the rank/worker-disjoint equal-length reader, exact
resume positions, truncated/corrupt shards, streaming over HTTP, training and eval from shards."""

from __future__ import annotations

import functools
import http.server
import io
import json
import shutil
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_BACKBONE, make_voc
from mlic.cli import main as cli_main
from mlic.data.labels import LabelSet
from mlic.data.transforms import build_transform
from mlic.data.voc import load_voc
from mlic.data.wds import ShardEvalSet, ShardTrainSet, open_shards, parse_size
from mlic.errors import DataError

NAMES = ["cat", "dog", "car"]


def make_set(root: Path, n_train: int = 23, n_val: int = 9) -> Path:
    rng = np.random.default_rng(0)

    def sample(n: int) -> list[list[tuple[str, int]]]:
        return [
            [
                (NAMES[c], int(rng.integers(0, 2) * (c == 2)))
                for c in rng.choice(3, size=2, replace=False)
            ]
            for _ in range(n)
        ]

    return make_voc(root, {"train": sample(n_train), "val": sample(n_val)}, labels_txt=NAMES)


def pack(voc: Path, split: str, out: Path, per_shard: int = 5) -> Path:
    code = cli_main(
        [
            "data",
            "pack",
            "demo",
            "data.format=voc",
            f"data.root={voc}",
            "--split",
            split,
            "--out",
            str(out),
            "--samples-per-shard",
            str(per_shard),
            "-q",
        ]
    )
    assert code == 0
    return out


def sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha1(data).hexdigest()


def shard_of_sample(shards: Path) -> dict[str, str]:
    """sha1 of each image's bytes -> the shard holding it."""
    out = {}
    for tar in sorted(shards.glob("shard-*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                if m.name.endswith(".jpg"):
                    out[sha(t.extractfile(m).read())] = tar.name
    return out


def raw_set(
    shards: Path, world: int, rank: int, workers: int, batch: int = 4, **kw
) -> ShardTrainSet:
    return ShardTrainSet(
        open_shards(str(shards)),
        None,
        None,
        batch,
        seed=3,
        world_size=world,
        rank=rank,
        workers=workers,
        raw_bytes=True,
        **kw,
    )


def rank_stream(ds: ShardTrainSet, rank: int) -> list[list[torch.Tensor]]:
    """What a DataLoader with ``ds.workers`` workers yields on ``rank``: batches of samples,
    round-robin over the workers (each collates its own batches), as lists."""
    per_reader = []
    for reader in range(ds.readers_per_rank):
        slot, order, skip = ds.plan(rank, reader)
        items = list(ds._stream(slot, order, skip))
        per_reader.append(
            [items[i : i + ds.batch_size] for i in range(0, len(items), ds.batch_size)]
        )
    out = []
    for i in range(max(len(b) for b in per_reader)):
        out += [b[i] for b in per_reader if i < len(b)]
    return out


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("wds")
    voc = make_set(root)
    return voc, pack(voc, "train", root / "train"), pack(voc, "val", root / "val", per_shard=4)


def test_pack_keeps_bytes_labels_and_writes_the_index(packed) -> None:
    voc, train, val = packed
    ann = load_voc(voc, "train")
    index = json.loads((train / "dataset.json").read_text())
    assert index["names"] == NAMES and index["num_samples"] == 23
    assert [s["num_samples"] for s in index["shards"]] == [5, 5, 5, 5, 3]
    stats = LabelSet.from_targets(ann.names, ann.targets)
    assert index["counts"] == stats.counts.tolist()
    assert index["cooccurrence"] == stats.cooccurrence.tolist()
    seen = {}
    for s in index["shards"]:
        data = (train / s["name"]).read_bytes()
        assert (
            s["bytes"] == len(data)
            and s["sha256"] == __import__("hashlib").sha256(data).hexdigest()
        )
        with tarfile.open(fileobj=io.BytesIO(data)) as t:
            members = {m.name: t.extractfile(m).read() for m in t.getmembers()}
        for name, blob in members.items():
            if name.endswith(".json"):
                meta = json.loads(blob)
                key = name[: -len(".json")]
                src = Path(meta["path"])
                assert members[f"{key}.jpg"] == src.read_bytes()  # untouched bytes
                i = ann.images.index(src)
                assert meta["target"] == ann.targets[i].tolist()  # 1 / 0 / -1
                seen[i] = s["name"]
    assert sorted(seen) == list(range(23))
    assert -1 in ann.targets  # the set has "difficult" (ignored) labels, and they survive
    assert json.loads((val / "dataset.json").read_text())["names"] == NAMES
    assert parse_size("1GB") == 10**9 and parse_size("512MiB") == 512 * 2**20
    again = ["data", "pack", "demo", "data.format=voc", f"data.root={voc}", "--out", str(train)]
    assert cli_main(again) == 2  # refuses to mix two packs in one folder


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 0), (2, 2), (3, 1)])
def test_ranks_read_disjoint_shards_same_steps_whole_set(packed, world: int, workers: int) -> None:
    _, train, _ = packed
    where = shard_of_sample(train)
    for epoch in (0, 1):
        per_rank, shards_of = [], []
        for rank in range(world):
            ds = raw_set(train, world, rank, workers)
            ds.set_epoch(epoch)
            batches = rank_stream(ds, rank)
            assert len(batches) == len(ds) // (ds.batch_size * world)  # what the trainer counts
            assert all(len(b) == ds.batch_size for b in batches)
            samples = [sha(bytes(x.numpy())) for b in batches for x, _ in b]
            per_rank.append(samples)
            shards_of.append({where[s] for s in samples})
        assert len({len(s) for s in per_rank}) == 1  # the same number of steps on every rank
        for a in range(world):
            for b in range(a + 1, world):
                assert not shards_of[a] & shards_of[b]  # disjoint shards
        assert set().union(*per_rank) == set(where)  # the whole set, each epoch
        total = sum(len(s) for s in per_rank)
        # padding: per reader, under a batch plus the largest shard (balanced dealing)
        assert total - 23 < ds.num_slots * (ds.batch_size + 5)


def test_epochs_reshuffle_shards_deterministically(packed) -> None:
    _, train, _ = packed
    ds = raw_set(train, 2, 0, 0)
    plans = []
    for epoch in range(4):
        ds.set_epoch(epoch)
        plans.append(ds.plan(0, 0)[:2])
    assert len({str(p) for p in plans}) > 1
    again = raw_set(train, 2, 0, 0)
    again.set_epoch(2)
    assert again.plan(0, 0)[:2] == plans[2]


def test_resume_position_gives_the_same_remaining_batches(packed) -> None:
    """set_epoch(e, consumed) on every rank continues with exactly the batches an
    uninterrupted epoch would have given next -- images and augmentations bit-identical."""
    _, train, _ = packed
    tf = build_transform(32, (0.5,) * 3, (0.5,) * 3, train=True, randaugment=True, normalize=False)
    world, workers, batch = 2, 2, 2
    for rank in range(world):
        ds = ShardTrainSet(
            open_shards(str(train)),
            tf,
            32,
            batch,
            seed=1,
            world_size=world,
            rank=rank,
            workers=workers,
        )
        ds.set_epoch(1)
        full = rank_stream(ds, rank)
        for done in (1, 3, 4):  # odd counts: the data loader's worker 0 plays another reader
            ds.set_epoch(1, start=done * batch * world)
            rest = rank_stream(ds, rank)
            assert len(rest) == len(full) - done
            for got, want in zip(rest, full[done:], strict=True):
                for (gi, gt), (wi, wt) in zip(got, want, strict=True):
                    assert torch.equal(gi, wi) and torch.equal(gt, wt)


def test_data_loader_workers_give_the_planned_stream(packed) -> None:
    """The real DataLoader with 2 worker processes yields what the plan says, in order."""
    from mlic.data.sources import _loader

    _, train, _ = packed
    ds = raw_set(train, 1, 0, 2)
    ds.set_epoch(1, start=3 * ds.batch_size)
    want = rank_stream(ds, 0)
    got = list(_loader(ds, ds.batch_size, ds.workers, False, True))
    assert len(got) == len(want)
    for (images, targets), w in zip(got, want, strict=True):
        assert [sha(bytes(x.numpy())) for x in images] == [sha(bytes(x.numpy())) for x, _ in w]
        assert torch.equal(targets, torch.stack([t for _, t in w]))


def test_truncated_and_corrupt_shards_are_named_and_skipped(tmp_path: Path) -> None:
    voc = make_set(tmp_path)
    bad_jpg = sorted((voc / "JPEGImages").glob("*.jpg"))[4]
    bad_jpg.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    shards = pack(voc, "train", tmp_path / "shards")
    cut = shards / "shard-000001.tar"
    cut.write_bytes(cut.read_bytes()[: 5 * 1024])  # mid-member: later samples lost
    index = open_shards(str(shards))
    over = ["data.format=wds", f"data.train={shards}", f"data.val={shards}"]
    assert cli_main(["data", "check", "demo", *over]) == 1  # size/SHA-256 and read checked
    assert (
        cli_main(
            [
                "data",
                "check",
                "demo",
                "data.format=wds",
                f"data.train={shards}/shard-{{000000..000000}}.tar",
                f"data.val={shards}/shard-{{000002..000004}}.tar",
            ]
        )
        == 0
    )
    only_cut = open_shards(f"{shards}/shard-{{000001..000001}}.tar")
    with pytest.raises(
        DataError, match=r"shard-000001\.tar: truncated or corrupt shard .*index says"
    ):
        list(ShardEvalSet(only_cut, None, None))
    with pytest.raises(DataError, match=r"shard-00000\d\.tar/0+4\.jpg: cannot decode image"):
        list(ShardEvalSet(index, None, None))
    log = tmp_path / "bad_samples.txt"
    ev = list(ShardEvalSet(index, None, None, skip_bad=True, bad_log=log))
    lost = log.read_text().splitlines()
    assert len(ev) == 23 - len(lost) and len(lost) >= 2
    assert any("shard-000001.tar: truncated" in line for line in lost)
    assert any(".jpg: cannot" in line for line in lost)  # the bad image, named inside its shard
    # training: a bad position is filled by the next good sample; the length is unchanged
    log.unlink()
    ds = ShardTrainSet(index, None, None, 4, world_size=1, rank=0, skip_bad=True, bad_log=log)
    items = list(ds._stream(*ds.plan(0, 0)))
    assert len(items) == ds.samples_per_reader == len(ds)
    assert len(log.read_text().splitlines()) == len(lost)
    strict = ShardTrainSet(index, None, None, 4, world_size=1, rank=0)
    with pytest.raises(DataError, match=r"shard-00000\d\.tar"):
        list(strict._stream(*strict.plan(0, 0)))


def test_stream_shards_over_https_pattern(packed) -> None:
    """An http:// brace pattern (as https:// or s3:// would be) streams the same samples."""
    if shutil.which("curl") is None:
        pytest.skip("webdataset streams http(s) through curl")
    _, _, val = packed
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(val))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/shard-{{000000..000002}}.tar"
        remote = open_shards(url)
        assert [s.name for s in remote.shards] == [f"shard-00000{i}.tar" for i in range(3)]
        got = [
            (sha(bytes(x.numpy())), t.tolist())
            for x, t in ShardEvalSet(remote, None, None, raw_bytes=True)
        ]
        local = [
            (sha(bytes(x.numpy())), t.tolist())
            for x, t in ShardEvalSet(open_shards(str(val)), None, None, raw_bytes=True)
        ]
        assert got == local and len(got) == 9
    finally:
        server.shutdown()


def test_train_and_eval_from_shards(packed, tmp_path: Path) -> None:
    _, train, val = packed
    over = [
        "data.format=wds",
        f"data.train={train}",
        f"data.val={val}",
        "data.image_size=48",
        "data.batch_size=4",
        "data.workers=0",
        f"model.backbone={TINY_BACKBONE}",
        "model.pretrained=false",
        "train.epochs=1",
        f"run.output_dir={tmp_path}",
        "run.name=w",
        "run.progress=false",
        "run.tensorboard=false",
    ]
    assert cli_main(["train", "demo", *over]) == 0
    run = tmp_path / "w"
    from mlic.engine.checkpoint import read_metadata
    from mlic.evaluate import evaluate_checkpoint

    meta = read_metadata(run / "best.safetensors")
    assert meta["label_names"] == NAMES and meta["dataset"] == "wds"
    ev = evaluate_checkpoint(run, ["run.progress=false"], output=tmp_path / "ev")
    assert ev["metrics"]["mAP"] == pytest.approx(meta["metrics"]["mAP"], abs=1e-6)
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["num_images"] == 9


def test_training_skips_and_counts_the_samples_of_a_truncated_shard(tmp_path: Path) -> None:
    voc = make_set(tmp_path)
    train, val = pack(voc, "train", tmp_path / "train"), pack(voc, "val", tmp_path / "val", 4)
    cut = train / "shard-000002.tar"
    cut.write_bytes(cut.read_bytes()[: 4 * 1024])
    over = [
        "data.format=wds",
        f"data.train={train}",
        f"data.val={val}",
        "data.image_size=48",
        "data.batch_size=4",
        "data.workers=0",
        f"model.backbone={TINY_BACKBONE}",
        "model.pretrained=false",
        "train.epochs=1",
        "train.ema=false",
        f"run.output_dir={tmp_path}",
        "run.name=bad",
        "run.progress=false",
        "run.tensorboard=false",
    ]
    assert cli_main(["train", "demo", *over]) == 2  # stops, naming the shard
    assert cli_main(["train", "demo", *over, "data.skip_bad_images=true", "run.name=skip"]) == 0
    lines = (tmp_path / "skip" / "bad_samples.txt").read_text().splitlines()
    assert lines and all("shard-000002.tar: truncated" in line for line in lines)
    assert (tmp_path / "skip" / "best.safetensors").exists()
