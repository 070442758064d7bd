"""Export: every registered model goes checkpoint -> ONNX and matches eager PyTorch in onnxruntime.

Models are built small (timm's ``test_resnet``, 64 px, 5 classes) with their weights nudged
off their initial values, so no head starts at zero and every output depends on the image:
a verification that compares constants would prove nothing. Exports are verified at batch
sizes 1 and 3 while traced at 2, which proves the batch axis is dynamic. Each model is
exported once per module (cached), since an export costs a few seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

import mlic
from conftest import TINY_BACKBONE
from mlic.data.labels import LabelSet
from mlic.export import (
    ExportError,
    ExportResult,
    export_checkpoint,
    export_model,
    onnx_session,
    read_export_metadata,
    verify_onnx,
)

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

NUM_CLASSES = 5
SIZE = 64
NAMES = [f"c{i}" for i in range(NUM_CLASSES)]
THRESHOLDS = [0.5, 0.4, 0.6, 0.5, 0.3]
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def tiny_labels() -> LabelSet:
    rng = np.random.default_rng(0)
    targets = (rng.random((40, NUM_CLASSES)) < 0.4).astype(np.int8)
    labels = LabelSet.from_targets(NAMES, targets)
    labels.word_vectors = rng.standard_normal((NUM_CLASSES, 300)).astype(np.float32)
    return labels


def save_tiny_checkpoint(name: str, folder: Path) -> Path:
    """A checkpoint of a small ``name`` whose every weight is perturbed (no zero-init heads)."""
    torch.manual_seed(0)
    model = mlic.create_model(
        name, NUM_CLASSES, labels=tiny_labels(), backbone=TINY_BACKBONE, pretrained=False
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    folder.mkdir(parents=True, exist_ok=True)
    return mlic.save_checkpoint(
        model,
        folder / f"{name}.safetensors",
        NAMES,
        input_size=(3, SIZE, SIZE),
        mean=MEAN,
        std=STD,
        thresholds=THRESHOLDS,
        threshold_rule="shrunk (shrink 10)",
        threshold_n_pos=[3, 1, 0, 7, 2],
    )


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], ExportResult]:
    """``onnx_export(name)``: the checkpoint -> ONNX export of a small model, made once per module."""
    root = tmp_path_factory.mktemp("export")
    done: dict[str, ExportResult] = {}

    def get(name: str) -> ExportResult:
        if name not in done:
            ckpt = save_tiny_checkpoint(name, root / name)
            done[name] = export_checkpoint(ckpt, root / name / "model.onnx", batch_sizes=(1, 3))
        return done[name]

    return get


@pytest.mark.parametrize("name", mlic.list_models())
def test_onnx_export_every_model(name: str, onnx_export: Callable[[str], ExportResult]) -> None:
    result = onnx_export(name)
    assert result.verified and result.format == "onnx" and result.path.exists()
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-4, f"{name}: {result}"

    # the graph's interface: named input with a symbolic batch axis, probabilities out
    session = onnx_session(result.path, threads=1)
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, out.name) == ("images", "probabilities")
    assert inp.shape == ["batch", 3, SIZE, SIZE] and out.shape == ["batch", NUM_CLASSES]
    x = np.random.default_rng(1).standard_normal((3, 3, SIZE, SIZE)).astype(np.float32)
    (probs,) = session.run(None, {"images": x})
    assert probs.shape == (3, NUM_CLASSES) and ((probs > 0) & (probs < 1)).all()
    # the outputs depend on the image, so the verification compared something
    assert np.ptp(probs, axis=0).max() > 1e-4, f"{name}: probabilities do not depend on the image"


def test_onnx_metadata_describes_the_model(onnx_export: Callable[[str], ExportResult]) -> None:
    meta = read_export_metadata(onnx_export("baseline").path)
    assert meta["label_names"] == NAMES
    assert meta["mlic_model"] == "baseline"
    assert meta["input_size"] == [3, SIZE, SIZE]
    assert (meta["mean"], meta["std"]) == (MEAN, STD)
    assert meta["thresholds"] == THRESHOLDS
    # how they were chosen travels with them (mlic.thresholds.META_KEYS)
    assert meta["threshold_rule"] == "shrunk (shrink 10)"
    assert meta["threshold_n_pos"] == [3, 1, 0, 7, 2]


def test_verify_onnx_detects_a_different_model(
    onnx_export: Callable[[str], ExportResult], tmp_path: Path
) -> None:
    other, _ = mlic.load_checkpoint(save_tiny_checkpoint("baseline", tmp_path))
    with torch.no_grad():
        other.fc.bias.add_(1.0)  # shift every logit: probabilities move by well over 1e-4
    assert verify_onnx(onnx_export("baseline").path, other, SIZE, batch_sizes=(2,)) > 1e-2


@pytest.mark.parametrize(("fmt", "suffix"), [("torchscript", ".ts"), ("exported-program", ".pt2")])
def test_torch_formats_baseline(fmt: str, suffix: str, tmp_path: Path) -> None:
    ckpt = save_tiny_checkpoint("baseline", tmp_path)
    result = export_checkpoint(ckpt, format=fmt, batch_sizes=(1, 3))
    assert result.path == ckpt.with_suffix(suffix) and result.path.exists()
    assert result.verified and result.max_abs_diff is not None and result.max_abs_diff < 1e-4
    assert read_export_metadata(result.path)["label_names"] == NAMES


class _DataDependent(torch.nn.Module):
    """Branches on a tensor value: ``torch.export`` cannot capture it."""

    mlic_name = "data_dependent"

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.mean(dim=(2, 3))  # [B, 3]
        if pooled.sum() > 0:
            return self.fc(pooled)
        return -self.fc(pooled)


class _BakedBatch(torch.nn.Module):
    """Reads the batch size in Python, so ``torch.jit.trace`` records it as a constant."""

    mlic_name = "baked_batch"

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3 * 4 * 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.reshape(int(x.shape[0]), -1))  # [B, 2]


def test_export_failure_names_model_and_cause(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"data_dependent: onnx export failed: \w+"):
        export_model(_DataDependent(), tmp_path / "m.onnx", image_size=4)
    with pytest.raises(ExportError, match="baked_batch.*batch size 1.*recorded the example batch"):
        export_model(_BakedBatch(), tmp_path / "m.ts", format="torchscript", image_size=4)
    with pytest.raises(ExportError, match="baked_batch: onnx export failed: .*specialized"):
        export_model(_BakedBatch(), tmp_path / "m.onnx", image_size=4)
    with pytest.raises(ExportError, match="unknown export format 'tflite'"):
        export_model(_BakedBatch(), tmp_path / "m.tflite", format="tflite", image_size=4)


def test_refused_export_is_deleted(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 2))
    with pytest.raises(ExportError, match=r"disagrees with eager PyTorch.*removed"):
        export_model(model, tmp_path / "m.onnx", image_size=4, atol=-1.0)  # nothing passes
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize(
    ("missing", "argv"),
    [
        ("onnxscript", ["export", "{ckpt}", "--format", "onnx"]),
        ("onnxruntime", ["predict", "{onnx}", "{ckpt}", "--backend", "onnxruntime"]),
    ],
)
def test_a_missing_extra_is_one_line_with_the_pip_command(
    tmp_path: Path, missing: str, argv: list[str], capsys: pytest.CaptureFixture, monkeypatch
) -> None:
    """Without the export extra, `mlic export --format onnx` says which extra and how to get it,
    not "No module named 'onnxscript'" in a traceback."""
    import sys

    from conftest import one_error_line

    model = mlic.create_model("baseline", 3, backbone=TINY_BACKBONE, pretrained=False)
    ckpt = mlic.save_checkpoint(
        model, tmp_path / "m.safetensors", ["a", "b", "c"], input_size=[3, 32, 32]
    )
    (tmp_path / "m.onnx").write_bytes(b"not used")
    monkeypatch.setitem(sys.modules, missing, None)  # import now fails as if not installed
    line = one_error_line([a.format(ckpt=ckpt, onnx=tmp_path / "m.onnx") for a in argv], capsys)
    assert "needs the export extra" in line and "pip install 'mlic[export]'" in line, line
