"""Train every registered model on the demo set with the same backbone and budget; print a table.

Each model runs its shipped ``<model>_demo.yaml`` recipe (``demo.yaml`` for the baseline):
ImageNet-pretrained EfficientNet-Lite0 (offline weights), 192 px, batch 32, the same
epochs and seed. The table reports the best validation epoch (model or EMA weights,
whichever is better), as ``mlic train`` selects ``best.safetensors``.

    python benchmarks/demo_models.py [--epochs N] [--models a,b] [--out runs/bench-demo]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from real_voc import best_epoch as best_row  # same selection: model or EMA, best mAP

from mlic.cli import resolve_config_path
from mlic.config import load_config
from mlic.engine.trainer import train
from mlic.models import list_models


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, help="override every recipe's epochs")
    ap.add_argument("--models", help="comma-separated subset")
    ap.add_argument("--out", default="runs/bench-demo")
    args = ap.parse_args()
    names = args.models.split(",") if args.models else list_models()
    results = {}
    for name in names:
        recipe = "demo" if name == "baseline" else f"{name}_demo"
        over = [f"run.output_dir={args.out}", f"run.name={name}", "run.progress=false"]
        if args.epochs:
            over.append(f"train.epochs={args.epochs}")
        cfg = load_config(resolve_config_path(recipe), over)
        t0 = time.perf_counter()
        train(cfg)
        results[name] = {**best_row(Path(args.out) / name), "wall_s": time.perf_counter() - t0}
        print(name, results[name], flush=True)
    print("\n| model | mAP | CF1 | OF1 | best epoch | train s/epoch |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        tag = " (EMA)" if r["ema"] else ""
        print(
            f"| {name} | {100 * r['mAP']:.2f} | {100 * r['CF1']:.2f} | {100 * r['OF1']:.2f} | "
            f"{r['epoch']}{tag} | {r['s_per_epoch']:.0f} |"
        )


if __name__ == "__main__":
    main()
