"""Heat maps for every registered model: attention / CAM where the model has it, Grad-CAM
otherwise; ``mlic predict --heatmaps`` works for each."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mlic
from conftest import TINY_BACKBONE, write_image
from mlic.cli import main
from mlic.data.labels import LabelSet
from mlic.engine.checkpoint import save_checkpoint
from mlic.explain import grad_cam, label_maps

NAMES = ["cat", "dog", "car", "person", "tree"]


def labels() -> LabelSet:
    targets = np.random.default_rng(0).integers(0, 2, (20, len(NAMES)))
    return LabelSet.from_targets(NAMES, targets)


@pytest.mark.parametrize("name", mlic.list_models())
def test_every_model_gives_label_maps(name: str) -> None:
    torch.manual_seed(0)
    model = mlic.create_model(name, len(NAMES), labels=labels(), backbone=TINY_BACKBONE).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits, maps = label_maps(model, x)
        plain = model(x)
    assert maps.ndim == 4 and maps.shape[:2] == (2, len(NAMES)) and min(maps.shape[2:]) >= 2
    assert torch.isfinite(maps).all()
    torch.testing.assert_close(logits, plain)  # maps do not change the prediction
    from mlic.viz import overlay_heatmap

    photo = Image.new("RGB", (96, 80), (120, 60, 30))
    assert overlay_heatmap(photo, maps[0, 1].numpy()).size == (96, 80)


def test_grad_cam_of_a_pooled_linear_head_is_relu_cam() -> None:
    """GAP + linear: d logit_c / d A_k(i, j) = w_ck / (h w), so Grad-CAM = ReLU(CAM) / (h w)."""
    torch.manual_seed(0)
    model = mlic.create_model("baseline", len(NAMES), backbone=TINY_BACKBONE).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():  # Grad-CAM still gets its gradients
        logits, cams = grad_cam(model, x)
        ref_logits, cam = model(x, return_attention=True)
    h, w = cam.shape[-2:]
    torch.testing.assert_close(cams, torch.relu(cam) / (h * w), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(logits, ref_logits)
    assert all(p.grad is None for p in model.parameters())


def test_models_without_attention_get_grad_cam_in_predict(tmp_path: Path, monkeypatch) -> None:
    torch.manual_seed(0)
    model = mlic.create_model("csra", len(NAMES), backbone=TINY_BACKBONE)
    model.default_cfg["input_size"] = (3, 64, 64)
    ckpt = save_checkpoint(model, tmp_path / "m.safetensors", NAMES)
    from mlic.models.csra import CSRA

    monkeypatch.setattr(CSRA, "has_attention", property(lambda self: False))
    calls = []
    import mlic.explain as explain

    real = explain.grad_cam
    monkeypatch.setattr(explain, "grad_cam", lambda m, x: calls.append(1) or real(m, x))
    image = tmp_path / "a.jpg"
    write_image(image, 0, size=80)
    heat = tmp_path / "heat"
    code = main(
        [
            "predict",
            str(ckpt),
            str(image),
            "--threshold",
            "0",
            "--top-k",
            "2",
            "--heatmaps",
            str(heat),
            "-q",
        ]
    )
    assert code == 0 and calls
    overlays = sorted(heat.glob("*__*.png"))
    assert len(overlays) == 3  # two labels + the grid
    assert Image.open(overlays[0]).size == (80, 80)
