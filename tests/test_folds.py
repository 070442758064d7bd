"""Out-of-fold scores over a whole training split (issue 28 item 2; reused by issue 33)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import mlic
from mlic.config import load_config
from mlic.data.dataset import load_split
from mlic.engine.folds import out_of_fold_scores, stratified_folds
from mlic.engine.trainer import TrainingStopped, train
from mlic.errors import ConfigError, DataError
from test_train import tiny_cfg, tiny_overrides


def test_folds_cover_every_image_once_and_are_stratified() -> None:
    rng = np.random.default_rng(0)
    n, c, k = 300, 6, 5
    rates = np.array([0.5, 0.2, 0.1, 0.05, 0.03, 0.02])  # rare classes: 15, 9, 6 positives
    targets = (rng.random((n, c)) < rates).astype(np.int8)
    fold = stratified_folds(targets, k, seed=0)
    assert fold.shape == (n,) and set(fold) == set(range(k))  # every row in exactly one fold
    sizes = np.bincount(fold, minlength=k)
    assert sizes.max() - sizes.min() <= 0.1 * n / k
    per_fold = np.stack([targets[fold == f].sum(axis=0) for f in range(k)])  # [k, C]
    # each class's positives are dealt evenly: at most one apart between folds
    assert (per_fold.max(axis=0) - per_fold.min(axis=0) <= 1).all(), per_fold
    # a plain random split is not that even on the rare classes (why stratify)
    shuffled = rng.permutation(np.arange(n) % k)
    rand = np.stack([targets[shuffled == f].sum(axis=0) for f in range(k)])
    assert (rand.max(axis=0) - rand.min(axis=0)).sum() > (
        per_fold.max(axis=0) - per_fold.min(axis=0)
    ).sum()
    # seeded: the same folds again, other folds with another seed
    np.testing.assert_array_equal(fold, stratified_folds(targets, k, seed=0))
    assert (fold != stratified_folds(targets, k, seed=1)).any()
    with pytest.raises(DataError, match="3 training image.*5 folds"):
        stratified_folds(targets[:3], 5, seed=0)


def test_fold_keys_are_checked() -> None:
    with pytest.raises(ConfigError, match="data.folds and data.fold"):
        load_config(None, ["data.folds=3"])
    with pytest.raises(ConfigError, match="data.fold=3 of data.folds=3"):
        load_config(None, ["data.folds=3", "data.fold=3"])
    with pytest.raises(ConfigError, match="data.calibration=none"):
        load_config(None, ["data.folds=3", "data.fold=0", "data.calibration=holdout"])


def _oof_cfg(voc: Path, out: Path) -> Any:
    return tiny_cfg(voc, out, "main", **{"train.epochs": "1", "data.calibration": "none"})


def test_out_of_fold_scores_score_every_training_image_once(tiny_voc: Path, tmp_path: Path) -> None:
    cfg = _oof_cfg(tiny_voc, tmp_path)
    oof = out_of_fold_scores(cfg, tmp_path / "folds", train, folds=3)
    train_ann = load_split(cfg.data, "train")
    assert oof.scores.shape == (len(train_ann), 5) and oof.scored.all()
    assert not np.isnan(oof.scores).any()
    assert sorted(np.bincount(oof.fold)) == sorted(
        np.bincount(stratified_folds(train_ann.targets, 3, cfg.train.seed))
    )
    # the targets travel with their rows, and each fold's scores are its model's
    np.testing.assert_array_equal(oof.targets, train_ann.targets)
    for i in range(3):
        run = tmp_path / "folds" / f"fold-{i}"
        np.testing.assert_allclose(
            oof.scores[oof.fold == i], np.load(run / "best_val_scores.npy"), rtol=0
        )
        # trained on the other folds only: never on the images it scored
        rows = (run / "metrics.csv").read_text().splitlines()[1:]
        assert len(rows) == 1  # one evaluation, at the last epoch: no epoch chosen on the fold
    assert oof.names == train_ann.names


def test_out_of_fold_scores_resume_after_a_stop_between_and_inside_folds(
    tiny_voc: Path, tmp_path: Path
) -> None:
    cfg = _oof_cfg(tiny_voc, tmp_path)
    calls: list[str] = []

    def stop_in_fold_1(c: Any, resume: Any = None) -> dict[str, Any]:
        name = Path(resume).name if resume else c.run.name
        calls.append(f"{'resume' if resume else 'train'} {name}")
        if name == "fold-1":  # killed part-way through fold 1's epoch
            return train(c, stop_after_steps=1)
        return train(c, resume=resume) if resume else train(c)

    with pytest.raises(TrainingStopped):
        out_of_fold_scores(cfg, tmp_path / "folds", stop_in_fold_1, folds=3)
    assert calls == ["train fold-0", "train fold-1"]
    assert (tmp_path / "folds" / "fold-1" / "last.resume.pt").exists()
    calls.clear()

    def record(c: Any, resume: Any = None) -> dict[str, Any]:
        calls.append(
            f"{'resume' if resume else 'train'} {Path(resume).name if resume else c.run.name}"
        )
        return train(c, resume=resume) if resume else train(c)

    oof = out_of_fold_scores(cfg, tmp_path / "folds", record, folds=3)
    # fold 0 is read, fold 1 resumes where it stopped, fold 2 trains
    assert calls == ["resume fold-1", "train fold-2"]
    assert oof.scored.all()
    calls.clear()
    out_of_fold_scores(cfg, tmp_path / "folds", record, folds=3)
    assert calls == []  # all done: nothing trains again


def test_training_calibrates_on_out_of_fold_scores(tiny_voc: Path, tmp_path: Path) -> None:
    over = {"train.epochs": "1", "data.calibration": "oof", "data.calibration_folds": "2"}
    result = train(load_config(None, tiny_overrides(tiny_voc, tmp_path, "oof", **over)))
    run = Path(result["run_dir"])
    assert sorted(p.name for p in (run / "folds").iterdir()) == ["fold-0", "fold-1"]
    meta = mlic.engine.checkpoint.read_metadata(run / "best.safetensors")
    assert meta["thresholds_from"].startswith("out-of-fold scores of 24 training images")
    train_ann = load_split(load_config(run / "config.yaml").data, "train")
    # every training image was calibrated on, and every one was trained on by the run itself
    assert meta["threshold_n_pos"] == [int(n) for n in (train_ann.targets == 1).sum(axis=0)]
    rows = (run / "metrics.csv").read_text().splitlines()
    assert "cal_CF1" in rows[0] and "holdout_mAP" not in rows[0]  # nothing was held out
