"""CUDA paths (bf16 autocast, fused AdamW, non-blocking copies, NCCL-free single GPU): run where a GPU exists."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mlic
from conftest import TINY_BACKBONE
from mlic.bench import benchmark
from mlic.config import load_config
from mlic.engine.trainer import autocast_context, train

pytestmark = pytest.mark.gpu


def test_bf16_autocast_training_step_on_cuda() -> None:
    dev = torch.device("cuda")
    model = mlic.create_model("msformer", 5, backbone=TINY_BACKBONE).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    x = torch.randn(4, 3, 64, 64, device=dev)
    with autocast_context(dev, "auto"):
        logits = model(x)
    assert logits.dtype == torch.bfloat16
    logits.float().mean().backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_train_on_cuda_end_to_end(tiny_voc: Path, tmp_path: Path) -> None:
    over = [
        f"data.root={tiny_voc}",
        "data.format=voc",
        "data.image_size=64",
        "data.batch_size=8",
        f"model.backbone={TINY_BACKBONE}",
        "model.pretrained=false",
        "train.epochs=1",
        "train.device=cuda",
        f"run.output_dir={tmp_path}",
        "run.name=gpu",
        "run.progress=false",
    ]
    result = train(load_config(None, over))
    assert 0 <= result["best_mAP"] <= 1


def test_bench_cuda_bf16() -> None:
    r = benchmark(
        "baseline",
        backbone=TINY_BACKBONE,
        image_size=64,
        batch_size=4,
        device="cuda",
        precision="bf16",
    )
    assert r["train_images_per_s"] > 0 and r["matmul_peak_gflops"] > 0


def test_nvjpeg_decoding_on_cuda(tiny_voc: Path, tmp_path: Path) -> None:
    over = [
        f"data.root={tiny_voc}",
        "data.format=voc",
        "data.image_size=64",
        "data.batch_size=8",
        f"model.backbone={TINY_BACKBONE}",
        "model.pretrained=false",
        "train.epochs=1",
        "train.device=cuda",
        "data.gpu_decode=true",
        f"run.output_dir={tmp_path}",
        "run.name=nvjpeg",
        "run.progress=false",
    ]
    assert 0 <= train(load_config(None, over))["best_mAP"] <= 1
