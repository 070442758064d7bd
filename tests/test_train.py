"""End-to-end training on a tiny VOC-layout set: run folder, resume, evaluation, report."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import mlic
from conftest import TINY_BACKBONE
from mlic.cli import main
from mlic.config import load_config
from mlic.engine.checkpoint import atomic_write, load_resume
from mlic.engine.trainer import TrainingStopped, train
from mlic.errors import ConfigError


def tiny_overrides(voc: Path, out: Path, name: str | None, **over: str) -> list[str]:
    """The tiny run's ``key=value`` overrides (no ``run.name`` when ``name`` is None)."""
    base = {
        "data.format": "voc",
        "data.root": str(voc),
        "data.image_size": "64",
        "data.batch_size": "8",
        "data.workers": "0",
        "model.backbone": TINY_BACKBONE,
        "model.pretrained": "false",
        "train.epochs": "2",
        "optim.lr": "0.003",
        "run.output_dir": str(out),
        "run.name": name,
        "run.progress": "false",
        "run.tensorboard": "false",
        "data.randaugment": "true",
        "data.random_erasing": "0.25",
        "train.ema_decay": "0.9",
    }
    base.update(over)
    return [f"{k}={v}" for k, v in base.items() if not (k == "run.name" and name is None)]


def tiny_cfg(voc: Path, out: Path, name: str, **over: str):
    return load_config(None, tiny_overrides(voc, out, name, **over))


def read_metrics(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def test_train_writes_the_run_folder(tiny_voc: Path, tmp_path: Path) -> None:
    result = train(tiny_cfg(tiny_voc, tmp_path, "a", **{"run.tensorboard": "true"}))
    run = tmp_path / "a"
    for f in (
        "config.yaml",
        "metrics.csv",
        "best.safetensors",
        "last.resume.pt",
        "report.md",
        "per_class_ap.png",
        "pr_curves.png",
        "labels/labels.json",
        "labels/cooccurrence.npy",
    ):
        assert (run / f).exists(), f
    assert any((run / "tb").iterdir())
    rows = read_metrics(run)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert {"mAP", "CF1", "OF1", "ema_mAP", "train_loss"} <= set(rows[0])
    best = max(max(float(r["mAP"]), float(r["ema_mAP"])) for r in rows)
    assert result["best_mAP"] == pytest.approx(best, abs=1e-6)
    model, meta = mlic.load_checkpoint(run / "best.safetensors")
    assert meta["label_names"] == ["cat", "dog", "car", "person", "tree"]
    assert meta["input_size"] == [3, 64, 64] and meta["model"] == "baseline"
    assert meta["weights"] in ("model", "ema")
    assert meta["metrics"]["mAP"] == pytest.approx(best, abs=1e-6)
    report = (run / "report.md").read_text()
    assert "| mAP | CP | CR | CF1 | OP | OR | OF1 |" in report and "per_class_ap.png" in report
    assert load_config(run / "config.yaml").model.backbone == TINY_BACKBONE


def test_resume_after_interruption_is_bit_identical(tiny_voc: Path, tmp_path: Path) -> None:
    train(tiny_cfg(tiny_voc, tmp_path, "full"))
    # 24 images / batch 8 = 3 steps per epoch: stop mid-way through epoch 1, then again in epoch 2
    with pytest.raises(TrainingStopped):
        train(tiny_cfg(tiny_voc, tmp_path, "cut"), stop_after_steps=2)
    state = load_resume(tmp_path / "cut" / "last.resume.pt")
    assert state["run"]["epoch"] == 0 and state["run"]["step"] == 2
    with pytest.raises(TrainingStopped):
        train(None, resume=tmp_path / "cut", stop_after_steps=4)
    train(None, resume=tmp_path / "cut")
    full, cut = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut")
    for a, b in zip(full, cut, strict=True):
        for key in ("train_loss", "mAP", "ema_mAP", "CF1", "OF1"):
            assert a[key] == b[key], (key, a, b)
    wa = load_file(str(tmp_path / "full" / "best.safetensors"))
    wb = load_file(str(tmp_path / "cut" / "best.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_worker_count_does_not_change_training(tiny_voc: Path, tmp_path: Path) -> None:
    over = {"train.epochs": "1", "train.ema": "false"}
    train(tiny_cfg(tiny_voc, tmp_path, "w0", **over))
    train(tiny_cfg(tiny_voc, tmp_path, "w2", **over, **{"data.workers": "2"}))
    assert (
        read_metrics(tmp_path / "w0")[0]["train_loss"]
        == read_metrics(tmp_path / "w2")[0]["train_loss"]
    )


def test_eval_cli_on_run_and_checkpoint(
    tiny_voc: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train(tiny_cfg(tiny_voc, tmp_path, "e", **{"train.epochs": "1"}))
    assert main(["eval", str(tmp_path / "e")]) == 0
    out = capsys.readouterr().out
    assert "| mAP |" in out
    assert (tmp_path / "e" / "eval-val" / "report.md").exists()
    # a bare checkpoint with data given on the command line
    ck = tmp_path / "copy.safetensors"
    ck.write_bytes((tmp_path / "e" / "best.safetensors").read_bytes())
    # -q: no progress bar (the default config of a bare checkpoint shows one)
    data = ["data.format=voc", f"data.root={tiny_voc}", "data.workers=0"]
    for quiet, bar in (([], True), (["-q"], False)):
        assert main(["eval", str(ck), *data, "--output", str(tmp_path / "q"), *quiet]) == 0
        assert ("%|" in capsys.readouterr().err) is bar
    code = main(
        [
            "eval",
            str(ck),
            "data.format=voc",
            f"data.root={tiny_voc}",
            "data.workers=0",
            "run.progress=false",
            "--output",
            str(tmp_path / "ev"),
        ]
    )
    assert code == 0
    import json

    payload = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert payload["num_images"] == 12 and 0 <= payload["metrics"]["mAP"] <= 1
    scores = np.load(tmp_path / "ev" / "scores.npy")
    assert scores.shape == (12, 5)


def test_atomic_write_keeps_previous_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "best.safetensors"
    target.write_bytes(b"previous")

    def crash(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(target, crash)
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["best.safetensors"]


def test_gradient_accumulation_steps_the_optimiser_less_often(
    tiny_voc: Path, tmp_path: Path
) -> None:
    # 24 images / batch 8 = 3 batches per epoch; with accum_steps=2: steps after batches 2 and 3
    train(tiny_cfg(tiny_voc, tmp_path, "acc", **{"train.accum_steps": "2", "train.epochs": "2"}))
    state = load_resume(tmp_path / "acc" / "last.resume.pt")
    assert state["run"]["step"] == 4 and state["run"]["epoch"] == 2
    assert state["scheduler"]["last_epoch"] == 4


def test_torch_compile_trains_like_eager(tiny_voc: Path, tmp_path: Path) -> None:
    # fp32 on every CPU: train.amp=auto picks bf16 where the CPU has it (AMX, AVX512_BF16), and
    # inductor's bf16 rounding differs from eager's; bf16 has its own test below
    over = {
        "train.epochs": "1",
        "train.ema": "false",
        "data.randaugment": "false",
        "train.amp": "off",
    }
    train(tiny_cfg(tiny_voc, tmp_path, "eager", **over))
    train(tiny_cfg(tiny_voc, tmp_path, "compiled", **over, **{"train.compile": "true"}))
    a, b = read_metrics(tmp_path / "eager")[0], read_metrics(tmp_path / "compiled")[0]
    assert float(b["train_loss"]) == pytest.approx(float(a["train_loss"]), rel=1e-3)
    assert float(b["mAP"]) == pytest.approx(float(a["mAP"]), abs=0.02)
    # the checkpoint of a compiled run holds plain module keys (no "_orig_mod." prefix)
    mlic.load_checkpoint(tmp_path / "compiled" / "best.safetensors")


def test_device_side_decoding_path_trains(tiny_voc: Path, tmp_path: Path) -> None:
    # data.gpu_decode runs the same code on the CPU: decode_jpeg(device=cpu) a batch at a time
    result = train(
        tiny_cfg(tiny_voc, tmp_path, "rawdec", **{"data.gpu_decode": "true", "train.epochs": "1"})
    )
    assert 0 <= result["best_mAP"] <= 1
    assert read_metrics(tmp_path / "rawdec")[0]["epoch"] == "1"


def test_bf16_autocast_on_cpu_trains_close_to_fp32(tiny_voc: Path, tmp_path: Path) -> None:
    # train.amp=bf16 is opt-in on CPU (2.1x the fp32 step on an AVX512_BF16 CPU, BENCHMARKS
    # section 5); it must train the same model, to bf16's precision
    over = {"train.epochs": "1", "train.ema": "false", "data.randaugment": "false"}
    train(tiny_cfg(tiny_voc, tmp_path, "fp32", **over, **{"train.amp": "off"}))
    train(tiny_cfg(tiny_voc, tmp_path, "bf16", **over, **{"train.amp": "bf16"}))
    a, b = read_metrics(tmp_path / "fp32")[0], read_metrics(tmp_path / "bf16")[0]
    assert b["train_loss"] != a["train_loss"]  # autocast did run in bf16
    assert float(b["train_loss"]) == pytest.approx(float(a["train_loss"]), rel=0.05)
    assert float(b["mAP"]) == pytest.approx(float(a["mAP"]), abs=0.1)
    weights = mlic.load_checkpoint(tmp_path / "bf16" / "best.safetensors")[0].state_dict()
    assert all(t.dtype != torch.bfloat16 for t in weights.values())  # fp32 master weights


@pytest.mark.parametrize("freeze", [True, False])
def test_freeze_bn_stats_keeps_backbone_statistics(
    tiny_voc: Path, tmp_path: Path, freeze: bool
) -> None:
    """train.freeze_bn_stats: the backbone's BN running statistics stay as they started (here
    a fresh init: mean 0, var 1) while their scale and shift still train; without it they move."""
    over = {"train.epochs": "1", "train.ema": "false", "train.freeze_bn_stats": str(freeze).lower()}
    train(tiny_cfg(tiny_voc, tmp_path, "bn", **over))
    state = load_file(tmp_path / "bn" / "best.safetensors")
    means = [
        v for k, v in state.items() if k.startswith("backbone.") and k.endswith("running_mean")
    ]
    scales = [
        state[k[: -len("running_mean")] + "weight"]
        for k in state
        if k.startswith("backbone.") and k.endswith("running_mean")
    ]
    assert means, "the tiny backbone has BatchNorm layers"
    stats_moved = any(m.abs().max() > 0 for m in means)
    assert stats_moved is not freeze
    assert any((s - 1).abs().max() > 0 for s in scales)  # the affine scale trains either way


def _pretrained_backbone_file(tmp_path: Path, seed: int) -> tuple[Path, dict]:
    """A random tiny backbone saved as a pretrained safetensors file, and its weights."""
    torch.manual_seed(seed)
    net = timm.create_model(TINY_BACKBONE, pretrained=False, num_classes=0)
    weights = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(weights, tmp_path / "backbone.safetensors")
    return tmp_path / "backbone.safetensors", weights


def _moved_backbone_weights(state: dict, weights: dict) -> list[str]:
    """Names of the pretrained backbone tensors that a trained checkpoint ``state`` changed."""
    body = {
        k.removeprefix("backbone.body."): v
        for k, v in state.items()
        if k.startswith("backbone.body.")
    }
    assert set(weights) - {k for k in weights if k.endswith("num_batches_tracked")} <= set(body)
    return [k for k in body if k in weights and not torch.equal(body[k], weights[k])]


@pytest.mark.parametrize("warmup", [1, 0])
def test_head_warmup_leaves_the_backbone_as_pretrained(
    tiny_voc: Path, tmp_path: Path, warmup: int
) -> None:
    """train.head_warmup_epochs: during the warm-up only the head trains; the backbone's
    weights and BatchNorm statistics stay exactly those of the pretrained file."""
    path, weights = _pretrained_backbone_file(tmp_path, seed=3)
    over = {
        "train.epochs": "1",
        "train.ema": "false",
        "train.head_warmup_epochs": str(warmup),
        "model.pretrained_file": str(path),
    }
    train(tiny_cfg(tiny_voc, tmp_path, "warm", **over))
    state = load_file(tmp_path / "warm" / "best.safetensors")
    moved = _moved_backbone_weights(state, weights)
    if warmup:
        assert moved == []
    else:  # fine-tuned from the first step: weights and statistics move
        assert any(k.endswith("running_mean") for k in moved)
        assert any("conv" in k and k.endswith(".weight") for k in moved)  # a convolution
    assert state["fc.weight"].abs().sum() > 0  # the head trained either way


def test_zero_backbone_lr_freezes_the_backbone(tiny_voc: Path, tmp_path: Path) -> None:
    """optim.backbone_lr_mult=0 is linear probing: the backbone's weights stay exactly the
    pretrained file's (no gradient is computed for them), its BN statistics freeze with
    train.freeze_bn_stats, and the head trains."""
    path, weights = _pretrained_backbone_file(tmp_path, seed=4)
    over = {
        "train.epochs": "1",
        "train.ema": "false",
        "optim.backbone_lr_mult": "0",
        "train.freeze_bn_stats": "true",
        "model.pretrained_file": str(path),
    }
    train(tiny_cfg(tiny_voc, tmp_path, "probe", **over))
    state = load_file(tmp_path / "probe" / "best.safetensors")
    assert _moved_backbone_weights(state, weights) == []
    assert state["fc.weight"].abs().sum() > 0
    # the optimiser was given the head's parameters only (fc weight and bias)
    resume = torch.load(tmp_path / "probe" / "last.resume.pt", weights_only=True)
    held = [i for g in resume["optimizer"]["param_groups"] for i in g["params"]]
    assert len(held) == 2


def test_head_warmup_longer_than_the_run_is_refused(tiny_voc: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train.head_warmup_epochs=3 must be in \[0, "):
        tiny_cfg(tiny_voc, tmp_path, "x", **{"train.head_warmup_epochs": "3"})


def test_train_ends_with_the_kept_weights_table_and_one_epoch_numbering(
    tiny_voc: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`mlic train` ends as the demo does: which epoch and which weights (raw or EMA) were kept,
    their metrics at 0.5 and at the stored thresholds; metrics.csv, the checkpoint and the
    table count epochs the same way (from 1)."""
    from mlic.engine.checkpoint import read_metadata

    assert main(["train", "demo", *tiny_overrides(tiny_voc, tmp_path, "t")]) == 0
    out = capsys.readouterr().out
    meta = read_metadata(tmp_path / "t" / "best.safetensors")
    rows = read_metrics(tmp_path / "t")
    assert 1 <= meta["epoch"] <= len(rows) == 2
    ema = meta["weights"] == "ema"
    kept = "the EMA weights" if ema else "the raw weights"
    assert f"best epoch {meta['epoch']} of 2, {kept} kept" in out, out
    # the thresholds users get first, with the rule and the data they were chosen on; then 0.5
    users = out.index("At the per-class thresholds `mlic predict` and `serve` use (rule shrunk")
    assert users < out.index("At threshold 0.5 (the papers' convention):")
    assert "chosen on " in out and "held-out training images" in out
    row = rows[meta["epoch"] - 1]  # metrics.csv's row of the kept epoch: its numbers are shown
    assert row["epoch"] == str(meta["epoch"])
    assert f"| {100 * float(row[('ema_' if ema else '') + 'mAP']):.2f} |" in out, out


def test_a_recipe_on_other_data_is_named_after_the_model_and_the_data(
    tiny_voc: Path, tmp_path: Path
) -> None:
    """`mlic train demo data.root=...` does not make runs/demo: the run is named after the
    model and the data folder unless run.name is given."""
    over = tiny_overrides(tiny_voc, tmp_path / "runs", None, **{"train.epochs": "1"})
    assert main(["train", "demo", *over]) == 0
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [f"baseline-{tiny_voc.name}"]
    assert main(["train", "demo", *over, "run.name=mine"]) == 0
    assert (tmp_path / "runs" / "mine" / "best.safetensors").exists()
