"""Where a run's per-class decision thresholds are calibrated: data that is not trained on.

Sigmoid scores of a multi-label model are not calibrated across classes: with ASL or on
rare classes, 0.5 predicts far too many (or too few) labels. mAP does not care, but a user
reading the predicted labels does. Training therefore chooses per-class thresholds on
*calibration* scores by ``thresholds.rule`` (:mod:`mlic.thresholds`) and stores them in the
checkpoint, where ``predict``, ``eval``, ``export``, ``serve`` and the report use them. The
calibration data (``data.calibration``) is

* ``holdout`` (default): ``data.calibration_fraction`` of the training split, drawn with the
  run's seed and kept out of training (and out of the label statistics),
* ``val``: the validation split itself, for runs whose val split is not the split they
  report on (or that accept in-sample threshold figures on it), or
* ``oof``: every training image's out-of-fold score from short fold runs
  (:mod:`mlic.engine.folds`); the run itself then trains on the whole split.

Metrics at the calibrated thresholds are reported beside those at 0.5 (the papers'
convention) with the prefix ``cal_``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mlic.config import Config, to_dict
from mlic.data import Annotations
from mlic.errors import DataError
from mlic.metrics import multilabel_metrics
from mlic.thresholds import ThresholdChoice, choose_thresholds

__all__ = [
    "CalibrationPlan",
    "split_calibration",
    "stream_calibration",
    "calibrated_metrics",
    "metrics_at",
    "threshold_rule",
]


@dataclass
class CalibrationPlan:
    """Where a run's thresholds come from.

    Attributes:
        mode: ``holdout``, ``val`` or ``none`` (``data.calibration``).
        holdout: the held-out training images (``holdout`` mode only).
        source: a one-line description stored in the checkpoint as ``thresholds_from``.
    """

    mode: str
    holdout: Annotations | None = None
    source: str = ""
    # ``oof`` mode: chosen once on the fixed out-of-fold scores, the same at every epoch
    choice: ThresholdChoice | None = None


def split_calibration(
    train: Annotations, mode: str, fraction: float, seed: int
) -> tuple[Annotations, CalibrationPlan]:
    """``(training images, plan)``: in ``holdout`` mode, a seeded draw of ``fraction`` of
    ``train`` (at least one image) is moved out of it into the plan.

    The draw depends only on ``seed`` and the split's size, so a resumed or distributed run
    holds out the same images. The rest keep their order.
    """
    if mode == "none":
        return train, CalibrationPlan("none", source="none (threshold 0.5)")
    if mode == "val":
        return train, CalibrationPlan("val", source="the validation split (data.calibration=val)")
    if mode == "oof":  # the scores come from the fold runs (trainer); all images train
        return train, CalibrationPlan("oof")
    n = len(train)
    k = max(1, round(fraction * n))
    if n - k < 1:
        raise DataError(
            f"{train.source}: {n} training image(s) cannot spare {k} for threshold calibration; "
            "add images or set data.calibration=none"
        )
    rng = np.random.default_rng([seed, 0xCA1])
    held = np.sort(rng.permutation(n)[:k])
    keep = np.setdiff1d(np.arange(n), held)
    kept, holdout = train.subset(keep), train.subset(held)
    kept.warnings = list(train.warnings)
    source = (
        f"{k} held-out training images ({100 * fraction:.0f} % of {n}, "
        f"data.calibration_fraction={fraction})"
    )
    return kept, CalibrationPlan("holdout", holdout=holdout, source=source)


def stream_calibration(mode: str) -> CalibrationPlan:
    """The plan for streamed sources (WebDataset shards, Hugging Face datasets), which cannot
    hold images out of a split they only stream: ``val`` works as for files; ``holdout``
    falls back to none (pack a calibration split and use it as val, with
    ``data.calibration=val``)."""
    if mode == "val":
        return CalibrationPlan("val", source="the validation split (data.calibration=val)")
    return CalibrationPlan(
        "none",
        source="none (streamed data cannot hold images out; use data.calibration=val on a "
        "split that is not the reported one)",
    )


def threshold_rule(cfg: Config, names: list[str]) -> dict[str, Any]:
    """The ``thresholds`` config section as keyword arguments of
    :func:`mlic.thresholds.choose_thresholds`, with the class names its per-class objectives
    refer to."""
    return {**to_dict(cfg.thresholds), "names": list(names)}


def calibrated_metrics(
    calib_scores: np.ndarray,
    calib_targets: np.ndarray,
    scores: np.ndarray,
    targets: np.ndarray,
    rule: dict[str, Any] | None = None,
) -> tuple[ThresholdChoice, dict[str, float]]:
    """Thresholds chosen on the calibration data by ``rule`` (the ``thresholds`` config
    section as keyword arguments of :func:`mlic.thresholds.choose_thresholds`; default: its
    defaults), and the metrics of ``scores`` against ``targets`` at them, keyed
    ``cal_<metric>`` (no mAP: it does not depend on thresholds). ``rule`` carries the class
    ``names`` when it has ``per_class`` objectives."""
    choice = choose_thresholds(calib_scores, calib_targets, **(rule or {}))
    return choice, metrics_at(choice, scores, targets)


def metrics_at(
    choice: ThresholdChoice, scores: np.ndarray, targets: np.ndarray
) -> dict[str, float]:
    """The metrics of ``scores`` against ``targets`` at ``choice``'s thresholds, keyed
    ``cal_<metric>`` (no mAP: it does not depend on thresholds)."""
    metrics = multilabel_metrics(scores, targets, threshold=choice.thresholds)
    return {f"cal_{k}": v for k, v in metrics.items() if k != "mAP"}
