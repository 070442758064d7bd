"""bf16 on CPUs that have bf16 units: detection, the ``auto`` choice, and where it is used."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import mlic
from conftest import TINY_BACKBONE
from mlic.cli import main
from mlic.config import load_config
from mlic.engine import precision as prec
from mlic.engine.trainer import train

REPO = Path(__file__).resolve().parents[1]
XEON_SPR = "fpu vme sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8"
ZEN4 = "fpu sse2 avx2 avx512f avx512bw avx512_bf16 avx512_vnni"
ZEN3 = "fpu sse2 avx2 fma"


def flags(text: str) -> frozenset[str]:
    return frozenset(text.split())


def test_cpu_flags_read_from_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: X\nflags\t\t: {ZEN4}\n\nprocessor\t: 1\n")
    assert "avx512_bf16" in prec.cpu_flags(str(info))
    assert prec.cpu_flags(str(tmp_path / "absent")) == frozenset()  # no /proc: no units


@pytest.mark.parametrize(
    ("cpu", "units"),
    [(XEON_SPR, ["AMX-BF16", "AVX512-BF16"]), (ZEN4, ["AVX512-BF16"]), (ZEN3, [])],
)
def test_bf16_units_detected(cpu: str, units: list[str]) -> None:
    assert prec.cpu_bf16_units(flags(cpu)) == units


def test_auto_is_bf16_only_on_cpus_with_bf16_units() -> None:
    spr = prec.resolve_precision("auto", "cpu", flags(XEON_SPR))
    assert spr.dtype == torch.bfloat16 and "AMX-BF16 and AVX512-BF16" in spr.reason
    assert prec.resolve_precision("auto", "cpu", flags(ZEN4)).name == "bf16"
    old = prec.resolve_precision("auto", "cpu", flags(ZEN3))
    assert old.dtype is None and "no bf16 units" in old.reason
    # explicit settings are taken as they are, whatever the CPU
    assert prec.resolve_precision("bf16", "cpu", flags(ZEN3)).name == "bf16"
    assert prec.resolve_precision("fp32", "cpu", flags(XEON_SPR)).name == "fp32"
    assert prec.resolve_precision("off", "cpu", flags(XEON_SPR)).name == "fp32"
    with pytest.raises(ValueError, match="'int8' is not one of"):
        prec.resolve_precision("int8", "cpu")


def test_auto_on_cuda_follows_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert prec.resolve_precision("auto", "cuda").name == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert prec.resolve_precision("auto", "cuda").name == "fp32"


@pytest.mark.parametrize(("cpu", "expected"), [(ZEN4, "bf16"), (ZEN3, "fp32")])
def test_training_logs_and_uses_the_auto_choice(
    cpu: str, expected: str, tiny_voc: Path, tmp_path: Path, monkeypatch, caplog
) -> None:
    monkeypatch.setattr(prec, "cpu_flags", lambda *a: flags(cpu))
    seen: list[torch.dtype] = []
    real_forward = mlic.models.baseline.Baseline.forward

    def spy(self, x, *a, **k):
        out = real_forward(self, x, *a, **k)
        seen.append(out.dtype)
        return out

    monkeypatch.setattr(mlic.models.baseline.Baseline, "forward", spy)
    over = [
        f"data.root={tiny_voc}",
        "data.format=voc",
        "data.image_size=64",
        "data.batch_size=8",
        "data.workers=0",
        f"model.backbone={TINY_BACKBONE}",
        "model.pretrained=false",
        "train.epochs=1",
        "train.amp=auto",
        f"run.output_dir={tmp_path}",
        "run.name=r",
        "run.progress=false",
        "run.tensorboard=false",
    ]
    with caplog.at_level(logging.INFO, logger="mlic"):
        train(load_config(None, over))
    assert f"precision: {expected} (auto: the CPU has" in caplog.text
    dtype = torch.bfloat16 if expected == "bf16" else torch.float32
    assert seen and all(d == dtype for d in seen)  # training and evaluation forwards
    weights = mlic.load_checkpoint(tmp_path / "r" / "best.safetensors")[0].state_dict()
    floats = [t for t in weights.values() if t.is_floating_point()]
    assert floats and all(t.dtype == torch.float32 for t in floats)  # fp32 master weights


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import make_voc

    root = tmp_path_factory.mktemp("prec")
    names = ["cat", "dog", "car"]
    rng = np.random.default_rng(0)
    sample = lambda n: [[(names[c], 0)] for c in rng.integers(0, 3, n)]  # noqa: E731
    voc = make_voc(root, {"train": sample(16), "val": sample(8)}, labels_txt=names)
    over = [
        f"data.root={voc}",
        "data.format=voc",
        "data.image_size=64",
        "data.batch_size=8",
        "data.workers=0",
        f"model.backbone={TINY_BACKBONE}",
        "model.pretrained=false",
        "train.epochs=1",
        "train.amp=off",
        f"run.output_dir={root}",
        "run.name=r",
        "run.progress=false",
        "run.tensorboard=false",
    ]
    train(load_config(None, over))
    return root / "r"


def test_predictor_precision(checkpoint: Path) -> None:
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    fp32 = mlic.Predictor.from_checkpoint(checkpoint / "best.safetensors", precision="fp32")
    bf16 = mlic.Predictor.from_checkpoint(checkpoint / "best.safetensors", precision="bf16")
    assert (fp32.precision.name, bf16.precision.name) == ("fp32", "bf16")
    out: list[torch.dtype] = []
    bf16.model.register_forward_hook(lambda m, i, o: out.append(o.dtype))
    p32 = np.stack([p.probabilities for p in fp32.predict(images)])
    p16 = np.stack([p.probabilities for p in bf16.predict(images)])
    assert out == [torch.bfloat16]  # the model ran under bf16 autocast
    np.testing.assert_allclose(p16, p32, atol=0.03)  # bf16's 8-bit mantissa
    assert not np.array_equal(p16, p32)


def test_cli_predict_and_eval_say_which_precision(checkpoint: Path, capsys, tmp_path) -> None:
    img = sorted((checkpoint.parents[0] / "VOCdevkit/VOC2007/JPEGImages").glob("*.jpg"))[0]
    assert main(["predict", str(checkpoint), str(img), "--precision", "fp32"]) == 0
    assert "precision fp32 (fp32 asked for)" in capsys.readouterr().err
    out = tmp_path / "ev"
    assert main(["eval", str(checkpoint), "--precision", "bf16", "--output", str(out)]) == 0
    assert "precision: bf16 (bf16 asked for)" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["precision"] == "bf16 (bf16 asked for)"


def test_gpu_check_dry_run(tmp_path: Path) -> None:
    """benchmarks/gpu_check.sh --dry-run: every step of the GPU check up to its first CUDA
    call, on this CPU-only machine (CUDA hidden), with the JSON and markdown it promises."""
    env = {
        "OUT": str(tmp_path),
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHON": sys.executable,
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
    }
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks/gpu_check.sh"), "--dry-run"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["dry_run"] is True
    steps = {s["name"]: s for s in report["steps"]}
    assert list(steps) == ["env", "gpu-tests", "bench", "nvjpeg", "train"]
    assert all(s["status"] == "ok" for s in steps.values()), steps
    assert steps["gpu-tests"]["result"]["collected"] >= 4
    assert len(steps["bench"]["result"]["runs"]) == 4  # 2 models x (eager, compiled)
    assert steps["train"]["result"]["images"]["train"] > 0
    assert "| bench | ok |" in (tmp_path / "gpu_check.md").read_text()
