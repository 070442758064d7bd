"""Threshold rules on constructed scores whose right answer is known (issue 28)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from mlic.errors import ConfigError
from mlic.metrics import best_f1_thresholds, multilabel_metrics
from mlic.thresholds import RULES, Objective, choose_thresholds, parse_objective


def separable(n: int = 200, c: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Positives score in [0.6, 0.9], negatives in [0.1, 0.4]: any cut in (0.4, 0.6) is perfect."""
    rng = np.random.default_rng(seed)
    t = (rng.random((n, c)) < 0.3).astype(np.int8)
    s = np.where(t == 1, rng.uniform(0.6, 0.9, (n, c)), rng.uniform(0.1, 0.4, (n, c)))
    return s, t


def test_midpoint_leaves_a_margin_where_the_old_rule_sits_on_a_positive() -> None:
    s, t = separable()
    old = choose_thresholds(s, t, rule="best_f1")
    mid = choose_thresholds(s, t, rule="best_f1_mid")
    lowest_pos = np.array([s[t[:, j] == 1, j].min() for j in range(3)])
    highest_neg = np.array([s[t[:, j] == 0, j].max() for j in range(3)])
    # the old rule is exactly the lowest positive score; the midpoint is halfway to the negatives
    np.testing.assert_allclose(old.thresholds, lowest_pos)
    np.testing.assert_allclose(old.thresholds, best_f1_thresholds(s, t))
    np.testing.assert_allclose(mid.thresholds, (lowest_pos + highest_neg) / 2)
    for choice in (old, mid):  # both are perfect on the calibration data
        assert multilabel_metrics(s, t, threshold=choice.thresholds)["CF1"] == pytest.approx(1.0)


def test_a_class_with_two_positives_stays_near_the_global_threshold() -> None:
    s, t = separable(n=400, c=2)
    # class 1: only two positives, both scored high (0.99): its own optimum is extreme
    t[:, 1] = 0
    t[:2, 1] = 1
    s[:, 1] = np.where(t[:, 1] == 1, 0.99, s[:, 1])
    s[2:, 1] = np.minimum(s[2:, 1], 0.3)
    choice = choose_thresholds(s, t, rule="shrunk", shrink=10, min_positives=1)
    own = choose_thresholds(s, t, rule="best_f1_mid", min_positives=1).thresholds[1]
    g = choice.global_threshold
    assert own > 0.6  # the class's own midpoint: far from the others
    w = 2 / (2 + 10)
    assert choice.thresholds[1] == pytest.approx(w * own + (1 - w) * g)
    assert abs(choice.thresholds[1] - g) < abs(own - g) / 4
    # the class with many positives keeps nearly its own threshold
    own0 = choose_thresholds(s, t, rule="best_f1_mid").thresholds[0]
    assert abs(choice.thresholds[0] - own0) < abs(choice.thresholds[0] - g) + 1e-9
    assert list(choice.n_pos) == [int(t[:, 0].sum()), 2]


def test_too_few_positives_fall_back_to_the_global_threshold_and_say_so() -> None:
    s, t = separable(c=3)
    t[:, 2] = 0
    t[5, 2] = 1  # one positive
    choice = choose_thresholds(s, t, rule="shrunk", min_positives=3)
    assert list(choice.fallback) == [False, False, True]
    assert choice.thresholds[2] == choice.global_threshold
    meta = choice.to_meta("12 held-out images")
    assert meta["threshold_fallback"] == [False, False, True]
    assert meta["threshold_n_pos"][2] == 1 and meta["thresholds_from"] == "12 held-out images"
    assert meta["threshold_rule"].startswith("shrunk") and meta["threshold_objective"] == "f1"


def test_global_is_one_threshold_best_on_the_pooled_entries() -> None:
    s, t = separable()
    g = choose_thresholds(s, t, rule="global")
    assert len(set(g.thresholds)) == 1 and 0.4 < g.global_threshold < 0.6
    assert multilabel_metrics(s, t, threshold=g.thresholds)["OF1"] == pytest.approx(1.0)


@pytest.mark.parametrize("target", [0.8, 0.9, 0.95])
@pytest.mark.parametrize("rule", ["best_f1_mid", "global"])
def test_a_precision_target_is_met_on_the_calibration_data(target: float, rule: str) -> None:
    rng = np.random.default_rng(3)
    t = (rng.random((500, 4)) < 0.3).astype(np.int8)
    s = np.clip(0.35 * t + rng.random((500, 4)) * 0.65, 0, 1)  # overlapping classes
    choice = choose_thresholds(s, t, rule=rule, objective=f"precision:{target}")
    assert not choice.unmet.any()
    if rule == "global":  # one cut: the pooled (overall) precision reaches the target
        assert multilabel_metrics(s, t, threshold=choice.thresholds)["OP"] >= target - 1e-9
        return
    for j in range(4):  # per class: each class's precision reaches it...
        assert t[s[:, j] >= choice.thresholds[j], j].mean() >= target - 1e-9
        # ...at the lowest such threshold: the next lower score no longer does
        lower = s[s[:, j] < choice.thresholds[j], j].max()
        assert t[s[:, j] >= lower, j].mean() < target


def test_a_recall_target_is_the_highest_threshold_reaching_it() -> None:
    s, t = separable(n=300, c=1)
    s = s + np.linspace(0, 1e-3, 300)[:, None]  # distinct scores
    choice = choose_thresholds(s, t, rule="best_f1_mid", objective="recall:0.5")
    pred = s[:, 0] >= choice.thresholds[0]
    n_pos = int(t.sum())
    assert pred[t[:, 0] == 1].sum() == int(np.ceil(0.5 * n_pos))


def test_an_unreachable_precision_target_is_flagged() -> None:
    rng = np.random.default_rng(0)
    t = (rng.random((200, 1)) < 0.5).astype(np.int8)
    s = rng.random((200, 1))  # scores carry no information: precision stays near 0.5
    s[np.argmax(s[:, 0]), 0] = 1.0
    t[np.argmax(s[:, 0]), 0] = 0  # the top score is a negative: 1.0 is never reached
    choice = choose_thresholds(s, t, rule="best_f1_mid", objective="precision:1.0")
    assert choice.unmet[0]


def test_ties_are_one_threshold() -> None:
    s = np.array([[0.7], [0.7], [0.7], [0.2], [0.2]])
    t = np.array([[1], [1], [0], [0], [0]], dtype=np.int8)
    mid = choose_thresholds(s, t, rule="best_f1_mid", min_positives=1)
    # predicting the three tied 0.7s (F1 0.8) beats predicting nothing; every cut in
    # (0.2, 0.7] is the same choice
    assert mid.thresholds[0] == pytest.approx(0.45)
    assert choose_thresholds(s, t, rule="best_f1").thresholds[0] == pytest.approx(0.7)


def test_ignored_entries_do_not_count_and_classes_without_positives_are_handled() -> None:
    s, t = separable(c=2)
    t[:, 1] = 0
    t[:10, 0] = -1  # e.g. VOC's difficult-only labels
    for rule in RULES:
        choice = choose_thresholds(s, t, rule=rule)
        assert np.isfinite(choice.thresholds).all()
        assert choice.n_pos[1] == 0


def test_platt_maps_one_calibrated_cut_back_to_each_class() -> None:
    rng = np.random.default_rng(1)
    t = (rng.random((600, 2)) < 0.4).astype(np.int8)
    # class 1's scores are squashed towards 0: the same evidence, a lower raw score
    z = 3.0 * (t - 0.5) + rng.normal(0, 1, (600, 2))
    s = 1 / (1 + np.exp(-z))
    s[:, 1] = 1 / (1 + np.exp(-(z[:, 1] - 3.0)))
    choice = choose_thresholds(s, t, rule="platt")
    assert choice.thresholds[1] < choice.thresholds[0] - 0.2
    assert multilabel_metrics(s, t, threshold=choice.thresholds)["CF1"] > 0.8


def test_objective_parsing_and_bad_values() -> None:
    assert parse_objective("f1") == Objective()
    assert parse_objective("precision:0.9") == Objective("precision", 0.9)
    assert parse_objective("precision>=0.9") == Objective("precision", 0.9)
    assert str(parse_objective("recall:0.75")) == "recall:0.75"
    for bad in ("precision", "precision:1.5", "recall:x", "accuracy:0.9", "f1:0.3"):
        with pytest.raises(ConfigError, match="precision:P"):
            parse_objective(bad)
    with pytest.raises(ConfigError, match="thresholds.rule"):
        choose_thresholds(*separable(), rule="magic")


def test_a_class_can_have_its_own_objective() -> None:
    rng = np.random.default_rng(5)
    t = (rng.random((400, 3)) < 0.3).astype(np.int8)
    s = np.clip(0.35 * t + rng.random((400, 3)) * 0.65, 0, 1)
    names = ["cat", "dog", "person"]
    base = choose_thresholds(s, t, names=names)
    mixed = choose_thresholds(s, t, per_class={"person": "precision:0.95"}, names=names)
    strict = choose_thresholds(s, t, objective="precision:0.95")
    np.testing.assert_array_equal(mixed.thresholds[:2], base.thresholds[:2])
    assert mixed.thresholds[2] == strict.thresholds[2] > base.thresholds[2]
    meta = mixed.to_meta("cal")
    assert meta["threshold_objective"] == "f1"
    assert meta["threshold_objective_per_class"] == {"person": "precision:0.95"}
    with pytest.raises(ConfigError, match="no class 'horse'"):
        choose_thresholds(s, t, per_class={"horse": "recall:0.9"}, names=names)
    with pytest.raises(ConfigError, match="thresholds.per_class.person='precision'"):
        choose_thresholds(s, t, per_class={"person": "precision"}, names=names)


def test_threshold_keys_in_the_config() -> None:
    from mlic.config import load_config

    cfg = load_config(
        None, ["thresholds.per_class.person=precision:0.95", "thresholds.rule=global"]
    )
    assert (
        cfg.thresholds.per_class == {"person": "precision:0.95"} and cfg.thresholds.rule == "global"
    )
    for bad, says in (
        ("thresholds.objective=precision", "thresholds.objective='precision'"),
        ("thresholds.per_class.dog=recall:2", "thresholds.per_class.dog='recall:2'"),
        ("thresholds.rule=median", "thresholds.rule"),
        ("thresholds.shrink=-1", "thresholds.shrink=-1.0 must be >= 0"),
    ):
        with pytest.raises(ConfigError, match=re.escape(says)):
            load_config(None, [bad])
