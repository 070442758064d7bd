"""Suspected label errors from out-of-fold scores: ``mlic data issues`` (issue 33)."""

from __future__ import annotations

import csv
import hashlib
import html
import importlib.util
import logging
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import one_error_line, write_image
from mlic.cli import main
from mlic.data import Annotations
from mlic.data.csv import load_csv
from mlic.engine.folds import OutOfFold
from mlic.label_issues import (
    ISSUES_COLUMNS,
    SUMMARY_COLUMNS,
    IssuesResult,
    rank_label_issues,
    write_fixed,
    write_outputs,
)
from test_train import tiny_overrides

REPO = Path(__file__).resolve().parents[1]


def constructed(n: int = 200, c: int = 4, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Clean targets ``[N, C]``, probabilities that follow them, the given (noisy) targets
    and the mask of flipped entries: positives score 0.6-0.95, negatives 0.02-0.3; a
    dropped positive scores 0.9-0.97 (the model sees the object), an added one 0.01-0.05."""
    rng = np.random.default_rng(seed)
    clean = (rng.random((n, c)) < 0.3).astype(np.int8)
    p = np.where(clean == 1, rng.uniform(0.6, 0.95, (n, c)), rng.uniform(0.02, 0.3, (n, c)))
    flipped = np.zeros((n, c), dtype=bool)
    for col in range(c):
        pos, neg = np.flatnonzero(clean[:, col] == 1), np.flatnonzero(clean[:, col] == 0)
        drop, add = rng.choice(pos, 3, replace=False), rng.choice(neg, 2, replace=False)
        flipped[drop, col] = flipped[add, col] = True
        p[drop, col] = rng.uniform(0.9, 0.97, 3)
        p[add, col] = rng.uniform(0.01, 0.05, 2)
    given = np.where(flipped, 1 - clean, clean).astype(np.int8)
    return clean, p.astype(np.float32), given, flipped


def test_ranking_puts_the_flipped_labels_first() -> None:
    clean, p, given, flipped = constructed()
    issues = rank_label_issues(p, given, ["a", "b", "c", "d"])
    k = int(flipped.sum())  # 20: 12 dropped, 8 added
    top = flipped[issues.row[:k], issues.cls[:k]]
    assert top.all(), "precision@k must be 1 on a clear construction"
    assert len(issues) == k  # and nothing else crosses its class's threshold
    # given/suggested: a dropped positive is suggested back, an added one taken away
    np.testing.assert_array_equal(issues.given, given[issues.row, issues.cls])
    np.testing.assert_array_equal(issues.suggested, clean[issues.row, issues.cls])
    np.testing.assert_array_equal(issues.rank, np.arange(1, k + 1))
    assert (np.diff(issues.score) >= 0).all() and ((issues.score >= 0) & (issues.score <= 1)).all()
    # thresholds: the mean probability of the given positives / negatives of each class
    for col in range(4):
        assert issues.threshold_pos[col] == pytest.approx(p[given[:, col] == 1, col].mean())
        assert issues.threshold_neg[col] == pytest.approx(p[given[:, col] == 0, col].mean())
    row = issues.summary[1]
    assert row["class"] == "b" and row["suspects"] == 5
    assert (row["suspected_missing"], row["suspected_extra"]) == (3, 2)
    assert row["noise_rate_positives"] == pytest.approx(5 / (given[:, 1] == 1).sum())
    assert row["noise_rate_images"] == pytest.approx(5 / 200)


def test_ignored_entries_are_never_listed_and_ties_are_ordered() -> None:
    _, p, given, flipped = constructed()
    given = given.copy()
    r, c = np.argwhere(flipped)[0]
    given[r, c] = -1  # an "ignore" entry: never a suspect, not in the thresholds
    p[5] = np.nan  # an image no fold scored
    issues = rank_label_issues(p, given)
    listed = set(zip(issues.row.tolist(), issues.cls.tolist(), strict=True))
    assert (r, c) not in listed and not any(row == 5 for row, _ in listed)
    assert issues.summary[0]["images"] == 200 - 1 - (given[:, 0] == -1).sum()
    # exact ties: ordered by image row, then class, whatever the input order
    p2 = np.full((6, 2), 0.1, dtype=np.float32)
    y2 = np.zeros((6, 2), dtype=np.int8)
    p2[:3], y2[:3] = 0.9, 1  # positives of both classes
    p2[[4, 5]] = 0.95  # two unlabelled images that score like positives, in both classes
    first = rank_label_issues(p2, y2)
    assert list(zip(first.row.tolist(), first.cls.tolist(), strict=True)) == [
        (4, 0),
        (4, 1),
        (5, 0),
        (5, 1),
    ]
    again = rank_label_issues(p2, y2)
    np.testing.assert_array_equal(first.row, again.row)
    # a class the model did not learn (positives no higher than negatives): no suspects
    flat = rank_label_issues(np.full((6, 2), 0.5, np.float32), y2)
    assert len(flat) == 0


def _split(tmp_path: Path, n: int = 40) -> tuple[Annotations, OutOfFold, np.ndarray]:
    """A 4-class split of real image files (one named like HTML) and constructed scores."""
    _, p, given, flipped = constructed(n=n, seed=1)
    names = ["cat", "<b>", "car", "tree"]
    images = []
    for i in range(n):
        images.append(tmp_path / "imgs" / f"img{i}&.jpg")
        write_image(images[-1], i, size=40)
    ann = Annotations(names=names, images=images, targets=given, source="test")
    oof = OutOfFold(
        scores=p,
        targets=given.copy(),
        fold=np.arange(n) % 2,
        names=names,
        folds=2,
        epochs=1,
    )
    return ann, oof, flipped


def test_issues_csv_summary_and_page(tmp_path: Path) -> None:
    ann, oof, _ = _split(tmp_path)
    names = [p.name for p in ann.images]
    out = tmp_path / "out"
    issues, files = write_outputs(out, oof, ann, names)
    assert len(issues) > 0
    with files["issues.csv"].open(newline="") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == ISSUES_COLUMNS
    body = rows[1:]
    assert [int(r[5]) for r in body] == list(range(1, len(issues) + 1))
    for r in body:
        i = names.index(r[0])
        c = ann.names.index(r[1])
        assert int(r[2]) == ann.targets[i, c] and int(r[3]) == 1 - int(r[2])
        assert float(r[4]) == pytest.approx(
            oof.scores[i, c] if r[2] == "1" else 1 - oof.scores[i, c], abs=1e-5
        )
    with files["summary.csv"].open(newline="") as f:
        summary = list(csv.DictReader(f))
    assert tuple(summary[0]) == SUMMARY_COLUMNS
    assert [s["class"] for s in summary] == ann.names
    assert sum(int(s["suspects"]) for s in summary) == len(issues)
    np.testing.assert_array_equal(np.load(files["oof_scores.npy"]), oof.scores)
    page = files["index.html"].read_text()
    # the class named "<b>" is escaped in the summary table and its section's heading
    assert "<td>&lt;b&gt;</td>" in page and "<h2>&lt;b&gt; <small>" in page
    assert "<td><b></td>" not in page and "<h2><b>" not in page
    assert "http" not in page  # static: no CDN, no remote anything
    top = issues.row[0]
    assert f'src="thumbs/{top}.jpg"' in page and html.escape(names[top]) in page
    thumbs = sorted((out / "thumbs").iterdir())
    assert thumbs and all(t.suffix == ".jpg" for t in thumbs)
    shown_rows = {int(t.stem) for t in thumbs}
    assert shown_rows == {int(r) for r in issues.row}  # few suspects: every one is on the page


def test_write_fixed_flips_exactly_the_top_n(tmp_path: Path) -> None:
    ann, oof, _ = _split(tmp_path)
    names = [f"imgs/{p.name}" for p in ann.images]
    issues, _ = write_outputs(tmp_path / "out", oof, ann, names)
    result = IssuesResult(tmp_path / "out", issues, oof, ann, names, tmp_path, 0.0)
    source = tmp_path / "train.csv"
    source.write_text("image,labels\n")
    for bad, why in [
        (source, "is the input annotation file"),
        (tmp_path / "out" / "issues.csv", "exists"),
    ]:
        with pytest.raises(Exception, match=why):
            write_fixed(bad, result, 3, [source])
    path, n = write_fixed(tmp_path / "fixed.csv", result, 3, [source])
    assert n == 3
    fixed = load_csv(path, tmp_path, class_names=ann.names)
    assert [p.name for p in fixed.images] == [p.name for p in ann.images]
    changed = np.argwhere(fixed.targets != ann.targets)
    assert len(changed) == 3
    assert {tuple(x) for x in changed} == set(zip(issues.row[:3], issues.cls[:3], strict=True))
    # more than there are suspects: all of them
    _, n_all = write_fixed(tmp_path / "fixed2.csv", result, 10_000, [source])
    assert n_all == len(issues)


def _tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def test_cli_end_to_end_resumes_and_never_touches_the_data(
    tiny_voc: Path, tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    over = tiny_overrides(tiny_voc, tmp_path / "runs", "issues", **{"data.calibration": "none"})
    out = tmp_path / "issues"
    before = _tree_hash(tiny_voc)
    argv = [
        "data",
        "issues",
        "demo",
        *over,
        "--folds",
        "2",
        "--fold-epochs",
        "1",
        "--output",
        str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "suspected label errors among 24 training images (2 fold runs of 1 epoch(s)" in printed
    for name in ("issues.csv", "summary.csv", "oof_scores.npy", "index.html"):
        assert (out / name).is_file(), name
    assert np.load(out / "oof_scores.npy").shape == (24, 5)
    with (out / "issues.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert all(r["image"].startswith("JPEGImages/") for r in rows)  # relative to data.root
    assert str(tmp_path) not in (out / "issues.csv").read_text()
    assert _tree_hash(tiny_voc) == before  # the data folder is read, never written
    weights = out / "folds" / "fold-0" / "best.safetensors"
    stamp = weights.stat().st_mtime_ns
    # a second call reads the finished folds instead of training again
    with caplog.at_level(logging.INFO, logger="mlic"):
        assert main(argv) == 0
    assert "fold 1/2: done earlier" in caplog.text and "fold 2/2: done earlier" in caplog.text
    assert "training on the other folds" not in caplog.text
    assert weights.stat().st_mtime_ns == stamp
    capsys.readouterr()
    # other settings in the same folder: refused, not mixed
    other = ["--folds", "3", "--fold-epochs", "1", "--output", str(out)]
    line = one_error_line(["data", "issues", "demo", *over, *other], capsys)
    assert "holds fold runs made with other settings (folds)" in line
    # --write-fixed: never the input annotation file, never an existing file, never the data
    train_txt = tiny_voc / "ImageSets" / "Main" / "train.txt"
    line = one_error_line([*argv, "--write-fixed", str(train_txt), "--top", "2"], capsys)
    assert "is the input annotation file" in line
    line = one_error_line([*argv, "--write-fixed", str(out / "summary.csv"), "--top", "2"], capsys)
    assert "exists" in line
    line = one_error_line([*argv[:-1], str(tiny_voc / "issues")], capsys)
    assert "inside the data folder" in line
    line = one_error_line([*argv[:-1], str(out / "folds" / "fold-0")], capsys)
    assert "is a training run's folder" in line
    assert main([*argv, "--write-fixed", str(tmp_path / "fixed.csv"), "--top", "2"]) == 0
    fixed = load_csv(tmp_path / "fixed.csv", tiny_voc)
    assert len(fixed) == 24 and fixed.images[0].parent.name == "JPEGImages"
    assert _tree_hash(tiny_voc) == before


# ----------------------------------------------------------------------------- benchmark helpers
def _bench():
    spec = importlib.util.spec_from_file_location(
        "bench_label_issues", REPO / "benchmarks/label_issues.py"
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_flips_are_counted_and_seeded() -> None:
    bench = _bench()
    rng = np.random.default_rng(0)
    targets = (rng.random((300, 6)) < 0.2).astype(np.int8)
    targets[0, 0] = -1  # difficult: never flipped
    noisy, dropped, added = bench.flip_labels(targets, drop=0.05, add=0.01, seed=3)
    n_pos, n_neg = int((targets == 1).sum()), int((targets == 0).sum())
    assert dropped.sum() == round(0.05 * n_pos) and added.sum() == round(0.01 * n_neg)
    assert (targets[dropped] == 1).all() and (noisy[dropped] == 0).all()
    assert (targets[added] == 0).all() and (noisy[added] == 1).all()
    assert noisy[0, 0] == -1 and not (dropped | added)[0, 0]
    assert ((noisy != targets) == (dropped | added)).all()
    again = bench.flip_labels(targets, drop=0.05, add=0.01, seed=3)
    np.testing.assert_array_equal(noisy, again[0])
    assert (bench.flip_labels(targets, drop=0.05, add=0.01, seed=4)[0] != noisy).any()
    # precision / recall of the flipped entries among a ranking's top k
    flipped = dropped | added
    cells = np.argwhere(flipped)
    pr = bench.precision_recall(cells[:, 0], cells[:, 1], flipped, k=len(cells))
    assert pr == {"precision": 1.0, "recall": 1.0}
    pr = bench.precision_recall(cells[:2, 0], cells[:2, 1], flipped, k=4)
    assert pr == {"precision": 0.5, "recall": pytest.approx(2 / len(cells))}
