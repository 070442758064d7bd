"""What a training run reports while it trains: TensorBoard's per-step loss and learning
rate, per-class PR curves and labelled validation images at each epoch end; the epoch log
line's ETA for the whole run; progress bars for validation and calibration."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import mlic.engine.trainer as trainer
from mlic.config import load_config
from mlic.engine.checkpoint import load_resume
from mlic.engine.run_log import EtaClock, format_duration
from mlic.engine.trainer import train
from mlic.viz import file_slug
from test_train import tiny_overrides


def tiny_run_config(voc: Path, out: Path, **over: str):
    """The tests' tiny recipe (test_train.tiny_overrides) at 32 px, with TensorBoard on."""
    small = {"data.image_size": "32", "data.batch_size": "4", "run.tensorboard": "true"}
    return load_config(None, tiny_overrides(voc, out, "tb", **{**small, **over}))


@pytest.mark.parametrize(
    ("seconds", "text"), [(0, "0s"), (44.6, "45s"), (200, "3m20s"), (3600 + 5 * 60, "1h05m")]
)
def test_durations_read_as_a_person_reads_them(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_the_eta_is_the_epochs_left_times_the_mean_epoch(monkeypatch) -> None:
    now = [100.0]
    monkeypatch.setattr("mlic.engine.run_log.time.perf_counter", lambda: now[0])
    clock = EtaClock(first_epoch=2)  # a resumed run: 2 epochs were done before
    now[0] = 160.0  # two epochs of this process in 60 s
    assert clock.eta(4, 10) == pytest.approx(6 * 30)
    assert clock.eta(10, 10) == 0


@pytest.fixture
def tiny_run(tiny_voc: Path, tmp_path: Path, monkeypatch, caplog) -> dict:
    """A 2-epoch run with TensorBoard and progress bars on; the bars' descriptions recorded."""
    descriptions: list[str] = []
    real_tqdm = trainer.tqdm

    def recording_tqdm(*args, **kwargs):
        descriptions.append(str(kwargs.get("desc", "")))
        return real_tqdm(*args, **kwargs)

    monkeypatch.setattr(trainer, "tqdm", recording_tqdm)
    caplog.set_level(logging.INFO, logger="mlic")
    result = train(tiny_run_config(tiny_voc, tmp_path / "runs", **{"run.progress": "true"}))
    return {"result": result, "descriptions": descriptions, "log": caplog.messages}


def test_tensorboard_has_per_step_loss_pr_curves_and_labelled_images(tiny_run: dict) -> None:
    run_dir = Path(tiny_run["result"]["run_dir"])
    steps = load_resume(run_dir / "last.resume.pt")["run"]["step"]
    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, steps + 1))  # one point per optimiser step
    assert all(e.value > 0 for e in loss)
    assert [e.step for e in events.Scalars("train/lr")] == list(range(1, steps + 1))
    assert len(events.Scalars("val/mAP")) == 2  # the per-epoch scalars are still there
    names = ["cat", "dog", "car", "person", "tree"]
    assert {f"pr/{file_slug(n)}" for n in names} <= set(tags["tensors"])
    assert "val/predictions" in tags["images"]
    assert [e.step for e in events.Images("val/predictions")] == [1, 2]


def test_the_epoch_lines_end_with_the_runs_eta_and_eval_has_progress_bars(tiny_run: dict) -> None:
    lines = [m for m in tiny_run["log"] if m.startswith("epoch ")]
    assert len(lines) == 2
    assert all(re.search(r"ETA (\d+h\d\dm|\d+m\d\ds|\d+s)$", line) for line in lines), lines
    assert lines[-1].endswith("ETA 0s")
    descs = tiny_run["descriptions"]
    assert "model val" in descs and "model calib" in descs, descs
    assert "epoch 1/2" in descs


def test_no_tensorboard_folder_when_it_is_off(tiny_voc: Path, tmp_path: Path) -> None:
    result = train(tiny_run_config(tiny_voc, tmp_path / "runs", **{"run.tensorboard": "false"}))
    assert not (Path(result["run_dir"]) / "tb").exists()
