"""Metric tests: a hand-computed example, agreement with scikit-learn, top-k, thresholds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, f1_score, precision_score, recall_score

from mlic.metrics import (
    MultiLabelMetrics,
    average_precision_per_class,
    best_f1_thresholds,
    multilabel_metrics,
)

# A 4-image x 3-class example small enough to check by hand.
#   class 0: ranking 0.9(+) 0.8(-) 0.3(+) 0.1(-)            -> AP = (1/1 + 2/3) / 2 = 5/6
#   class 1: 0.7 is shared by two positives and a negative -> all enter at precision 2/3,
#            AP = (2/3 + 2/3) / 2 = 2/3
#   class 2: image 1 (score 0.95) is ignored, leaving 0.8(+) 0.6(+) 0.5(-)  -> AP = 1
HAND_SCORES = np.array(
    [
        [0.9, 0.2, 0.6],
        [0.8, 0.7, 0.95],
        [0.3, 0.7, 0.5],
        [0.1, 0.7, 0.8],
    ]
)
HAND_TARGETS = np.array(
    [
        [1, 0, 1],
        [0, 1, -1],
        [1, 1, 0],
        [0, 0, 1],
    ]
)


def _random_case(
    rng: np.random.Generator, n: int, c: int, decimals: int = 1, ignore: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Scores rounded to create many ties; targets with ignores and a class without positives."""
    scores = np.round(rng.random((n, c)), decimals)  # [N, C]
    targets = (rng.random((n, c)) < 0.3).astype(np.int64)  # [N, C]
    if ignore:
        targets[rng.random((n, c)) < 0.1] = -1
    targets[:, -1] = np.where(targets[:, -1] == 1, 0, targets[:, -1])  # last class: no positive
    return scores, targets


def test_hand_computed_average_precision() -> None:
    ap = average_precision_per_class(HAND_SCORES, HAND_TARGETS)
    np.testing.assert_allclose(ap, [5 / 6, 2 / 3, 1.0])
    assert multilabel_metrics(HAND_SCORES, HAND_TARGETS)["mAP"] == pytest.approx(5 / 6)


def test_hand_computed_threshold_metrics() -> None:
    # Predicted at >= 0.5 (ignored entry excluded), per class (correct, predicted, ground truth):
    #   class 0: (1, 2, 2); class 1: (2, 3, 2); class 2: (2, 3, 2) -- 0.5 itself counts.
    m = multilabel_metrics(HAND_SCORES, HAND_TARGETS)
    expected = {
        "CP": (1 / 2 + 2 / 3 + 2 / 3) / 3,  # 11/18
        "CR": (1 / 2 + 1 + 1) / 3,  # 5/6
        "CF1": 55 / 78,
        "OP": 5 / 8,
        "OR": 5 / 6,
        "OF1": 5 / 7,
    }
    for key, value in expected.items():
        assert m[key] == pytest.approx(value), key
        assert m[f"{key}_top3"] == pytest.approx(value), key  # 3 classes: top-3 keeps all


def test_hand_computed_top_k_lets_ignored_label_take_a_slot() -> None:
    # Top-2 per image: image 1's ignored class 2 (0.95) and class 0 (0.8) push out class 1,
    # a true positive; class 1 keeps images 2 (+) and 3 (-). Counts (correct, predicted, gt):
    #   class 0: (1, 2, 2); class 1: (1, 2, 2); class 2: (2, 3, 2).
    m = multilabel_metrics(HAND_SCORES, HAND_TARGETS, top_k=2)
    assert m["CP_top2"] == pytest.approx(5 / 9)
    assert m["CR_top2"] == pytest.approx(2 / 3)
    assert m["CF1_top2"] == pytest.approx(20 / 33)
    assert m["OP_top2"] == pytest.approx(4 / 7)
    assert m["OR_top2"] == pytest.approx(2 / 3)
    assert m["OF1_top2"] == pytest.approx(8 / 13)


def test_keys_and_ranges() -> None:
    rng = np.random.default_rng(0)
    scores, targets = _random_case(rng, 50, 6)
    m = multilabel_metrics(scores, targets)
    names = ["CP", "CR", "CF1", "OP", "OR", "OF1"]
    assert list(m) == ["mAP", *names, *(f"{n}_top3" for n in names)]
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in m.values())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_average_precision_matches_sklearn_with_ties_and_ignores(seed: int) -> None:
    rng = np.random.default_rng(seed)
    scores, targets = _random_case(rng, 120, 7)
    ap = average_precision_per_class(scores, targets)
    for c in range(targets.shape[1] - 1):
        valid = targets[:, c] != -1
        expected = average_precision_score(targets[valid, c], scores[valid, c])
        assert ap[c] == pytest.approx(expected, abs=1e-12), c
    assert math.isnan(ap[-1])  # no positive
    m = multilabel_metrics(scores, targets)
    assert m["mAP"] == pytest.approx(float(np.mean(ap[:-1])))


def test_average_precision_large_case_matches_sklearn() -> None:
    rng = np.random.default_rng(3)
    scores = np.round(rng.random((20_000, 12)), 3).astype(np.float32)  # ties across images
    targets = (rng.random((20_000, 12)) < 0.05).astype(np.int8)
    ap = average_precision_per_class(torch.from_numpy(scores), torch.from_numpy(targets))
    expected = [average_precision_score(targets[:, c], scores[:, c]) for c in range(12)]
    np.testing.assert_allclose(ap, expected, atol=1e-12)


def test_perfect_and_reversed_rankings() -> None:
    targets = np.array([[1], [1], [0], [0]])
    assert average_precision_per_class(np.array([[0.9], [0.8], [0.2], [0.1]]), targets)[0] == 1.0
    reversed_ap = average_precision_per_class(np.array([[0.1], [0.2], [0.8], [0.9]]), targets)[0]
    assert reversed_ap == pytest.approx((1 / 3 + 2 / 4) / 2)
    # All scores tied: every positive enters at the base rate.
    tied = average_precision_per_class(np.full((4, 1), 0.5), targets)[0]
    assert tied == pytest.approx(0.5)


def test_precision_recall_match_sklearn_without_ignores() -> None:
    rng = np.random.default_rng(4)
    scores, targets = _random_case(rng, 80, 6, ignore=False)
    m = multilabel_metrics(scores, targets)
    pred = (scores >= 0.5).astype(int)
    kw = {"zero_division": 0}
    assert m["CP"] == pytest.approx(precision_score(targets, pred, average="macro", **kw))
    assert m["CR"] == pytest.approx(recall_score(targets, pred, average="macro", **kw))
    assert m["OP"] == pytest.approx(precision_score(targets, pred, average="micro", **kw))
    assert m["OR"] == pytest.approx(recall_score(targets, pred, average="micro", **kw))
    assert m["OF1"] == pytest.approx(f1_score(targets, pred, average="micro", **kw))
    assert m["CF1"] == pytest.approx(2 * m["CP"] * m["CR"] / (m["CP"] + m["CR"]))


def test_precision_recall_match_sklearn_with_ignores() -> None:
    rng = np.random.default_rng(5)
    scores, targets = _random_case(rng, 80, 6)
    m = multilabel_metrics(scores, targets)
    pred = (scores >= 0.5).astype(int)
    valid = targets != -1
    kw = {"zero_division": 0}
    cp = [precision_score(targets[v, c], pred[v, c], **kw) for c, v in enumerate(valid.T)]
    cr = [recall_score(targets[v, c], pred[v, c], **kw) for c, v in enumerate(valid.T)]
    assert m["CP"] == pytest.approx(np.mean(cp))
    assert m["CR"] == pytest.approx(np.mean(cr))  # the class without positives counts as 0
    assert m["OP"] == pytest.approx(precision_score(targets[valid], pred[valid], **kw))
    assert m["OR"] == pytest.approx(recall_score(targets[valid], pred[valid], **kw))


def test_ignored_entries_do_not_matter() -> None:
    rng = np.random.default_rng(6)
    scores, targets = _random_case(rng, 60, 5)
    changed = scores.copy()
    ignored = targets == -1
    changed[ignored] = rng.random(ignored.sum())
    a = multilabel_metrics(scores, targets, top_k=5)  # top-5 of 5 classes: no slot competition
    b = multilabel_metrics(changed, targets, top_k=5)
    assert a == pytest.approx(b, nan_ok=True)


def test_top3_against_brute_force() -> None:
    rng = np.random.default_rng(7)
    scores, targets = _random_case(rng, 100, 8, decimals=1)  # many ties at the 3rd slot
    m = multilabel_metrics(scores, targets)
    pred = np.zeros_like(targets)
    for i, row in enumerate(scores):
        top = sorted(range(len(row)), key=lambda c: (-row[c], c))[:3]  # ties -> lower index
        for c in top:
            pred[i, c] = int(row[c] >= 0.5)
    valid = targets != -1
    kw = {"zero_division": 0}
    cp = [precision_score(targets[v, c], pred[v, c], **kw) for c, v in enumerate(valid.T)]
    cr = [recall_score(targets[v, c], pred[v, c], **kw) for c, v in enumerate(valid.T)]
    assert m["CP_top3"] == pytest.approx(np.mean(cp))
    assert m["CR_top3"] == pytest.approx(np.mean(cr))
    assert m["OP_top3"] == pytest.approx(precision_score(targets[valid], pred[valid], **kw))
    assert m["OR_top3"] == pytest.approx(recall_score(targets[valid], pred[valid], **kw))


def test_top3_requires_threshold_and_breaks_ties_by_index() -> None:
    # Top 3: class 1 (0.9), class 4 (0.7), then class 0 wins the 0.6 tie against 2 and 3.
    m = multilabel_metrics(np.array([[0.6, 0.9, 0.6, 0.6, 0.7]]), np.array([[1, 0, 1, 1, 1]]))
    assert m["OP"] == pytest.approx(4 / 5) and m["OR"] == pytest.approx(1.0)
    assert m["OP_top3"] == pytest.approx(2 / 3) and m["OR_top3"] == pytest.approx(2 / 4)
    # In the top 3 but under the threshold: not predicted.
    low = multilabel_metrics(np.array([[0.4, 0.3, 0.2, 0.1]]), np.array([[1, 1, 0, 0]]))
    assert low["OP_top3"] == 0.0 and low["OR_top3"] == 0.0 and low["OF1_top3"] == 0.0


def test_per_class_thresholds() -> None:
    rng = np.random.default_rng(8)
    scores, targets = _random_case(rng, 80, 4, ignore=False)
    thresholds = np.array([0.2, 0.5, 0.8, 1.0])
    m = multilabel_metrics(scores, targets, threshold=thresholds)
    pred = (scores >= thresholds).astype(int)
    kw = {"zero_division": 0}
    assert m["CP"] == pytest.approx(precision_score(targets, pred, average="macro", **kw))
    assert m["OR"] == pytest.approx(recall_score(targets, pred, average="micro", **kw))
    same = multilabel_metrics(scores, targets, threshold=torch.full((4,), 0.3, dtype=torch.float64))
    assert same == pytest.approx(multilabel_metrics(scores, targets, threshold=0.3))
    with pytest.raises(ValueError, match="one value per class"):
        multilabel_metrics(scores, targets, threshold=[0.5, 0.5])


def test_best_f1_thresholds_against_brute_force() -> None:
    rng = np.random.default_rng(9)
    scores, targets = _random_case(rng, 150, 5, decimals=2)
    thresholds = best_f1_thresholds(scores, targets)
    for c in range(4):
        valid = targets[:, c] != -1
        s, t = scores[valid, c], targets[valid, c]
        best = max(f1_score(t, s >= u) for u in np.unique(s))
        assert thresholds[c] in s  # one of the class's own (non-ignored) scores
        assert f1_score(t, s >= thresholds[c]) == pytest.approx(best)
        # Highest of the equally good thresholds: anything above it is strictly worse.
        above = np.unique(s[s > thresholds[c]])
        assert all(f1_score(t, s >= u) < best - 1e-12 for u in above)
    assert thresholds[-1] == 0.5  # no positive: default
    assert best_f1_thresholds(scores, targets, default=0.7)[-1] == 0.7


def test_torch_and_numpy_inputs_agree() -> None:
    rng = np.random.default_rng(10)
    scores, targets = _random_case(rng, 40, 5)
    a = multilabel_metrics(scores, targets)
    b = multilabel_metrics(torch.tensor(scores, dtype=torch.float64), torch.tensor(targets))
    assert a == pytest.approx(b, nan_ok=True)


def test_no_positive_anywhere_gives_nan_map() -> None:
    m = multilabel_metrics(np.full((3, 2), 0.7), np.zeros((3, 2)))
    assert math.isnan(m["mAP"])
    assert m["OP"] == 0.0 and m["OR"] == 0.0


@pytest.mark.parametrize(
    ("scores", "targets", "message"),
    [
        (np.array([[2.0, -1.0]]), np.array([[1, 0]]), "probabilities"),
        (np.array([[0.5, np.nan]]), np.array([[1, 0]]), "NaN"),
        (np.array([[0.5, 0.5]]), np.array([[1, 2]]), "1, 0 or -1"),
        (np.array([[0.5, 0.5]]), np.array([[1, 0, 0]]), "does not match"),
        (np.array([0.5, 0.5]), np.array([1, 0]), "2-D"),
    ],
)
def test_bad_inputs_raise(scores: np.ndarray, targets: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        multilabel_metrics(scores, targets)


def test_torchmetrics_accumulates_batches() -> None:
    rng = np.random.default_rng(11)
    scores, targets = _random_case(rng, 70, 6)
    thresholds = np.linspace(0.3, 0.7, 6)
    metric = MultiLabelMetrics(threshold=thresholds)
    for start, stop in [(0, 10), (10, 11), (11, 45), (45, 70)]:
        metric.update(
            torch.tensor(scores[start:stop], dtype=torch.float32),
            torch.tensor(targets[start:stop]),
        )
    expected = multilabel_metrics(scores.astype(np.float32), targets, threshold=thresholds)
    assert metric.compute() == pytest.approx(expected, nan_ok=True)
    np.testing.assert_allclose(
        metric.compute_per_class(), average_precision_per_class(scores, targets)
    )
    metric.reset()
    metric.update(torch.tensor(scores[:5]), torch.tensor(targets[:5]))
    assert metric.compute() == pytest.approx(
        multilabel_metrics(scores[:5], targets[:5], threshold=thresholds), nan_ok=True
    )


def test_torchmetrics_rejects_inconsistent_batches() -> None:
    metric = MultiLabelMetrics()
    metric.update(torch.rand(2, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="classes"):
        metric.update(torch.rand(2, 4), torch.ones(2, 4))
    with pytest.raises(ValueError, match="same shape"):
        metric.update(torch.rand(2, 3), torch.ones(3, 2))
