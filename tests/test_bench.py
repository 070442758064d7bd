"""`mlic models` and `mlic bench` report real, positive measurements (no timing asserts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import mlic
from conftest import TINY_BACKBONE, write_image
from mlic.bench import forward_flops, matmul_peak
from mlic.cli import main


def test_models_lists_every_model_with_params_and_gflops(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out_json = tmp_path / "models.json"
    args = [
        "models",
        "--backbone",
        TINY_BACKBONE,
        "--image-size",
        "64",
        "--num-classes",
        "5",
        "--json",
        str(out_json),
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    rows = json.loads(out_json.read_text())
    assert [r["model"] for r in rows] == mlic.list_models()
    for r in rows:
        assert r["params_m"] > 0 and r["gflops"] > 0
        assert r["model"] in printed


def test_forward_flops_counts_a_linear_exactly() -> None:
    import torch

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))
    assert forward_flops(model, 8) == 2 * 3 * 8 * 8 * 10


def test_bench_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    for i in range(8):
        write_image(tmp_path / "jpgs" / f"{i}.jpg", i, size=96)
    args = [
        "bench",
        "baseline",
        "--backbone",
        TINY_BACKBONE,
        "--image-size",
        "64",
        "--batch-size",
        "2",
        "--steps",
        "2",
        "--num-classes",
        "5",
        "--data",
        str(tmp_path / "jpgs"),
        "--workers",
        "0",
        "--json",
    ]
    assert main(args) == 0
    r = json.loads(capsys.readouterr().out)
    for key in (
        "train_images_per_s",
        "inference_images_per_s",
        "latency_ms_batch1",
        "peak_memory_mb",
        "forward_gflops_per_image",
        "matmul_peak_gflops",
        "train_flop_utilisation",
        "data_images_per_s",
        "data_images_per_s_per_worker",
    ):
        assert r[key] > 0, key
    assert r["device"] == "cpu" and r["precision"] == "fp32"
    assert r["matmul_peak_gflops"] == max(
        r["matmul_peak_blas_gflops"], r["matmul_peak_onednn_gflops"]
    )
    assert matmul_peak(__import__("torch").device("cpu"), n=256, reps=2) > 0


def test_bench_checks_its_data_folder_before_timing_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wrong ``--data`` is reported at once, not after minutes of model timing."""
    import mlic.bench as bench
    from mlic.errors import DataError

    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was built before --data was checked")

    monkeypatch.setattr("mlic.models.create_model", no_model)
    (tmp_path / "empty").mkdir()
    for folder in (tmp_path / "nowhere", tmp_path / "empty"):
        with pytest.raises(DataError, match=folder.name):
            bench.benchmark("baseline", backbone=TINY_BACKBONE, image_size=32, data=str(folder))
