"""Interruption and untrusted files: SIGKILL/SIGTERM and resume, atomic writes, NaN stop, pickles refused."""

from __future__ import annotations

import csv
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import mlic
from conftest import TINY_BACKBONE
from mlic.config import load_config
from mlic.engine import trainer as trainer_mod
from mlic.engine.checkpoint import load_resume, read_metadata
from mlic.engine.trainer import TrainingStopped, train
from mlic.errors import CheckpointError

SRC = str(Path(__file__).resolve().parents[1] / "src")


def overrides(voc: Path, out: Path, name: str, epochs: int = 3) -> list[str]:
    return [
        "data.format=voc",
        f"data.root={voc}",
        "data.image_size=64",
        "data.batch_size=8",
        "data.workers=0",
        f"model.backbone={TINY_BACKBONE}",
        "model.pretrained=false",
        f"train.epochs={epochs}",
        f"run.output_dir={out}",
        f"run.name={name}",
        "run.progress=false",
        "run.tensorboard=false",
        "data.random_erasing=0.25",
        "train.ema_decay=0.9",
        "optim.lr=0.003",
    ]


def cli(args: list[str], fault: str | None = None, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    env.pop("MLIC_FAULT", None)
    if fault:
        env["MLIC_FAULT"] = fault
    return subprocess.Popen(
        [sys.executable, "-m", "mlic", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def metrics(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open() as f:
        return [
            {k: r[k] for k in ("epoch", "train_loss", "mAP", "ema_mAP", "CF1", "OF1")}
            for r in csv.DictReader(f)
        ]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[dict[str, str]]]:
    """(VOC folder, output folder, metrics) of an uninterrupted 3-epoch run in a subprocess."""
    import conftest

    root = tmp_path_factory.mktemp("robust")
    rng = np.random.default_rng(0)
    names = ["cat", "dog", "car", "person", "tree"]

    def sample(n: int) -> list[list[tuple[str, int]]]:
        return [[(names[c], 0) for c in rng.choice(5, size=2, replace=False)] for _ in range(n)]

    voc = conftest.make_voc(root, {"train": sample(24), "val": sample(12)}, labels_txt=names)
    p = cli(["train", "demo", *overrides(voc, root, "reference")])
    assert p.wait(timeout=600) == 0, p.stderr.read()
    return voc, root, metrics(root / "reference")


def test_sigkill_three_times_then_resume_equals_uninterrupted(reference) -> None:
    voc, out, expected = reference
    # 24 images / batch 8 = 3 steps per epoch, 9 in all; three random kill points
    kills = sorted(
        np.random.default_rng(int(time.time()))
        .choice(np.arange(2, 9), size=3, replace=False)
        .tolist()
    )
    first = cli(["train", "demo", *overrides(voc, out, "killed")], fault=f"kill_at_step={kills[0]}")
    assert first.wait(timeout=600) == -signal.SIGKILL
    for step in kills[1:]:
        p = cli(["train", "--resume", str(out / "killed")], fault=f"kill_at_step={step}")
        assert p.wait(timeout=600) == -signal.SIGKILL, (step, p.stderr.read())
    final = cli(["train", "--resume", str(out / "killed")])
    assert final.wait(timeout=600) == 0, final.stderr.read()
    assert metrics(out / "killed") == expected, f"kills at steps {kills}"


def test_sigterm_saves_a_resume_point_and_exits_cleanly(reference) -> None:
    voc, out, expected = reference
    p = cli(["train", "demo", *overrides(voc, out, "termed", epochs=3)])
    run = out / "termed"
    deadline = time.time() + 300
    while not (run / "last.resume.pt").exists() and time.time() < deadline:  # first epoch done
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    code = p.wait(timeout=120)
    # the signal lands within ~50 ms of epoch 1's resume point, epochs 2-3 take far longer
    assert code == 128 + signal.SIGTERM, p.stderr.read()
    assert "resume with" in p.stderr.read()
    state = load_resume(run / "last.resume.pt")
    assert state["run"]["step"] >= 3
    final = cli(["train", "--resume", str(run)])
    assert final.wait(timeout=600) == 0, final.stderr.read()
    assert metrics(run) == expected


def test_kill_while_writing_checkpoint_keeps_previous(tmp_path: Path) -> None:
    model = mlic.create_model("baseline", 3, backbone=TINY_BACKBONE)
    path = tmp_path / "best.safetensors"
    mlic.save_checkpoint(model, path, ["a", "b", "c"], epoch=1)
    before = path.read_bytes()
    code = (
        "import mlic, torch; m = mlic.create_model('baseline', 3, backbone='test_resnet');"
        f"torch.nn.init.zeros_(m.fc.weight); mlic.save_checkpoint(m, {str(path)!r}, ['a','b','c'], epoch=2)"
    )
    env = {**os.environ, "PYTHONPATH": SRC, "MLIC_FAULT": "kill_in_write=best.safetensors"}
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=300)
    assert p.returncode == -signal.SIGKILL
    assert path.read_bytes() == before
    assert read_metadata(path)["epoch"] == 1
    assert (
        len(list(tmp_path.glob(".best.safetensors.*.tmp"))) == 1
    )  # the torn temp file, never renamed


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(
    reference, tmp_path: Path, monkeypatch
) -> None:
    voc, _, _ = reference
    real = trainer_mod.loss_from_config
    calls = {"n": 0}

    def poisoned(cfg):
        loss = real(cfg)

        def fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            calls["n"] += 1
            out = loss(logits, targets)
            return out * float("nan") if calls["n"] > 4 else out  # NaN from epoch 2 on

        return fn

    monkeypatch.setattr(trainer_mod, "loss_from_config", poisoned)
    with pytest.raises(TrainingStopped, match="non-finite training loss") as info:
        train(load_config(None, overrides(voc, tmp_path, "nan")))
    assert info.value.exit_code == 3
    # the first epoch's weights kept (epochs count from 1, as in metrics.csv)
    assert read_metadata(tmp_path / "nan" / "best.safetensors")["epoch"] == 1
    mlic.load_checkpoint(tmp_path / "nan" / "best.safetensors")


class _Payload:
    """Unpickling this runs ``Path(target).touch()``: what a malicious file would do."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def test_pickle_payload_resume_file_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    bad = tmp_path / "last.resume.pt"
    torch.save({"model": {}, "evil": _Payload(marker)}, bad)
    with pytest.raises(CheckpointError, match=r"last\.resume\.pt: refused"):
        load_resume(bad)
    assert not marker.exists()
    with open(bad, "rb") as f:
        torch.load(f, weights_only=False)  # the payload is real: an unsafe loader runs it
    assert marker.exists()


def test_pickle_disguised_as_checkpoint_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError, match="not a safetensors checkpoint"):
        mlic.load_checkpoint(bad)
    with pytest.raises(CheckpointError):
        mlic.Predictor.from_checkpoint(bad)
    assert not marker.exists()


def test_checkpoint_naming_unknown_model_or_wrong_shapes(tmp_path: Path) -> None:
    model = mlic.create_model("baseline", 3, backbone=TINY_BACKBONE)
    path = mlic.save_checkpoint(model, tmp_path / "m.safetensors", ["a", "b", "c"])
    meta = {k: v for k, v in read_metadata(path).items()}
    import json

    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    unknown = tmp_path / "unknown.safetensors"
    save_file(
        tensors,
        str(unknown),
        metadata={k: json.dumps(v) for k, v in {**meta, "model": "gpt5"}.items()},
    )
    with pytest.raises(CheckpointError, match="unknown model 'gpt5'"):
        mlic.load_checkpoint(unknown)
    wrong = tmp_path / "wrong.safetensors"
    save_file(
        tensors,
        str(wrong),
        metadata={k: json.dumps(v) for k, v in {**meta, "num_classes": 4}.items()},
    )
    with pytest.raises(CheckpointError, match=r"shape mismatch.*fc\.weight"):
        mlic.load_checkpoint(wrong)
