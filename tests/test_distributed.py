"""torchrun with gloo on CPU: 2 processes, and 2 nodes through the c10d rendezvous; DDP training,
metrics over the whole val set once, resume with another world size."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mlic
from conftest import TINY_BACKBONE, make_voc
from mlic.config import load_config
from mlic.engine.checkpoint import read_metadata
from mlic.evaluate import evaluate_checkpoint

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _torchrun() -> str:
    found = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which(
        "torchrun"
    )
    assert found, "torchrun ships with torch"
    return found


def _two_processes(over: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 -m mlic train demo <over>``."""
    cmd = [_torchrun(), "--standalone", "--nproc_per_node", "2", "-m", "mlic", "train", "demo"]
    return subprocess.run([*cmd, *over], env=env, capture_output=True, text=True, timeout=600)


def _uneven_voc(tmp_path: Path) -> tuple[Path, list[str]]:
    """24 train / 13 val images over 5 classes, and the training overrides for them."""
    names = ["cat", "dog", "car", "person", "tree"]
    rng = np.random.default_rng(0)

    def sample(n: int) -> list[list[tuple[str, int]]]:
        return [[(names[c], 0) for c in rng.choice(5, size=2, replace=False)] for _ in range(n)]

    # 13 val images: not divisible by 2, so an evaluation that padded or dropped would differ
    voc = make_voc(tmp_path, {"train": sample(24), "val": sample(13)}, labels_txt=names)
    over = [
        "data.format=voc",
        f"data.root={voc}",
        "data.image_size=64",
        "data.batch_size=4",
        "data.workers=0",
        f"model.backbone={TINY_BACKBONE}",
        "model.pretrained=false",
        "train.epochs=1",
        "train.ema=false",
        f"run.output_dir={tmp_path / 'runs'}",
        "run.name=ddp",
        "run.progress=false",
        "run.tensorboard=false",
    ]
    return voc, over


def _assert_single_process_metrics_equal(run: Path, tmp_path: Path) -> None:
    """Only rank 0 wrote; one process re-evaluating the weights gets the same metrics."""
    ddp_metrics = read_metadata(run / "best.safetensors")["metrics"]
    assert len((run / "metrics.csv").read_text().splitlines()) == 2  # one row, from rank 0
    assert not list(run.glob(".*.tmp"))  # no stray temp files
    single = evaluate_checkpoint(
        run, ["data.workers=0", "run.progress=false"], output=tmp_path / "ev"
    )
    for key in ("mAP", "CP", "CR", "CF1", "OP", "OR", "OF1"):
        assert single["metrics"][key] == pytest.approx(ddp_metrics[key], abs=1e-6), key
    assert load_config(run / "config.yaml").data.batch_size == 4
    mlic.load_checkpoint(run / "best.safetensors")


def test_two_process_gloo_metrics_equal_single_process(tmp_path: Path) -> None:
    _, over = _uneven_voc(tmp_path)
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    p = _two_processes(over, env)
    assert p.returncode == 0, p.stderr[-3000:]
    _assert_single_process_metrics_equal(tmp_path / "runs" / "ddp", tmp_path)


def test_two_node_rendezvous_metrics_equal_single_process(tmp_path: Path) -> None:
    """Two torchrun agents ("nodes", one process each) meet through the c10d rendezvous on
    node 0's endpoint, as in the README's 2 x 8 GPU launch; here both nodes are this host."""
    _, over = _uneven_voc(tmp_path)
    with socket.socket() as sock:  # a free port for the rendezvous store
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    nodes = [
        subprocess.Popen(
            [
                _torchrun(),
                "--nnodes",
                "2",
                "--nproc_per_node",
                "1",
                "--rdzv_backend",
                "c10d",
                "--rdzv_endpoint",
                f"127.0.0.1:{port}",
                "--rdzv_id",
                "mlic-test",
                "--rdzv_conf",
                f"is_host={int(rank == 0)}",
                "--max_restarts",
                "0",
                "-m",
                "mlic",
                "train",
                "demo",
                *over,
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outs = [node.communicate(timeout=600) for node in nodes]
    for node, (_, err) in zip(nodes, outs, strict=True):
        assert node.returncode == 0, err[-3000:]
    _assert_single_process_metrics_equal(tmp_path / "runs" / "ddp", tmp_path)


def test_resume_a_two_process_run_with_one_process(tmp_path: Path) -> None:
    names = ["cat", "dog", "car"]
    rng = np.random.default_rng(1)
    voc = make_voc(
        tmp_path,
        {
            s: [[(names[c], 0) for c in rng.choice(3, size=2, replace=False)] for _ in range(n)]
            for s, n in (("train", 24), ("val", 8))
        },
        labels_txt=names,
    )
    over = [
        "data.format=voc",
        f"data.root={voc}",
        "data.image_size=64",
        "data.batch_size=4",
        "data.workers=0",
        f"model.backbone={TINY_BACKBONE}",
        "model.pretrained=false",
        "train.epochs=3",
        f"run.output_dir={tmp_path / 'runs'}",
        "run.name=ws",
        "run.progress=false",
        "run.tensorboard=false",
    ]
    # 24 images / (4 x 2 processes) = 3 steps per epoch: killed in epoch 2, after epoch 1's resume point
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "MLIC_FAULT": "kill_at_step=5"}
    p = _two_processes(over, env)
    assert p.returncode != 0
    run = tmp_path / "runs" / "ws"
    assert len((run / "metrics.csv").read_text().splitlines()) == 2  # epoch 1 only
    env.pop("MLIC_FAULT")
    p = subprocess.run(
        [sys.executable, "-m", "mlic", "train", "--resume", str(run)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    rows = (run / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3"]
    mlic.load_checkpoint(run / "best.safetensors")
