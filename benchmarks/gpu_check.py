"""The prepared GPU check: everything mlic measures on one NVIDIA GPU, in one go.

Run through ``benchmarks/gpu_check.sh`` (which installs the project first) on a machine with
one CUDA GPU; it writes ``gpu_check.json`` and ``gpu_check.md`` to ``$OUT`` (default
``./gpu-check``). Steps, each timed and recorded even when another fails:

1. ``env``: torch, CUDA, the GPU's name and memory (``nvidia-smi`` and ``torch.cuda``).
2. ``gpu-tests``: the ``gpu``-marked tests (``pytest -m gpu``).
3. ``bench``: ``mlic bench`` for baseline and msformer at ResNet-101 / 448 px in bf16, with and
   without ``torch.compile``: train and inference img/s, peak memory, FLOP utilisation
   against the measured bf16 matmul peak.
4. ``nvjpeg``: img/s of the ``data.gpu_decode`` path (nvJPEG batch decode, resize, normalise).
5. ``train``: a 200-step msformer training run at 448 px on the VOC subset
   (``../shared/realdata``; the generated demo set where that is absent), bf16 autocast,
   nvJPEG decoding: s/step, img/s, first and last loss, val mAP.

``--dry-run`` does every step up to its first CUDA call and stops there, on any machine:
the test collection, the argument parsing and model construction (on the CPU) of
every bench run, the decode inputs, and the training config and data. CI runs it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
VOC_SUBSET = "realdata/voc2007-trainval-subset/VOCdevkit/VOC2007"
BENCH_MODELS = ("baseline", "msformer")
TRAIN_STEPS = 200


def _run(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> str:
    """Run ``cmd``; its stdout, or RuntimeError with the tail of its output."""
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise RuntimeError(f"{' '.join(cmd[:6])} ... exited {proc.returncode}:\n{tail}")
    return proc.stdout


def find_voc(explicit: str | None) -> tuple[Path | None, str]:
    """The VOC 2007 folder for the decode and training steps, and where it came from."""
    if explicit:
        return Path(explicit), "--voc-root"
    for base in (REPO.parent / "shared", REPO / "shared"):
        if (base / VOC_SUBSET / "ImageSets/Main/train.txt").exists():
            return base / VOC_SUBSET, "real VOC 2007 subset"
    return None, "generated demo set (the real subset is not on this machine)"


# ----------------------------------------------------------------------------- steps
def step_env(ctx: dict[str, Any], dry: bool) -> dict[str, Any]:
    import torch

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_build": torch.version.cuda,
        "nvidia_smi": shutil.which("nvidia-smi"),
    }
    if dry:
        return out
    if not torch.cuda.is_available():
        raise RuntimeError("torch sees no CUDA device")
    props = torch.cuda.get_device_properties(0)
    out.update(
        gpu=props.name,
        memory_gib=round(props.total_memory / 2**30, 1),
        multiprocessors=props.multi_processor_count,
        bf16=torch.cuda.is_bf16_supported(),
    )
    if out["nvidia_smi"]:
        out["driver"] = _run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], 30
        ).strip()
    return out


def step_gpu_tests(ctx: dict[str, Any], dry: bool) -> dict[str, Any]:
    base = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"]
    if dry:
        listed = _run([*base, "--collect-only"], 300)
        tests = [ln for ln in listed.splitlines() if "::" in ln]
        if not tests:
            raise RuntimeError("no gpu-marked tests collected")
        return {"collected": len(tests)}
    out = _run([*base, "-rs"], 240)
    return {"summary": out.strip().splitlines()[-1]}


def bench_argv(model: str, compile_: bool, batch: int, steps: int) -> list[str]:
    argv = [
        "bench",
        model,
        "--backbone",
        "resnet101",
        "--image-size",
        "448",
        "--device",
        "cuda",
        "--precision",
        "bf16",
        "--batch-size",
        str(batch),
        "--steps",
        str(steps),
        "--json",
    ]
    return [*argv, "--compile"] if compile_ else argv


def step_bench(ctx: dict[str, Any], dry: bool) -> dict[str, Any]:
    runs = [(m, c) for m in BENCH_MODELS for c in (False, True)]
    if dry:
        from mlic.bench import random_labelset
        from mlic.cli import build_parser
        from mlic.models import create_model

        parser = build_parser()
        for m, c in runs:
            args = parser.parse_args(bench_argv(m, c, ctx["batch"], ctx["steps"]))
            create_model(
                args.model, 80, labels=random_labelset(80), backbone=args.backbone, pretrained=False
            )  # on the CPU: every layer of the benched model
        return {"runs": [f"{m}{' compiled' if c else ''}" for m, c in runs]}
    results = []
    for m, c in runs:
        argv = bench_argv(m, c, ctx["batch"], ctx["steps"])
        results.append(json.loads(_run([sys.executable, "-m", "mlic", *argv], 300)))
    return {"runs": results}


def step_nvjpeg(ctx: dict[str, Any], dry: bool) -> dict[str, Any]:
    from mlic.bench import gpu_decode_speed

    folder = ctx["voc"] / "JPEGImages"
    files = sorted(folder.glob("*.jpg"))
    if not files:
        raise RuntimeError(f"{folder}: no JPEG files")
    out = {"data": ctx["voc_source"], "files": len(files)}
    if dry:
        from mlic.data.transforms import decode_image

        decode_image(files[0])  # the inputs are readable (on the CPU)
        return out
    return {**out, "images_per_s": gpu_decode_speed(files, 448, "cuda", batch=64)}


def train_overrides(ctx: dict[str, Any], run_dir: Path) -> list[str]:
    """msformer's paper recipe at 448 px for exactly TRAIN_STEPS steps on the chosen data."""
    epochs = 20
    return [
        "data.format=voc",
        f"data.root={ctx['voc']}",
        "data.train=train",
        "data.val=val",
        "data.image_size=448",
        "data.batch_size=32",
        "data.workers=8",
        "data.gpu_decode=true",
        f"model.pretrained={str(ctx['pretrained']).lower()}",
        "train.device=cuda",
        "train.amp=auto",
        f"train.epochs={epochs}",
        f"train.max_steps_per_epoch={TRAIN_STEPS // epochs}",
        f"train.eval_every={epochs}",
        f"run.output_dir={run_dir.parent}",
        f"run.name={run_dir.name}",
        "run.progress=false",
        "run.tensorboard=false",
        "run.overwrite=true",
    ]


def step_train(ctx: dict[str, Any], dry: bool) -> dict[str, Any]:
    from mlic.cli import resolve_config_path
    from mlic.config import load_config
    from mlic.data.dataset import load_split

    run_dir = ctx["out"] / "train-msformer"
    over = train_overrides(ctx, run_dir)
    cfg = load_config(resolve_config_path("msformer_voc2007"), over)
    sizes = {s: len(load_split(cfg.data, s).images) for s in ("train", "val")}
    need = math.ceil(cfg.train.max_steps_per_epoch * cfg.data.batch_size / 0.9)
    if sizes["train"] < need:
        raise RuntimeError(f"{cfg.data.root}: {sizes['train']} train images, need >= {need}")
    out = {"data": ctx["voc_source"], "images": sizes, "pretrained": ctx["pretrained"]}
    if dry:
        return out
    t0 = time.perf_counter()
    _run([sys.executable, "-m", "mlic", "train", "msformer_voc2007", *over], 420)
    wall = time.perf_counter() - t0
    import csv

    with (run_dir / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    train_s = sum(float(r["epoch_time_s"]) for r in rows)
    steps = cfg.train.epochs * cfg.train.max_steps_per_epoch
    return {
        **out,
        "steps": steps,
        "s_per_step": train_s / steps,
        "train_images_per_s": steps * cfg.data.batch_size / train_s,
        "first_epoch_loss": float(rows[0]["train_loss"]),
        "last_epoch_loss": float(rows[-1]["train_loss"]),
        "val_mAP": max(float(r["mAP"]) for r in rows if r.get("mAP")),
        "wall_s": wall,
    }


STEPS: list[tuple[str, Callable[[dict[str, Any], bool], dict[str, Any]]]] = [
    ("env", step_env),
    ("gpu-tests", step_gpu_tests),
    ("bench", step_bench),
    ("nvjpeg", step_nvjpeg),
    ("train", step_train),
]


# ----------------------------------------------------------------------------- report
def markdown(report: dict[str, Any]) -> str:
    """The report as a markdown page: one line per step, then the bench table."""
    lines = [
        f"# mlic GPU check ({'dry run' if report['dry_run'] else 'run'}, {report['date']})",
        "",
        "| step | status | seconds | result |",
        "|---|---|---:|---|",
    ]
    for s in report["steps"]:
        res = s.get("error") or {k: v for k, v in s.get("result", {}).items() if k != "runs"}
        text = str(res).replace("|", "/").replace("\n", " ")[:300]
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.0f} | {text} |")
    bench = next((s for s in report["steps"] if s["name"] == "bench"), {})
    runs = [r for r in bench.get("result", {}).get("runs", []) if isinstance(r, dict)]
    if runs:
        lines += [
            "",
            "| model | compile | train img/s | infer img/s | peak MiB | train util | "
            "infer util | bf16 peak TFLOP/s |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in runs:
            lines.append(
                f"| {r['model']} | {r['compile']} | {r['train_images_per_s']:.0f} | "
                f"{r['inference_images_per_s']:.0f} | {r['peak_memory_mb']:.0f} | "
                f"{100 * r['train_flop_utilisation']:.0f} % | "
                f"{100 * r['inference_flop_utilisation']:.0f} % | "
                f"{r['matmul_peak_gflops'] / 1000:.0f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="every step up to its first CUDA call")
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu-check"))
    ap.add_argument("--voc-root", help="VOC2007 folder (default: ../shared/realdata's subset)")
    ap.add_argument(
        "--pretrained",
        action="store_true",
        help="ImageNet weights for the training step (needs them cached or online)",
    )
    ap.add_argument("--batch-size", type=int, default=64, help="bench batch")
    ap.add_argument("--steps", type=int, default=20, help="bench timed steps")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    voc, source = find_voc(args.voc_root)
    if voc is None:
        from mlic.data.demo import ensure_demo

        voc = ensure_demo(out / "demo-data", num_train=400, num_val=100, image_size=448)
    ctx = {
        "out": out,
        "voc": voc,
        "voc_source": source,
        "pretrained": args.pretrained,
        "batch": args.batch_size,
        "steps": args.steps,
    }
    report: dict[str, Any] = {
        "dry_run": args.dry_run,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "steps": [],
    }
    for name, fn in STEPS:
        print(f"[gpu-check] {name}{' (dry run)' if args.dry_run else ''} ...", flush=True)
        t0 = time.perf_counter()
        entry: dict[str, Any] = {"name": name}
        try:
            entry.update(status="ok", result=fn(ctx, args.dry_run))
        except Exception as e:  # record and go on: the other steps' figures still come back
            entry.update(status="failed", error=f"{type(e).__name__}: {e}")
            traceback.print_exc()
        entry["seconds"] = time.perf_counter() - t0
        report["steps"].append(entry)
        print(f"[gpu-check] {name}: {entry['status']} ({entry['seconds']:.0f} s)", flush=True)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
        (out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if all(s["status"] == "ok" for s in report["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
