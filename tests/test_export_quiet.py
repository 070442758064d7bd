"""`mlic export` says one line of its own, not the exporters' and the optimiser's chatter;
a failed export keeps that chatter in a log file the one error line names."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import mlic
from conftest import TINY_BACKBONE
from mlic.export import ExportError, export_model

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

SRC = str(Path(__file__).resolve().parents[1] / "src")


def test_mlic_export_prints_a_few_lines(tmp_path: Path) -> None:
    model = mlic.create_model("baseline", 3, backbone=TINY_BACKBONE, pretrained=False)
    ckpt = mlic.save_checkpoint(
        model, tmp_path / "m.safetensors", ["a", "b", "c"], input_size=[3, 32, 32]
    )
    done = subprocess.run(
        [sys.executable, "-m", "mlic", "export", str(ckpt)],
        env={**os.environ, "PYTHONPATH": SRC},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) < 5, lines  # the optimiser alone logs ~10 INFO lines
    assert lines[-1].startswith("exported onnx to ") and (tmp_path / "m.onnx").is_file()


class _Chatty(torch.nn.Module):
    """Prints, warns, then branches on data: the export fails after the chatter."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        print("chatter on stdout")
        warnings.warn("a warning from the model", UserWarning, stacklevel=1)
        if x.sum() > 0:  # data-dependent control flow: not exportable
            return x.flatten(1)[:, :2]
        return -x.flatten(1)[:, :2]


def test_a_failed_export_keeps_what_was_said_in_a_log_file(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(ExportError, match=r"the exporter's messages are in .*m\.onnx\.log") as e:
        export_model(_Chatty(), tmp_path / "m.onnx", image_size=4)
    assert "\n" not in str(e.value)  # still one line
    captured = capsys.readouterr()
    assert "chatter" not in captured.out + captured.err
    log = (tmp_path / "m.onnx.log").read_text()
    assert "chatter on stdout" in log and "UserWarning: a warning from the model" in log
    assert not (tmp_path / "m.onnx").exists()
