"""Decision thresholds calibrated at training time on data that is not the evaluation split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import mlic
from mlic.data import Annotations
from mlic.engine.calibration import calibrated_metrics, split_calibration
from mlic.engine.trainer import train
from mlic.errors import DataError
from mlic.metrics import best_f1_thresholds, multilabel_metrics
from mlic.thresholds import DEFAULT_SHRINK, choose_thresholds
from test_train import read_metrics, tiny_cfg


def annotations(n: int) -> Annotations:
    rng = np.random.default_rng(0)
    return Annotations(
        names=["a", "b"],
        images=[Path(f"img{i}.jpg") for i in range(n)],
        targets=(rng.random((n, 2)) < 0.5).astype(np.int8),
        source="test",
    )


def test_holdout_is_seeded_disjoint_and_sized() -> None:
    ann = annotations(100)
    kept, plan = split_calibration(ann, "holdout", 0.1, seed=3)
    assert plan.mode == "holdout" and len(plan.holdout) == 10 and len(kept) == 90
    held = {str(p) for p in plan.holdout.images}
    assert held.isdisjoint(str(p) for p in kept.images)
    assert held | {str(p) for p in kept.images} == {str(p) for p in ann.images}
    # the same seed holds out the same images (resume, every DDP rank); another seed others
    assert held == {str(p) for p in split_calibration(ann, "holdout", 0.1, 3)[1].holdout.images}
    assert held != {str(p) for p in split_calibration(ann, "holdout", 0.1, 4)[1].holdout.images}
    assert "10 held-out training images" in plan.source
    # the rows of the targets travel with their images
    idx = [int(p.stem[3:]) for p in plan.holdout.images]
    np.testing.assert_array_equal(plan.holdout.targets, ann.targets[idx])


def test_other_modes_and_too_small_splits() -> None:
    ann = annotations(5)
    kept, plan = split_calibration(ann, "val", 0.1, 0)
    assert kept is ann and plan.holdout is None and "validation split" in plan.source
    kept, plan = split_calibration(ann, "none", 0.1, 0)
    assert kept is ann and plan.mode == "none"
    with pytest.raises(DataError, match="1 training image.*data.calibration=none"):
        split_calibration(annotations(1), "holdout", 0.1, 0)


def test_calibrated_metrics_use_thresholds_from_the_calibration_data() -> None:
    rng = np.random.default_rng(1)
    cal_t = (rng.random((50, 3)) < 0.4).astype(np.int8)
    cal_s = np.clip(cal_t * 0.3 + rng.random((50, 3)) * 0.5, 0, 1)
    val_t = (rng.random((40, 3)) < 0.4).astype(np.int8)
    val_s = np.clip(val_t * 0.3 + rng.random((40, 3)) * 0.5, 0, 1)
    choice, cal = calibrated_metrics(cal_s, cal_t, val_s, val_t)
    np.testing.assert_array_equal(choice.thresholds, choose_thresholds(cal_s, cal_t).thresholds)
    assert choice.rule == "shrunk"  # the default rule
    old, _ = calibrated_metrics(cal_s, cal_t, val_s, val_t, {"rule": "best_f1"})
    np.testing.assert_array_equal(old.thresholds, best_f1_thresholds(cal_s, cal_t))
    thr = choice.thresholds
    expected = multilabel_metrics(val_s, val_t, threshold=thr)
    assert "cal_mAP" not in cal
    assert cal["cal_CF1"] == pytest.approx(expected["CF1"])
    assert cal["cal_OF1"] == pytest.approx(expected["OF1"])


def test_training_stores_calibrated_thresholds_and_reports_both(
    tiny_voc: Path, tmp_path: Path
) -> None:
    over = {"data.calibration_fraction": "0.25", "thresholds.per_class.cat": "recall:0.9"}
    cfg = tiny_cfg(tiny_voc, tmp_path, "cal", **over)
    train(cfg)
    run = tmp_path / "cal"
    rows = read_metrics(run)
    assert {"cal_CF1", "cal_OF1", "ema_cal_CF1"} <= set(rows[0])
    meta = mlic.engine.checkpoint.read_metadata(run / "best.safetensors")
    assert len(meta["thresholds"]) == 5
    assert meta["thresholds_from"].startswith("6 held-out training images (25 % of 24")
    assert meta["threshold_rule"] == f"shrunk (shrink {DEFAULT_SHRINK:g})"
    assert meta["threshold_objective"] == "f1"
    assert meta["threshold_objective_per_class"] == {"cat": "recall:0.9"}
    held = np.load(run / "calib_targets.npy")
    assert meta["threshold_n_pos"] == [int(n) for n in (held == 1).sum(axis=0)]
    # too few held-out positives for any class of 6 images: all take the global threshold
    assert meta["threshold_fallback"] == [n < 3 for n in meta["threshold_n_pos"]]
    report = (run / "report.md").read_text()
    # the thresholds users get come first, then 0.5
    users = report.index("At the per-class thresholds `mlic predict` and `serve` use")
    assert users < report.index("At threshold 0.5")
    assert "chosen on 6 held-out training images" in report
    assert "| class | threshold | calibration positives |" in report
    # predict uses them by default
    predictor = mlic.Predictor.from_checkpoint(run / "best.safetensors")
    np.testing.assert_allclose(predictor.thresholds, meta["thresholds"], rtol=1e-6)


def test_calibration_off_stores_no_thresholds(tiny_voc: Path, tmp_path: Path) -> None:
    train(
        tiny_cfg(tiny_voc, tmp_path, "nocal", **{"data.calibration": "none", "train.epochs": "1"})
    )
    meta = mlic.engine.checkpoint.read_metadata(tmp_path / "nocal" / "best.safetensors")
    assert "thresholds" not in meta
    assert "cal_CF1" not in read_metrics(tmp_path / "nocal")[0]
