"""Every registered model on real PASCAL VOC 2007 photographs: one budget, several seeds.

Trains each model's shipped ``<model>_demo`` recipe on the official ``train`` list of a VOC
2007 folder and evaluates on ``val`` (by default the 765-image real subset in
``../shared/realdata``), with the backbone, input size, epochs and seeds given here, each
run in a fresh process. Reports, per model, the mean and the seed-to-seed spread of: mAP,
CF1 and OF1 at threshold 0.5 and at the calibrated per-class thresholds (when the run
stores them), seconds per training epoch and parameters.

    python benchmarks/real_voc.py --seeds 0,1,2 --epochs 6 --image-size 224 \
        --backbone tf_efficientnet_lite0 --out runs/real-voc --json real_voc.json

A run whose results already exist under ``--out`` is read, not repeated, so an interrupted
benchmark continues where it stopped. ``PYTHONPATH`` is passed on to the runs, so another
checkout of mlic can be measured with the same script (``PYTHONPATH=/other/src``).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_ROOT = (
    Path(__file__).resolve().parents[1].parent
    / "shared/realdata/voc2007-trainval-subset/VOCdevkit/VOC2007"
)
METRICS = ("mAP", "CF1", "OF1", "cal_CF1", "cal_OF1")


def best_epoch(run: Path) -> dict[str, float]:
    """The run's best validation epoch by mAP over the model and its EMA, as mlic selects it."""
    with (run / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    best: dict[str, float] = {}
    for r in rows:
        for prefix in ("", "ema_"):
            if not r.get(f"{prefix}mAP"):
                continue
            cand = {k: float(r[f"{prefix}{k}"]) for k in METRICS if r.get(f"{prefix}{k}")}
            if not best or cand["mAP"] > best["mAP"]:
                best = {**cand, "epoch": int(r["epoch"]), "ema": float(bool(prefix))}
    best["s_per_epoch"] = sum(float(r["epoch_time_s"]) for r in rows) / len(rows)
    return best


def count_parameters(checkpoint: Path) -> int:
    """Trainable parameters of the model in ``checkpoint``, counted by the mlic that wrote it."""
    code = (
        "import sys, mlic; m, _ = mlic.load_checkpoint(sys.argv[1]);"
        "print(sum(p.numel() for p in m.parameters()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(checkpoint)], capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip().splitlines()[-1])


def run_one(model: str, seed: int, args: argparse.Namespace) -> dict[str, float]:
    """Train one (model, seed) in a fresh process, or read its finished results."""
    name = f"{model}-{args.backbone}-{args.image_size}-s{seed}"
    run = Path(args.out) / name
    done = run / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    if run.exists():  # an interrupted earlier attempt: this benchmark owns --out
        shutil.rmtree(run)
    overrides = [
        "data.format=voc",
        f"data.root={args.root}",
        "data.train=train",
        "data.val=val",
        f"data.image_size={args.image_size}",
        f"model.backbone={args.backbone}",
        f"train.epochs={args.epochs}",
        f"train.seed={seed}",
        f"run.output_dir={args.out}",
        f"run.name={name}",
        "run.progress=false",
        "run.tensorboard=false",
        *args.set,
    ]
    cmd = [sys.executable, "-m", "mlic", "train", f"{model}_demo", *overrides]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:  # progress: the run's epoch lines as they come
        if line.startswith(("epoch", "best", "mlic: error", "Traceback")) or "Error" in line:
            print(f"    [{name}] {line.rstrip()}", flush=True)
    if proc.wait() != 0:
        raise SystemExit(f"{name}: training failed (exit {proc.returncode}); see {run}")
    result = best_epoch(run)
    result["wall_s"] = time.perf_counter() - t0
    result["params_m"] = count_parameters(run / "best.safetensors") / 1e6
    done.write_text(json.dumps(result, indent=1))
    return result


def summarise(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def table(results: dict[str, list[dict[str, float]]], timing_seed: int | None = None) -> str:
    """Markdown table: mean ± std over seeds, in percent, best mAP first. s/epoch is the mean
    over the seeds, or that of the ``timing_seed`` run alone where one was timed apart."""
    head = "| model | mAP | CF1@0.5 | OF1@0.5 | CF1@cal | OF1@cal | s/epoch | params (M) | seeds |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def cell(runs: list[dict[str, float]], key: str) -> str:
        vals = [100 * r[key] for r in runs if key in r]
        if not vals:
            return "—"
        mean, std = summarise(vals)
        return f"{mean:.1f} ± {std:.1f}" if len(vals) > 1 else f"{mean:.1f}"

    order = sorted(results, key=lambda m: -summarise([r["mAP"] for r in results[m]])[0])
    for model in order:
        runs = results[model]
        timed = [r for r in runs if timing_seed is not None and r.get("seed") == timing_seed]
        secs = summarise([r["s_per_epoch"] for r in (timed or runs)])[0]
        cells = [cell(runs, k) for k in METRICS]
        lines.append(
            f"| {model} | {' | '.join(cells)} | {secs:.0f} | {runs[0]['params_m']:.2f} | "
            f"{len(runs)} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(DEFAULT_ROOT), help="the VOC2007 folder")
    ap.add_argument("--models", help="comma-separated subset (default: every registered model)")
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default="runs/real-voc")
    ap.add_argument("--json", help="also write every run's result here")
    ap.add_argument("--set", nargs="*", default=[], help="extra key=value overrides for every run")
    ap.add_argument(
        "--timing-seed",
        type=int,
        help="s/epoch from this seed's runs only (e.g. the ones run alone)",
    )
    ap.add_argument(
        "--report-only", action="store_true", help="tabulate the finished runs, train nothing"
    )
    args = ap.parse_args()
    if not Path(args.root, "ImageSets", "Main", "train.txt").exists():
        raise SystemExit(f"{args.root}: not a VOC2007 folder with ImageSets/Main/train.txt")
    if args.models:
        models = args.models.split(",")
    else:
        out = subprocess.run(
            [sys.executable, "-c", "import mlic; print(','.join(mlic.list_models()))"],
            capture_output=True,
            text=True,
            check=True,
            env=os.environ,
        )
        models = out.stdout.strip().split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = [(m, s) for s in seeds for m in models]  # seed-major: every model once first
    results: dict[str, list[dict[str, float]]] = {}
    t_start = time.perf_counter()
    for i, (model, seed) in enumerate(jobs):
        if args.report_only:
            done = Path(args.out) / f"{model}-{args.backbone}-{args.image_size}-s{seed}/result.json"
            if done.exists():
                results.setdefault(model, []).append({**json.loads(done.read_text()), "seed": seed})
            continue
        elapsed = time.perf_counter() - t_start
        eta = f", about {elapsed / i * (len(jobs) - i) / 60:.0f} min left" if i else ""
        print(f"[{i + 1}/{len(jobs)}] {model} seed {seed}{eta}", flush=True)
        r = {**run_one(model, seed, args), "seed": seed}
        results.setdefault(model, []).append(r)
        print(
            f"    mAP {100 * r['mAP']:.2f}  CF1 {100 * r['CF1']:.2f}  "
            f"{r['s_per_epoch']:.0f} s/epoch",
            flush=True,
        )
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    print()
    print(f"{args.backbone}, {args.image_size} px, {args.epochs} epochs, seeds {args.seeds}")
    print(table(results, args.timing_seed))


if __name__ == "__main__":
    main()
