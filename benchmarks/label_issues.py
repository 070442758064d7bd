"""Does ``mlic data issues`` find wrong labels? Seeded label noise on real VOC 2007 (issue 33).

Per seed, on the official ``train`` list of a VOC 2007 folder (by default the 579-image real
subset in ``../shared/realdata``):

1. Flip a known set of labels: drop ``--drop`` (5 %) of the positive (image, class) labels
   and add ``--add`` (1 %) of the negatives as false positives (VOC "difficult" entries are
   never flipped). The noisy labels are written as an mlic CSV copy of the annotations
   (image names relative to ``JPEGImages``, which ``data.train_images`` points at: no image
   is copied); ``val`` is written as a CSV too (difficult-only objects: absent, in both).
2. Run ``mlic data issues`` on the noisy CSV (``--folds`` K fold runs of ``--fold-epochs``),
   with ``--write-fixed`` flipping the top N suspects, N = the number of flipped labels.
3. Precision and recall of the flipped labels among the top k (k = N and 2N) of: the
   out-of-fold confident-learning ranking, a random ranking, and a ranking by plain model
   error (``|given - p|``, descending) on the same out-of-fold scores.
4. Retrain on the noisy labels, the corrected labels and the original labels (reference);
   report val mAP of each (best epoch over the model and its EMA).
5. List the top 20 suspects among the *original* (unflipped) labels, to be looked at.

    python benchmarks/label_issues.py --seeds 0,1,2 --folds 5 --epochs 6 --image-size 224 \\
        --model baseline --out runs/label-issues --json label_issues.json

Every piece writes its result beside it under ``--out``; a finished piece is read, not
repeated, and an interrupted ``mlic data issues`` resumes its fold runs, so an interrupted
benchmark continues where it stopped. ``PYTHONPATH`` is passed on to the runs.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_ROOT = (
    Path(__file__).resolve().parents[1].parent
    / "shared/realdata/voc2007-trainval-subset/VOCdevkit/VOC2007"
)


# ----------------------------------------------------------------------------- pure helpers
def flip_labels(
    targets: np.ndarray, drop: float, add: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(noisy [N, C], dropped [N, C] bool, added [N, C] bool)``: ``round(drop x positives)``
    positive entries set to 0 and ``round(add x negatives)`` negative entries set to 1, drawn
    uniformly with ``seed``; -1 (ignore) entries are never touched."""
    targets = np.asarray(targets, dtype=np.int8)
    rng = np.random.default_rng([seed, 0x1AB])
    pos, neg = np.flatnonzero(targets.ravel() == 1), np.flatnonzero(targets.ravel() == 0)
    drop_at = rng.choice(pos, round(drop * len(pos)), replace=False)
    add_at = rng.choice(neg, round(add * len(neg)), replace=False)
    dropped = np.zeros(targets.size, dtype=bool)
    added = np.zeros(targets.size, dtype=bool)
    dropped[drop_at], added[add_at] = True, True
    noisy = targets.ravel().copy()
    noisy[drop_at], noisy[add_at] = 0, 1
    shape = targets.shape
    return noisy.reshape(shape), dropped.reshape(shape), added.reshape(shape)


def precision_recall(
    rows: np.ndarray, cols: np.ndarray, flipped: np.ndarray, k: int
) -> dict[str, float]:
    """Of a ranking (entries ``rows[i], cols[i]``, most suspect first), the flipped entries
    among its first ``k``: precision = hits / k (a ranking shorter than k misses the rest),
    recall = hits / all flipped."""
    hits = int(flipped[np.asarray(rows[:k], int), np.asarray(cols[:k], int)].sum())
    return {"precision": hits / k if k else 0.0, "recall": hits / max(int(flipped.sum()), 1)}


def error_ranking(scores: np.ndarray, given: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every scored entry (given 0/1) by plain model error ``|given - p|``, largest first;
    ties by row, then class."""
    valid = np.isfinite(scores) & ((given == 0) | (given == 1))
    rows, cols = np.nonzero(valid)
    err = np.abs(given[rows, cols] - scores[rows, cols])
    order = np.lexsort((cols, rows, -err))
    return rows[order], cols[order]


def random_ranking(given: np.ndarray, scores: np.ndarray, seed: int) -> tuple[np.ndarray, ...]:
    """Every scored entry in a seeded random order."""
    rows, cols = np.nonzero(np.isfinite(scores) & ((given == 0) | (given == 1)))
    order = np.random.default_rng([seed, 0x5A5]).permutation(len(rows))
    return rows[order], cols[order]


def write_label_csv(path: Path, names: list[str], targets: np.ndarray, classes: list[str]) -> None:
    """An mlic CSV (``image,labels``): 1 = present; 0 and -1 = absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["image", "labels"])
        for name, row in zip(names, targets, strict=True):
            w.writerow([name, ";".join(classes[c] for c in np.flatnonzero(row == 1))])


def summarise(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


# ----------------------------------------------------------------------------- pieces
def _common(args: argparse.Namespace, labels: Path, seed: int) -> list[str]:
    jpeg = Path(args.root).resolve() / "JPEGImages"
    return [
        "data.format=csv",
        f"data.root={labels}",
        "data.val=val.csv",
        f"data.train_images={jpeg}",
        f"data.val_images={jpeg}",
        f"data.image_size={args.image_size}",
        f"model.name={args.model}",
        f"model.backbone={args.backbone}",
        f"train.epochs={args.epochs}",
        f"train.seed={seed}",
        "run.progress=false",
        "run.tensorboard=false",
        *args.set,
    ]


def _run(cmd: list[str], tag: str, log: Path) -> float:
    """Run ``cmd``; its output goes to ``log``, its key lines to the screen; wall seconds."""
    t0 = time.perf_counter()
    with log.open("a") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            f.write(line)
            if line.startswith(("fold", "best", "mlic: error", "Traceback")) or "suspected" in line:
                print(f"    [{tag}] {line.rstrip()}", flush=True)
    if proc.wait() != 0:
        raise SystemExit(f"{tag}: failed (exit {proc.returncode}); see {log}")
    return time.perf_counter() - t0


def prepare_labels(args: argparse.Namespace, seed: int, folder: Path) -> dict[str, Any]:
    """The noisy, clean and val CSVs of a seed, and which entries were flipped."""
    from mlic.data.csv import load_csv
    from mlic.data.voc import load_voc

    done = folder / "flips.npz"
    if not done.exists():
        train, val = load_voc(args.root, "train"), load_voc(args.root, "val")
        noisy, dropped, added = flip_labels(train.targets, args.drop, args.add, seed)
        names = [p.name for p in train.images]
        write_label_csv(folder / "noisy_train.csv", names, noisy, train.names)
        write_label_csv(folder / "clean_train.csv", names, train.targets, train.names)
        write_label_csv(folder / "val.csv", [p.name for p in val.images], val.targets, val.names)
        np.savez(folder / "flips.npz", dropped=dropped, added=added, classes=np.array(train.names))
    flips = np.load(done)
    noisy = load_csv(folder / "noisy_train.csv", Path(args.root) / "JPEGImages")
    order = [list(flips["classes"]).index(n) for n in noisy.names]  # CSV columns: sorted names
    return {
        "noisy": noisy,
        "dropped": flips["dropped"][:, order],
        "added": flips["added"][:, order],
    }


def find_issues(args: argparse.Namespace, seed: int, base: Path, n_flipped: int) -> dict[str, Any]:
    """``mlic data issues`` on the noisy labels (resumes its folds), writing fixed_train.csv."""
    done = base / "issues.json"
    if done.exists():
        return json.loads(done.read_text())
    labels, out = base / "labels", base / "issues"
    fixed = labels / "fixed_train.csv"
    fixed.unlink(missing_ok=True)  # an earlier attempt's: the command writes only new files
    cmd = [
        *(sys.executable, "-m", "mlic", "data", "issues", args.recipe or f"{args.model}_demo"),
        *_common(args, labels.resolve(), seed),
        "data.train=noisy_train.csv",
        f"run.output_dir={base / 'runs'}",
        *("--folds", str(args.folds), "--fold-epochs", str(args.fold_epochs or args.epochs)),
        *("--output", str(out), "--write-fixed", str(fixed), "--top", str(n_flipped)),
    ]
    wall = _run(cmd, f"s{seed} issues", base / "issues.log")
    fold_s = 0.0
    for i in range(args.folds):
        with (out / "folds" / f"fold-{i}" / "metrics.csv").open() as f:
            fold_s += sum(float(r["epoch_time_s"]) for r in csv.DictReader(f))
    result = {"wall_s": wall, "fold_train_s": fold_s}
    done.write_text(json.dumps(result, indent=1))
    return result


def best_map(run: Path) -> float:
    """The run's best val mAP over its epochs, the model or its EMA (as mlic selects)."""
    with (run / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    return max(float(r[k]) for r in rows for k in ("mAP", "ema_mAP") if r.get(k))


def retrain(args: argparse.Namespace, seed: int, base: Path, which: str) -> float:
    """Train on ``{which}_train.csv`` (noisy, fixed, clean); its best val mAP."""
    done = base / f"train-{which}.json"
    if done.exists():
        return json.loads(done.read_text())["mAP"]
    run = base / "runs" / f"train-{which}"
    if run.exists():  # an interrupted earlier attempt: this benchmark owns --out
        shutil.rmtree(run)
    cmd = [
        *(sys.executable, "-m", "mlic", "train", args.recipe or f"{args.model}_demo"),
        *_common(args, (base / "labels").resolve(), seed),
        f"data.train={which}_train.csv",
        f"run.output_dir={base / 'runs'}",
        f"run.name=train-{which}",
    ]
    _run(cmd, f"s{seed} {which}", base / f"train-{which}.log")
    m = best_map(run)
    done.write_text(json.dumps({"mAP": m}, indent=1))
    return m


# ----------------------------------------------------------------------------- one seed
def measure_rankings(
    labels: dict[str, Any], scores: np.ndarray, seed: int
) -> tuple[dict[str, Any], Any]:
    """Precision/recall at k = N and 2N of the three rankings; and the CL ranking."""
    from mlic.label_issues import rank_label_issues

    noisy = labels["noisy"]
    flipped = labels["dropped"] | labels["added"]
    n = int(flipped.sum())
    issues = rank_label_issues(scores, noisy.targets, noisy.names)
    rankings = {
        "confident_learning": (issues.row, issues.cls),
        "model_error": error_ranking(scores, noisy.targets),
        "random": random_ranking(noisy.targets, scores, seed),
    }
    out: dict[str, Any] = {
        "flipped": n,
        "dropped": int(labels["dropped"].sum()),
        "suspects": len(issues),
    }
    for name, (rows, cols) in rankings.items():
        for mult in (1, 2):
            pr = precision_recall(rows, cols, flipped, mult * n)
            out[f"{name}@{mult}N"] = pr
    # of the dropped and added ones separately, at k = N (CL)
    for kind in ("dropped", "added"):
        out[f"confident_learning_recall_{kind}@1N"] = precision_recall(
            issues.row, issues.cls, labels[kind], n
        )["recall"]
    return out, issues


def original_suspects(labels: dict[str, Any], issues: Any, top: int = 20) -> list[dict[str, Any]]:
    """The most suspect entries that were not flipped: the original VOC labels in question."""
    flipped = labels["dropped"] | labels["added"]
    noisy = labels["noisy"]
    rows = []
    for r, c, g, q in zip(issues.row, issues.cls, issues.given, issues.score, strict=True):
        if flipped[r, c]:
            continue
        rows.append(
            {
                "image": noisy.images[r].name,
                "class": noisy.names[c],
                "given": int(g),
                "score": round(float(q), 4),
            }
        )
        if len(rows) == top:
            break
    return rows


def run_seed(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    base = Path(args.out) / f"seed-{seed}"
    done = base / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    labels = prepare_labels(args, seed, base / "labels")
    n = int((labels["dropped"] | labels["added"]).sum())
    cost = find_issues(args, seed, base, n)
    scores = np.load(base / "issues" / "oof_scores.npy")
    result, issues = measure_rankings(labels, scores, seed)
    result["cost"] = cost
    result["mAP"] = {w: retrain(args, seed, base, w) for w in ("noisy", "fixed", "clean")}
    result["original_suspects"] = original_suspects(labels, issues)
    result["seed"] = seed
    done.write_text(json.dumps(result, indent=1))
    return result


def report(results: list[dict[str, Any]]) -> str:
    """Markdown: precision/recall per ranking (mean ± std over seeds, %), mAPs, cost."""

    def cell(values: list[float]) -> str:
        mean, std = summarise([100 * v for v in values])
        return f"{mean:.1f} ± {std:.1f}" if len(values) > 1 else f"{mean:.1f}"

    lines = [
        f"{len(results)} seed(s); {results[0]['flipped']} flipped labels per seed "
        f"({results[0]['dropped']} dropped positives), "
        f"{cell([r['suspects'] / 100 for r in results])} suspects",
        "",
        "| ranking | P@N | R@N | P@2N | R@2N |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in ("confident_learning", "model_error", "random"):
        cells = [
            cell([r[f"{name}@{m}N"][key] for r in results])
            for m in (1, 2)
            for key in ("precision", "recall")
        ]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    lines += ["", "| trained on | val mAP |", "|---|---:|"]
    for which in ("noisy", "fixed", "clean"):
        lines.append(f"| {which} labels | {cell([r['mAP'][which] for r in results])} |")
    fold_s = summarise([r["cost"]["fold_train_s"] for r in results])[0]
    wall = summarise([r["cost"]["wall_s"] for r in results])[0]
    lines += ["", f"cost: {fold_s:.0f} s of fold training, {wall:.0f} s wall per seed"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(DEFAULT_ROOT), help="the VOC2007 folder")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=6, help="epochs of the retrainings")
    ap.add_argument("--fold-epochs", type=int, help="epochs per fold run (default: --epochs)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--model", default="baseline")
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    ap.add_argument("--recipe", help="config to start from (default: <model>_demo)")
    ap.add_argument("--drop", type=float, default=0.05, help="fraction of positives dropped")
    ap.add_argument("--add", type=float, default=0.01, help="fraction of negatives added")
    ap.add_argument("--out", default="runs/label-issues")
    ap.add_argument("--json", help="also write every seed's result here")
    ap.add_argument("--set", nargs="*", default=[], help="extra key=value overrides for every run")
    args = ap.parse_args()
    if not Path(args.root, "ImageSets", "Main", "train.txt").exists():
        raise SystemExit(f"{args.root}: not a VOC2007 folder with ImageSets/Main/train.txt")
    results = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        print(f"seed {seed}", flush=True)
        results.append(run_seed(args, seed))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    print()
    print(
        f"{args.model}/{args.backbone}, {args.image_size} px, {args.folds} folds x "
        f"{args.fold_epochs or args.epochs} epochs, retrain {args.epochs} epochs"
    )
    print(report(results))
    print(f"\ntop suspects among the original labels (seed {results[0]['seed']}):")
    for s in results[0]["original_suspects"]:
        kind = "missing" if s["given"] == 0 else "extra"
        print(f"  {s['score']:.3f}  {kind:<8} {s['class']:<12} {s['image']}")


if __name__ == "__main__":
    main()
