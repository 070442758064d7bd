"""Multi-label classification metrics: mAP, per-class and overall precision/recall/F1, top-k.

Conventions (shared by every function here and by the training reports):

* ``scores`` are probabilities ``[N, C]`` in ``[0, 1]`` (apply ``sigmoid`` to logits first);
  ``targets`` are ``[N, C]`` with 1 = present, 0 = absent, -1 = ignore (e.g. VOC "difficult").
  An ignored entry is left out of every count and every ranking of its *class*: it is neither
  a positive nor a negative for AP, precision or recall.
* AP is scikit-learn's ``average_precision_score``: non-interpolated,
  ``AP = sum_n (R_n - R_{n-1}) * P_n`` over the *distinct* score values taken as thresholds in
  descending order (tied scores enter together). A class without any positive has AP = NaN and
  ``mAP`` is the mean over the classes with at least one positive.
* A label is predicted when ``score >= threshold`` (``threshold`` is a float or one value per
  class). With per-class counts ``Nc_correct``, ``Nc_predicted``, ``Nc_gt`` (ML-GCN notation):
  ``CP = mean_c Nc_correct / Nc_predicted`` and ``CR = mean_c Nc_correct / Nc_gt``, where a
  0/0 ratio counts as 0 and *every* class is in the mean (as scikit-learn's
  ``average="macro"`` with ``zero_division=0``); ``CF1 = 2 CP CR / (CP + CR)`` (the F1 of the
  means, not the mean of per-class F1). ``OP``, ``OR``, ``OF1`` use the same counts summed over
  all classes first (scikit-learn's ``average="micro"``).
* ``*_top3`` metrics predict a label only if it is among the image's 3 highest scores *and*
  passes the threshold. The top 3 are chosen from the model's scores alone, before targets are
  looked at (as a deployed predictor would), so an ignored label can take one of the 3 slots;
  it is then left out of the counts like any ignored entry. Ties for the last slot go to the
  lower class index, so the result is deterministic.

Everything is vectorised with NumPy: each class's scores are sorted once and AP is read off
cumulative sums, so 50,000 images x 80 classes take a fraction of a second on one CPU core.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from mlic.thresholds import choose_thresholds  # the rules live there, the old one too

__all__ = [
    "MultiLabelMetrics",
    "average_precision_per_class",
    "best_f1_thresholds",
    "multilabel_metrics",
]

ArrayLike = np.ndarray | torch.Tensor
Threshold = float | np.ndarray | torch.Tensor | list[float] | tuple[float, ...]


# --------------------------------------------------------------------------- input checks


def _to_numpy(x: Any) -> np.ndarray:
    """Return ``x`` as a NumPy array, detaching and moving torch tensors to the CPU."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()  # NumPy has no bfloat16
        return x.numpy()
    return np.asarray(x)


def _check_inputs(scores: Any, targets: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert ``scores`` to float64 ``[N, C]`` and ``targets`` to int8 ``[N, C]``.

    Errors are raised here, at the boundary, because a wrong input (logits instead of
    probabilities, transposed arrays, labels other than 1/0/-1) would otherwise give a
    plausible-looking but wrong number instead of a failure.
    """
    s = _to_numpy(scores).astype(np.float64, copy=False)
    t = _to_numpy(targets)
    if s.ndim != 2:
        raise ValueError(f"scores must be 2-D [N, C]; got shape {tuple(s.shape)}")
    if t.shape != s.shape:
        raise ValueError(
            f"targets shape {tuple(t.shape)} does not match scores shape {tuple(s.shape)}"
        )
    if s.size:
        if np.isnan(s).any():
            raise ValueError("scores contain NaN")
        lo, hi = float(s.min()), float(s.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(
                f"scores must be probabilities in [0, 1] (got min {lo:.4g}, max {hi:.4g}); "
                "apply torch.sigmoid to logits first"
            )
        bad = ~np.isin(t, (-1, 0, 1))
        if bad.any():
            value = t[bad].flat[0]
            raise ValueError(f"targets must be 1, 0 or -1 (ignore); found {value!r}")
    return s, t.astype(np.int8)


def _check_threshold(threshold: Threshold, num_classes: int) -> np.ndarray:
    """Return the threshold as a float64 array ``[C]`` (a scalar is repeated per class)."""
    thr = _to_numpy(threshold).astype(np.float64)
    if thr.ndim == 0:
        return np.full(num_classes, float(thr))
    if thr.shape != (num_classes,):
        raise ValueError(
            f"threshold must be a float or have one value per class [{num_classes}]; "
            f"got shape {tuple(thr.shape)}"
        )
    return thr


# --------------------------------------------------------------------------- ranking core


def _ranked(scores: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """Sort each class's scores once and return the per-rank quantities AP and F1 need.

    Layout is class-major ``[C, N]`` so each class is one contiguous row (NumPy sorts rows of
    contiguous memory much faster than strided columns). Ignored entries get score ``-inf`` so
    they sink below every real score and never share a tie group with a valid entry.

    Returned arrays (all ``[C, N]``, rank 0 = highest score):
      ``sorted``: the scores in descending order (``-inf`` for ignored entries);
      ``pos``: 1 where the ranked entry is a positive;
      ``tp``, ``fp``: positives / negatives ranked at or above each position;
      ``group_end``: True at the last position of each run of equal scores, i.e. at the
      positions where "predict if score >= this value" is a distinct threshold.
    """
    valid = targets != -1  # [N, C]
    # [C, N], contiguous per class; ascending order of -score = best first.
    keyed = np.ascontiguousarray(np.where(valid, -scores, np.inf).T)
    order = np.argsort(keyed, axis=1)  # [C, N]; stability is not needed, ties are grouped
    sorted_scores = -np.take_along_axis(keyed, order, axis=1)  # [C, N]
    pos = np.take_along_axis((targets == 1).T, order, axis=1)  # [C, N] bool
    neg = np.take_along_axis((targets == 0).T, order, axis=1)  # [C, N] bool
    tp = np.cumsum(pos, axis=1, dtype=np.int64)  # [C, N]
    fp = np.cumsum(neg, axis=1, dtype=np.int64)  # [C, N]
    group_end = np.ones_like(pos)  # [C, N]
    group_end[:, :-1] = sorted_scores[:, 1:] != sorted_scores[:, :-1]
    return {"sorted": sorted_scores, "pos": pos, "tp": tp, "fp": fp, "group_end": group_end}


def average_precision_per_class(scores: ArrayLike, targets: ArrayLike) -> np.ndarray:
    """Non-interpolated average precision of every class, ``[C]``; NaN where no positive.

    Equal to ``sklearn.metrics.average_precision_score(targets[:, c], scores[:, c])`` on the
    non-ignored entries of each class. Each positive contributes ``1 / P`` recall, and it enters
    at the threshold equal to its own score, where the precision is that of the *last* entry of
    its tie group; so ``AP = sum over positives of precision at the end of their group / P``.
    """
    return _average_precision(*_check_inputs(scores, targets))


def _average_precision(s: np.ndarray, t: np.ndarray) -> np.ndarray:
    """:func:`average_precision_per_class` on inputs already checked by ``_check_inputs``."""
    num_images, num_classes = s.shape
    num_pos = (t == 1).sum(axis=0)  # [C]
    ap = np.full(num_classes, np.nan)
    if num_images == 0:
        return ap
    r = _ranked(s, t)
    ranks = np.arange(num_images)
    # Index of the end of each position's tie group: the nearest group end at or after it,
    # found by a reversed running minimum over "own index if group end, else N-1".
    end_idx = np.where(r["group_end"], ranks, num_images - 1)  # [C, N]
    end_idx = np.minimum.accumulate(end_idx[:, ::-1], axis=1)[:, ::-1]  # [C, N]
    ranked_valid = r["tp"] + r["fp"]  # [C, N]
    precision = r["tp"] / np.maximum(ranked_valid, 1)  # [C, N]
    precision_at_end = np.take_along_axis(precision, end_idx, axis=1)  # [C, N]
    ap_sum = (precision_at_end * r["pos"]).sum(axis=1)  # [C]
    has_pos = num_pos > 0
    ap[has_pos] = ap_sum[has_pos] / num_pos[has_pos]
    return ap


def best_f1_thresholds(scores: ArrayLike, targets: ArrayLike, default: float = 0.5) -> np.ndarray:
    """Per-class threshold ``[C]`` that maximises that class's F1 on the given data.

    Candidate thresholds are the distinct scores of the class's valid entries; a label is
    predicted when ``score >= threshold``, so the returned value reproduces the best F1 exactly
    on this data. Among equally good thresholds the highest one (fewest predictions) wins.
    Classes without any positive cannot be tuned (F1 is 0 whatever the threshold) and get
    ``default``. Meant for tuning on a validation split, then applying to test data. It is
    :mod:`mlic.thresholds`' ``best_f1`` rule (mlic's default before issue 28).
    """
    s, t = _check_inputs(scores, targets)
    choice = choose_thresholds(s, t, rule="best_f1")  # [C]; 0.5 where a class cannot tune
    return np.where(choice.n_pos > 0, choice.thresholds, float(default))


# --------------------------------------------------------------------------- threshold metrics


def _safe_div(num: np.ndarray | float, den: np.ndarray | float) -> np.ndarray:
    """Element-wise ``num / den`` with 0/0 (or x/0) defined as 0."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den > 0)


def _precision_recall_f1(predicted: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """CP, CR, CF1, OP, OR, OF1 from a boolean prediction matrix ``[N, C]``."""
    valid = targets != -1  # [N, C]
    positive = targets == 1  # [N, C]
    predicted = predicted & valid  # ignored entries are neither predicted nor missed
    n_correct = (predicted & positive).sum(axis=0)  # [C]
    n_predicted = predicted.sum(axis=0)  # [C]
    n_gt = positive.sum(axis=0)  # [C]
    cp = float(_safe_div(n_correct, n_predicted).mean()) if n_correct.size else 0.0
    cr = float(_safe_div(n_correct, n_gt).mean()) if n_correct.size else 0.0
    op = float(_safe_div(n_correct.sum(), n_predicted.sum()))
    o_r = float(_safe_div(n_correct.sum(), n_gt.sum()))
    return {
        "CP": cp,
        "CR": cr,
        "CF1": float(_safe_div(2 * cp * cr, cp + cr)),
        "OP": op,
        "OR": o_r,
        "OF1": float(_safe_div(2 * op * o_r, op + o_r)),
    }


def _top_k_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """Boolean ``[N, C]``: True for each image's ``k`` highest scores (ties -> lower index)."""
    num_images, num_classes = scores.shape
    mask = np.zeros(scores.shape, dtype=bool)
    if num_images == 0 or num_classes == 0:
        return mask
    k = min(k, num_classes)
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # [N, k]
    np.put_along_axis(mask, top, True, axis=1)
    return mask


def multilabel_metrics(
    scores: ArrayLike, targets: ArrayLike, threshold: Threshold = 0.5, top_k: int = 3
) -> dict[str, float]:
    """All standard multi-label metrics as a flat dict of fractions in ``[0, 1]``.

    Args:
        scores: probabilities ``[N, C]`` (NumPy or torch).
        targets: ``[N, C]`` of 1 (present), 0 (absent), -1 (ignore).
        threshold: a float, or one threshold per class ``[C]``; predicted = ``score >= thr``.
        top_k: k of the ``*_top{k}`` metrics (3 in the literature, giving ``CP_top3`` ...).

    Returns:
        ``mAP, CP, CR, CF1, OP, OR, OF1`` and ``CP_top{k} ... OF1_top{k}``; see the module
        docstring for the exact definitions. ``mAP`` is NaN when no class has a positive.
        Per-class AP comes from :func:`average_precision_per_class`.
    """
    s, t = _check_inputs(scores, targets)
    thr = _check_threshold(threshold, s.shape[1])  # [C]
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1; got {top_k}")
    ap = _average_precision(s, t)  # [C]
    result = {"mAP": float(np.mean(ap[~np.isnan(ap)])) if (~np.isnan(ap)).any() else np.nan}
    above = s >= thr[None, :]  # [N, C]
    result.update(_precision_recall_f1(above, t))
    top = _precision_recall_f1(above & _top_k_mask(s, top_k), t)
    result.update({f"{name}_top{top_k}": value for name, value in top.items()})
    return result


# --------------------------------------------------------------------------- torchmetrics


class MultiLabelMetrics(Metric):
    """Accumulates scores and targets over batches and computes :func:`multilabel_metrics`.

    The states are "cat" lists, so under DDP ``compute()`` gathers every rank's samples before
    computing: ranking metrics such as AP cannot be averaged across ranks, they need all scores.

    Example::

        metric = MultiLabelMetrics()
        for images, targets in loader:
            metric.update(torch.sigmoid(model(images)), targets)
        results = metric.compute()          # {"mAP": ..., "CP": ..., ...}
        ap = metric.compute_per_class()     # np.ndarray [C]
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, threshold: Threshold = 0.5, top_k: int = 3, **kwargs: Any) -> None:
        """``threshold`` and ``top_k`` as in :func:`multilabel_metrics`; ``kwargs`` go to
        ``torchmetrics.Metric`` (``process_group``, ``dist_sync_on_step``, ...)."""
        super().__init__(**kwargs)
        thr = _to_numpy(threshold).astype(np.float64)
        self.threshold: float | np.ndarray = float(thr) if thr.ndim == 0 else thr
        self.top_k = top_k
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("targets", default=[], dist_reduce_fx="cat")

    def update(self, scores: ArrayLike, targets: ArrayLike) -> None:
        """Store one batch: probabilities ``[B, C]`` and targets ``[B, C]`` of 1/0/-1."""
        scores = torch.as_tensor(scores).detach()
        targets = torch.as_tensor(targets, device=scores.device).detach()
        if scores.ndim != 2 or targets.shape != scores.shape:
            raise ValueError(
                "expected scores and targets of the same shape [B, C]; got "
                f"{tuple(scores.shape)} and {tuple(targets.shape)}"
            )
        if self.scores and self.scores[0].shape[1] != scores.shape[1]:
            raise ValueError(
                f"batch has {scores.shape[1]} classes; earlier batches had "
                f"{self.scores[0].shape[1]}"
            )
        self.scores.append(scores.float())  # [B, C]
        self.targets.append(targets.to(torch.int8))  # [B, C]; 1/0/-1 fit, 4x smaller

    def _gathered(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All stored samples as ``([N, C], [N, C])`` (after any DDP sync)."""
        if isinstance(self.scores, list) and not self.scores:
            raise ValueError("MultiLabelMetrics has no samples: call update() before compute()")
        return dim_zero_cat(self.scores), dim_zero_cat(self.targets)

    def compute(self) -> dict[str, float]:
        """The flat metric dict of :func:`multilabel_metrics` over every sample seen."""
        scores, targets = self._gathered()
        return multilabel_metrics(scores, targets, threshold=self.threshold, top_k=self.top_k)

    def gathered(self) -> tuple[np.ndarray, np.ndarray]:
        """Every sample seen, over all ranks: ``(scores [N, C] float32, targets [N, C] int8)``."""
        with self.sync_context():
            scores, targets = self._gathered()
            return scores.cpu().numpy(), targets.cpu().numpy()

    def compute_per_class(self) -> np.ndarray:
        """Per-class AP ``[C]`` over every sample seen (NaN for classes without positives)."""
        with self.sync_context():
            scores, targets = self._gathered()
            return average_precision_per_class(scores, targets)
