"""Decision-threshold rules compared on photos the rule did not see (issue 28).

Reads finished training runs (``real_voc.py`` or ``--train-demo`` runs): each kept its best
weights' scores on the held-out training images (``best_calib_scores.npy``, the default
calibration source) and on ``val`` (``best_val_scores.npy``). Every rule of
:mod:`mlic.thresholds` is then chosen on calibration scores and judged on val scores it
did not see, from two calibration sources:

* ``holdout``: the run's 10 % of the training split (58 images on the VOC subset);
* ``val-2fold``: half of val, judged on the other half and the other way round (pooled):
  a stand-in for a larger calibration set (a dev split, or out-of-fold scores) of the same
  size as the half.

Reports CF1 / OF1 at val, mean ± std over seeds, per model and rule.

    python benchmarks/thresholds.py --runs /work/bench-runs/thresh --json thresholds.json
    python benchmarks/thresholds.py --train-demo --runs runs/thresh-demo --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np

from mlic.engine.folds import stratified_folds
from mlic.metrics import multilabel_metrics
from mlic.thresholds import choose_thresholds

#: (label, rule, keyword arguments): the rules compared, old and new defaults first
RULES: list[tuple[str, str, dict]] = [
    ("0.5", "fixed", {}),
    ("best_f1 (old)", "best_f1", {}),
    ("best_f1_mid", "best_f1_mid", {}),
    ("global", "global", {}),
    ("shrunk k=3", "shrunk", {"shrink": 3.0}),
    ("shrunk k=10", "shrunk", {"shrink": 10.0}),
    ("shrunk k=30 (default)", "shrunk", {"shrink": 30.0}),
    ("platt", "platt", {}),
]


def judged(cal_s, cal_t, val_s, val_t, rule: str, kw: dict) -> dict[str, float]:
    thr = choose_thresholds(cal_s, cal_t, rule=rule, **kw).thresholds
    m = multilabel_metrics(val_s, val_t, threshold=thr)
    return {"CF1": m["CF1"], "OF1": m["OF1"]}


def cross_fitted(val_s, val_t, rule: str, kw: dict, seed: int) -> dict[str, float]:
    """Thresholds from one half of val applied to the other, both ways; metrics pooled."""
    fold = stratified_folds(val_t, 2, seed)
    thr = np.zeros_like(val_s)  # [N, C]: each image's thresholds come from the other half
    for f in (0, 1):
        fit, use = fold != f, fold == f
        thr[use] = choose_thresholds(val_s[fit], val_t[fit], rule=rule, **kw).thresholds
    pred = (val_s >= thr).astype(np.float64)
    # thresholds differ per image half: compare the predictions, as multilabel_metrics would
    m = multilabel_metrics(pred, val_t, threshold=0.5)
    return {"CF1": m["CF1"], "OF1": m["OF1"]}


def evaluate_run(run: Path) -> dict[str, dict[str, float]]:
    load = lambda name: np.load(run / name, allow_pickle=False)  # noqa: E731
    cal_s, cal_t = load("best_calib_scores.npy"), load("calib_targets.npy")
    val_s, val_t = load("best_val_scores.npy"), load("val_targets.npy")
    seed = int(run.name.rsplit("-s", 1)[-1]) if "-s" in run.name else 0
    out = {}
    for label, rule, kw in RULES:
        out[f"holdout|{label}"] = judged(cal_s, cal_t, val_s, val_t, rule, kw)
        out[f"val-2fold|{label}"] = cross_fitted(val_s, val_t, rule, kw, seed)
    out["_meta"] = {"n_calib": float(len(cal_s)), "n_val": float(len(val_s))}
    return out


def mean_std(values: list[float]) -> str:
    m = sum(values) / len(values)
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0
    return f"{100 * m:.1f} ± {100 * s:.1f}"


def tables(results: dict[str, list[dict]], source: str) -> str:
    """One Markdown table per source: rows models, columns rules, cells CF1 / OF1."""
    head = "| model | " + " | ".join(label for label, _, _ in RULES) + " |"
    lines = [head, "|---|" + "---:|" * len(RULES)]
    for model in sorted(results):
        runs = results[model]
        cells = []
        for label, _, _ in RULES:
            key = f"{source}|{label}"
            cf1 = mean_std([r[key]["CF1"] for r in runs])
            of1 = mean_std([r[key]["OF1"] for r in runs])
            cells.append(f"{cf1} / {of1}")
        lines.append(f"| {model} ({len(runs)}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def wins(results: dict[str, list[dict]], source: str, a: str, b: str) -> str:
    """How often rule ``a`` is at least as good as rule ``b`` (runs, per metric)."""
    n = ge_c = ge_o = 0
    for runs in results.values():
        for r in runs:
            n += 1
            ge_c += r[f"{source}|{a}"]["CF1"] >= r[f"{source}|{b}"]["CF1"] - 1e-12
            ge_o += r[f"{source}|{a}"]["OF1"] >= r[f"{source}|{b}"]["OF1"] - 1e-12
    return f"{a} >= {b}: CF1 in {ge_c}/{n} runs, OF1 in {ge_o}/{n}"


def deltas(results: dict[str, list[dict]], source: str, rule: str) -> str:
    """Per model: ``rule`` minus 0.5, global and the old rule, paired by seed (mean ± std of the
    per-seed differences, points of CF1 / OF1); a mean below minus its spread is a loss."""
    others = ("0.5", "global", "best_f1 (old)")
    lines = [f"| model | {rule} - " + " | - ".join(others) + " |", "|---|" + "---:|" * 3]
    for model in sorted(results):
        cells = []
        for other in others:
            parts = []
            for metric in ("CF1", "OF1"):
                d = [
                    r[f"{source}|{rule}"][metric] - r[f"{source}|{other}"][metric]
                    for r in results[model]
                ]
                parts.append(mean_std(d).replace(" ± ", "±"))
            cells.append(" / ".join(parts))
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def train_demo(args: argparse.Namespace) -> None:
    """Every model's demo recipe on the generated demo set, one process per run."""
    models = args.models.split(",")
    for seed in [int(s) for s in args.seeds.split(",")]:
        for model in models:
            name = f"{model}-demo-s{seed}"
            if (Path(args.runs) / name / "report.md").exists():
                continue
            recipe = "demo" if model == "baseline" else f"{model}_demo"
            cmd = [
                sys.executable,
                "-m",
                "mlic",
                "train",
                recipe,
                f"train.seed={seed}",
                f"run.output_dir={args.runs}",
                f"run.name={name}",
                "run.overwrite=true",
                "run.progress=false",
                "run.tensorboard=false",
                *args.set,
            ]
            print(name, flush=True)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", required=True, help="folder of finished run folders")
    ap.add_argument("--json", help="write every run's figures here")
    ap.add_argument("--train-demo", action="store_true", help="first train the demo-set runs")
    ap.add_argument(
        "--models", default="baseline,csra,msformer,aamn,ssgrl,mgsgn,attn_gcn,mlgcn,q2l"
    )
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument(
        "--default",
        default="shrunk k=30 (default)",
        help="rules (labels) to compare with the others",
    )
    ap.add_argument("--set", nargs="*", default=[], help="overrides for --train-demo runs")
    args = ap.parse_args()
    if args.train_demo:
        train_demo(args)
    results: dict[str, list[dict]] = {}
    for run in sorted(Path(args.runs).iterdir()):
        if (run / "report.md").exists() and (run / "best_calib_scores.npy").exists():  # finished
            model = run.name.split("-")[0]
            results.setdefault(model, []).append(evaluate_run(run))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    for source in ("holdout", "val-2fold"):
        print(f"\n### calibration source: {source}\n")
        print(tables(results, source))
        for rule in args.default.split(","):
            print(f"\n{rule}, paired differences (points):\n")
            print(deltas(results, source, rule))


if __name__ == "__main__":
    main()
