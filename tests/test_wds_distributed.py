"""Shards under torchrun (2 gloo processes) and a mid-epoch kill + resume from shards."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import mlic
from conftest import TINY_BACKBONE
from mlic.engine.checkpoint import load_resume, read_metadata
from mlic.evaluate import evaluate_checkpoint
from test_wds import make_set, pack, shard_of_sample

SRC = str(Path(__file__).resolve().parents[1] / "src")

READ_EPOCHS = """
import hashlib, json, sys
import torch.distributed as dist
from mlic.data.sources import _loader
from mlic.data.wds import ShardTrainSet, open_shards

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
ds = ShardTrainSet(open_shards(sys.argv[1]), None, None, 4, seed=0, world_size=world, rank=rank,
                   workers=1, raw_bytes=True)
out = {}
for epoch in (0, 1):
    ds.set_epoch(epoch)
    out[epoch] = [[hashlib.sha1(bytes(x.numpy())).hexdigest() for x in images]
                  for images, _ in _loader(ds, 4, ds.workers, False, True)]
json.dump(out, open(f"{sys.argv[2]}/rank{rank}.json", "w"))
dist.barrier()
dist.destroy_process_group()
"""


def _torchrun() -> str:
    found = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which(
        "torchrun"
    )
    assert found, "torchrun ships with torch"
    return found


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", **extra}
    if "MLIC_FAULT" not in extra:
        env.pop("MLIC_FAULT", None)
    return env


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("wdsdist")
    voc = make_set(root)
    # 23 samples, 8 per shard: 8, 8, 7 -- uneven shards, and an odd count for 2 ranks
    return pack(voc, "train", root / "train", per_shard=8), pack(voc, "val", root / "val", 4)


def _train_over(train: Path, val: Path, out: Path, name: str, **kw: str) -> list[str]:
    over = {
        "data.format": "wds",
        "data.train": str(train),
        "data.val": str(val),
        "data.image_size": "48",
        "data.batch_size": "4",
        "data.workers": "0",
        "model.backbone": TINY_BACKBONE,
        "model.pretrained": "false",
        "train.epochs": "2",
        "run.output_dir": str(out),
        "run.name": name,
        "run.progress": "false",
        "run.tensorboard": "false",
        "train.ema_decay": "0.9",
        "optim.lr": "0.003",
        **kw,
    }
    return [f"{k}={v}" for k, v in over.items()]


def test_two_gloo_ranks_read_disjoint_shards_and_train_without_hang(shards, tmp_path: Path) -> None:
    train, val = shards
    script = tmp_path / "read_epochs.py"
    script.write_text(READ_EPOCHS)
    cmd = [
        _torchrun(),
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
        str(train),
        str(tmp_path),
    ]
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    where = shard_of_sample(train)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for epoch in ("0", "1"):
        batches = [r[epoch] for r in ranks]
        assert len(batches[0]) == len(batches[1]) > 0  # same number of steps: no DDP hang
        seen = [{s for b in rb for s in b} for rb in batches]
        shards_of = [{where[s] for s in rs} for rs in seen]
        assert not shards_of[0] & shards_of[1]  # each rank its own shards
        assert seen[0] | seen[1] == set(where)  # together: the whole set, once per epoch
    # the trainer itself under torchrun: uneven shards (8, 8, 7), equal steps, rank 0 writes
    over = _train_over(train, val, tmp_path / "runs", "ddp", **{"train.epochs": "1"})
    cmd = [
        _torchrun(),
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "mlic",
        "train",
        "demo",
        *over,
    ]
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    run = tmp_path / "runs" / "ddp"
    ddp = read_metadata(run / "best.safetensors")["metrics"]
    single = evaluate_checkpoint(run, ["run.progress=false"], output=tmp_path / "ev")
    assert single["metrics"]["mAP"] == pytest.approx(ddp["mAP"], abs=1e-6)  # val once, over ranks


def _metrics(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open() as f:
        return [
            {k: r[k] for k in ("epoch", "train_loss", "mAP", "ema_mAP")} for r in csv.DictReader(f)
        ]


def test_killed_mid_epoch_resumes_at_the_same_sample(shards, tmp_path: Path, monkeypatch) -> None:
    """A real SIGTERM at step 3 of epoch 1 (``MLIC_FAULT=term_at_step=3``; 2 loader workers, so
    the resumed loader's first worker must play the second reader) -> a resume point
    mid-epoch -> ``--resume`` gives exactly the uninterrupted run."""
    from mlic.config import load_config
    from mlic.engine.trainer import TrainingStopped, train

    train_dir, val = shards
    monkeypatch.delenv("MLIC_FAULT", raising=False)
    over = _train_over(
        train_dir, val, tmp_path, "ref", **{"data.workers": "2", "train.epochs": "1"}
    )
    train(load_config(None, over))
    monkeypatch.setenv("MLIC_FAULT", "term_at_step=3")
    with pytest.raises(TrainingStopped) as stopped:
        train(load_config(None, [o.replace("run.name=ref", "run.name=cut") for o in over]))
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    state = load_resume(tmp_path / "cut" / "last.resume.pt")["run"]
    assert state["epoch"] == 0 and state["consumed"] == 3 * 4  # mid-epoch, 12 samples in
    monkeypatch.delenv("MLIC_FAULT")
    train(None, resume=tmp_path / "cut")
    assert _metrics(tmp_path / "cut") == _metrics(tmp_path / "ref")
    mlic.load_checkpoint(tmp_path / "cut" / "best.safetensors")
