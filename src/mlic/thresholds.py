"""Rules that turn calibration scores into per-class decision thresholds.

A multi-label model's sigmoid scores are not comparable across classes, so ``predict``,
``serve``, ``export`` and the report compare each class with its own threshold, chosen on
calibration data (held-out training images, a dev split or out-of-fold scores: see
:mod:`mlic.engine.calibration`). Calibration sets are small per class (a VOC class has 1-5
positives among 58 held-out images), and the per-class optimum of a handful of points is
extreme (0.0002 or 0.9999): it fits the calibration data and loses on new photos.

Rules (``thresholds.rule``):

* ``shrunk`` (default): each class's optimum (the midpoint of its best interval) moved
  towards the one global threshold by the weight ``n_pos / (n_pos + shrink)``: a class with
  2 calibration positives barely moves from the global threshold, one with 200 keeps its
  own. Empirical-Bayes shrinkage of a per-group estimate towards the pooled one.
* ``global``: one threshold for every class, optimal on all (image, class) entries pooled.
* ``best_f1``: each class's own optimum at the *top* of its best interval (the threshold
  equal to a positive's score): mlic's rule before issue 28, kept for comparison.
* ``best_f1_mid``: each class's own optimum at the midpoint of its best interval.
* ``platt``: per-class Platt scaling (a logistic fit on the logit, regularised towards the
  identity), then one global cut on the calibrated probabilities, mapped back per class.
* ``fixed``: 0.5 for every class (the papers' convention).

Objectives (``thresholds.objective``): ``f1`` (default), ``precision:P`` (the lowest
threshold whose calibration precision reaches P: the most recall at that precision) and
``recall:R`` (the highest threshold whose calibration recall reaches R). Classes with fewer
than ``min_positives`` calibration positives take the global threshold; they are listed.

The interval of a choice: every threshold in ``(next lower score, chosen score]`` predicts
the same calibration labels; its midpoint keeps a margin on both sides, where the top of
the interval sits on a positive's score and drops it on the slightest shift.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mlic.errors import ConfigError

__all__ = [
    "META_KEYS",
    "RULES",
    "DEFAULT_RULE",
    "DEFAULT_SHRINK",
    "DEFAULT_MIN_POSITIVES",
    "Objective",
    "ThresholdChoice",
    "parse_objective",
    "describe_stored",
    "choose_thresholds",
]

#: Checkpoint metadata keys that say what the stored thresholds are and how sure each is
#: (written by :meth:`ThresholdChoice.to_meta`, carried by export, the Hub and the server).
META_KEYS = (
    "thresholds",
    "thresholds_from",
    "threshold_rule",
    "threshold_objective",
    "threshold_objective_per_class",
    "threshold_global",
    "threshold_n_pos",
    "threshold_fallback",
    "threshold_unmet",
)
RULES = ("shrunk", "global", "best_f1", "best_f1_mid", "platt", "fixed")
DEFAULT_RULE = "shrunk"
DEFAULT_SHRINK = 30.0  # pseudo-positives: a class with this many positives moves halfway
DEFAULT_MIN_POSITIVES = 3
FIXED = 0.5


@dataclass(frozen=True)
class Objective:
    """What a threshold should achieve: ``kind`` f1 | precision | recall, ``target`` in (0, 1]."""

    kind: str = "f1"
    target: float | None = None

    def __str__(self) -> str:
        return self.kind if self.target is None else f"{self.kind}:{self.target:g}"


def parse_objective(text: str | Objective, key: str = "thresholds.objective") -> Objective:
    """``f1``, ``precision:0.9`` or ``recall:0.8`` (also ``precision>=0.9``) as an Objective;
    ``key`` names the setting in the error."""
    if isinstance(text, Objective):
        return text
    raw = str(text).strip().lower().replace(">=", ":").replace("=", ":")
    kind, _, value = raw.partition(":")
    if kind == "f1" and not value:
        return Objective()
    if kind in ("precision", "recall") and value:
        try:
            target = float(value)
        except ValueError:
            target = -1.0
        if 0.0 < target <= 1.0:
            return Objective(kind, target)
    raise ConfigError(
        f"{key}={text!r}: use f1, precision:P or recall:R with P, R in (0, 1] (e.g. precision:0.9)"
    )


@dataclass
class ThresholdChoice:
    """Per-class thresholds with what a reader needs to judge them."""

    thresholds: np.ndarray  # [C]
    global_threshold: float
    n_pos: np.ndarray  # [C] calibration positives per class
    fallback: np.ndarray  # [C] bool: too few positives, took the global threshold
    unmet: np.ndarray  # [C] bool: the precision/recall target was not reached on calibration
    rule: str
    objective: Objective
    shrink: float = DEFAULT_SHRINK
    per_class: dict[str, Objective] = field(default_factory=dict)  # class name -> objective

    def describe_rule(self) -> str:
        return f"shrunk (shrink {self.shrink:g})" if self.rule == "shrunk" else self.rule

    def to_meta(self, source: str) -> dict[str, Any]:
        """Checkpoint metadata: the thresholds, where they came from and how sure each is."""
        return {
            "thresholds": [round(float(t), 6) for t in self.thresholds],
            "thresholds_from": source,
            "threshold_rule": self.describe_rule(),
            "threshold_objective": str(self.objective),
            "threshold_objective_per_class": {k: str(v) for k, v in self.per_class.items()},
            "threshold_global": round(float(self.global_threshold), 6),
            "threshold_n_pos": [int(n) for n in self.n_pos],
            "threshold_fallback": [bool(f) for f in self.fallback],
            "threshold_unmet": [bool(u) for u in self.unmet],
        }


def describe_stored(meta: dict[str, Any]) -> str:
    """How a checkpoint's thresholds were chosen, for a log, report or card: ``rule shrunk
    (shrink 30), objective f1 (person: precision:0.95), chosen on <source>``."""
    objective = str(meta.get("threshold_objective", "f1"))
    per_class = meta.get("threshold_objective_per_class") or {}
    if per_class:
        objective += " (" + ", ".join(f"{k}: {v}" for k, v in per_class.items()) + ")"
    rule = meta.get("threshold_rule", "best_f1 (before issue 28)")
    source = meta.get("thresholds_from") or "unknown data"
    return f"rule {rule}, objective {objective}, chosen on {source}"


# --------------------------------------------------------------------------- one score column


def _interval_choice(s: np.ndarray, t: np.ndarray, obj: Objective) -> tuple[float, float, bool]:
    """``(top, midpoint, met)`` of the best threshold interval for one column of valid scores
    ``s`` [n] with 0/1 targets ``t`` [n]; the objective's choice among distinct thresholds."""
    order = np.argsort(-s, kind="stable")
    ss, tt = s[order], t[order]
    tp = np.cumsum(tt == 1)  # [n]; predicted positives at each rank that are positive
    fp = np.cumsum(tt == 0)
    ends = np.flatnonzero(np.r_[ss[1:] != ss[:-1], True])  # last rank of each tie group
    tp, fp, top = tp[ends], fp[ends], ss[ends]  # [g] per distinct threshold, descending
    n_pos = int(tp[-1])
    met = True
    if obj.kind == "f1":
        score = 2.0 * tp / np.maximum(tp + fp + n_pos, 1)
        k = int(np.argmax(score))  # first maximum: the highest threshold
    elif obj.kind == "precision":
        ok = np.flatnonzero(tp / np.maximum(tp + fp, 1) >= obj.target)
        met = ok.size > 0
        # the lowest threshold reaching the target; else the most precise one
        k = int(ok[-1]) if met else int(np.argmax(tp / np.maximum(tp + fp, 1)))
    else:
        ok = np.flatnonzero(tp >= obj.target * n_pos - 1e-9)
        k = int(ok[0])  # recall only grows as the threshold falls: the highest reaching it
    lower = float(top[k + 1]) if k + 1 < len(top) else 0.0
    return float(top[k]), 0.5 * (float(top[k]) + lower), met


def _per_class(
    s: np.ndarray, t: np.ndarray, obj: Objective
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(top, mid, n_pos, met)`` per class ``[C]`` over the valid (target != -1) entries;
    a class without positives gets NaN (it cannot be tuned)."""
    c = s.shape[1]
    top, mid, met = np.full(c, np.nan), np.full(c, np.nan), np.ones(c, dtype=bool)
    n_pos = (t == 1).sum(axis=0)  # [C]
    for j in range(c):
        valid = t[:, j] != -1
        if n_pos[j] == 0:
            continue
        top[j], mid[j], met[j] = _interval_choice(s[valid, j], t[valid, j], obj)
    return top, mid, n_pos, met


def _pooled(s: np.ndarray, t: np.ndarray, obj: Objective) -> tuple[float, bool]:
    """The one threshold that is best on every valid (image, class) entry pooled."""
    valid = t != -1
    if not (t[valid] == 1).any():
        return FIXED, False
    _, mid, met = _interval_choice(s[valid], t[valid], obj)
    return mid, met


# --------------------------------------------------------------------------- Platt scaling


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p) - np.log1p(-p)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow for large |x|


def _platt_fit(z: np.ndarray, y: np.ndarray, reg: float = 1.0, steps: int = 50) -> np.ndarray:
    """``[a, b]`` of ``sigmoid(a z + b)`` by damped Newton steps on the log-loss plus
    ``reg/2 ((a-1)^2 + b^2)``: with few positives the prior keeps the identity, and a step
    is halved until the objective falls (separable classes would diverge otherwise)."""
    x = np.stack([z, np.ones_like(z)], axis=1)  # [n, 2]
    prior = np.array([1.0, 0.0])

    def loss(w: np.ndarray) -> float:
        m = x @ w
        nll = np.logaddexp(0.0, m) - y * m  # -log p(y | m), stable
        return float(nll.sum() + 0.5 * reg * ((w - prior) ** 2).sum())

    w = prior.copy()
    current = loss(w)
    for _ in range(steps):
        p = _sigmoid(x @ w)
        grad = x.T @ (p - y) + reg * (w - prior)
        hess = (x * (p * (1 - p))[:, None]).T @ x + reg * np.eye(2)
        step = np.linalg.solve(hess, grad)
        scale = 1.0
        while scale > 1e-4 and loss(w - scale * step) > current:
            scale *= 0.5
        w = w - scale * step
        new = loss(w)
        if current - new < 1e-10:
            break
        current = new
    return w


def _platt(s: np.ndarray, t: np.ndarray, obj: Objective) -> tuple[np.ndarray, float, np.ndarray]:
    """Per-class raw-score thresholds equivalent to one global cut on Platt-calibrated
    probabilities; ``(thresholds [C], cut, met [C])``."""
    z = _logit(s)  # [N, C]
    cal = np.empty_like(z)
    params = np.zeros((s.shape[1], 2))
    for j in range(s.shape[1]):
        valid = t[:, j] != -1
        params[j] = _platt_fit(z[valid, j], (t[valid, j] == 1).astype(float))
        cal[:, j] = _sigmoid(params[j, 0] * z[:, j] + params[j, 1])
    cut, met = _pooled(cal, t, obj)
    a = np.maximum(params[:, 0], 0.05)  # a slope <= 0 would invert the class: keep it rising
    raw = _sigmoid((_logit(np.array(cut)) - params[:, 1]) / a)  # [C]
    return raw, cut, np.full(s.shape[1], met)


# --------------------------------------------------------------------------- the entry point


def choose_thresholds(
    scores: np.ndarray,
    targets: np.ndarray,
    rule: str = DEFAULT_RULE,
    objective: str | Objective = "f1",
    shrink: float = DEFAULT_SHRINK,
    min_positives: int = DEFAULT_MIN_POSITIVES,
    per_class: dict[str, str] | None = None,
    names: list[str] | None = None,
) -> ThresholdChoice:
    """Thresholds ``[C]`` for ``scores`` [N, C] (probabilities) and ``targets`` [N, C]
    (1, 0, or -1 for ignored entries) by ``rule`` and ``objective`` (see the module doc).
    ``per_class``: other objectives for some classes, by name (``names``: the classes of
    the columns), e.g. ``{"person": "precision:0.95"}``; each is chosen by the same rule."""
    choice = _choose(scores, targets, rule, parse_objective(objective), shrink, min_positives)
    if not per_class:
        return choice
    index = {n: j for j, n in enumerate(names or [])}
    unknown = sorted(set(per_class) - set(index))
    if unknown:
        raise ConfigError(
            f"thresholds.per_class: no class {', '.join(map(repr, unknown))} among "
            f"{len(index)} classes"
        )
    for name, text in per_class.items():
        obj = parse_objective(text, f"thresholds.per_class.{name}")
        own = _choose(scores, targets, rule, obj, shrink, min_positives)
        j = index[name]
        choice.thresholds[j], choice.unmet[j] = own.thresholds[j], own.unmet[j]
        choice.per_class[name] = obj
    return choice


def _choose(
    scores: np.ndarray,
    targets: np.ndarray,
    rule: str,
    obj: Objective,
    shrink: float,
    min_positives: int,
) -> ThresholdChoice:
    """:func:`choose_thresholds` for one objective for every class."""
    if rule not in RULES:
        raise ConfigError(f"thresholds.rule={rule!r} must be one of {', '.join(RULES)}")
    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(targets)
    if s.ndim != 2 or s.shape != t.shape:
        raise ValueError(f"scores {s.shape} and targets {t.shape} must both be [N, C]")
    c = s.shape[1]
    glob, glob_met = _pooled(s, t, obj)
    top, mid, n_pos, met = _per_class(s, t, obj)
    fallback = n_pos < (min_positives if rule in ("shrunk", "best_f1_mid", "platt") else 1)
    if rule == "fixed":
        thr, glob, fallback = np.full(c, FIXED), FIXED, np.zeros(c, dtype=bool)
    elif rule == "global":
        thr, met, fallback = np.full(c, glob), np.full(c, glob_met), np.zeros(c, dtype=bool)
    elif rule == "best_f1":
        thr = np.where(fallback, FIXED, top)  # the old rule: 0.5 where it cannot tune
    elif rule == "platt":
        thr, _, met = _platt(s, t, obj)
        thr = np.where(fallback, glob, thr)
    else:
        own = mid
        if rule == "shrunk":
            w = n_pos / (n_pos + shrink)  # [C]
            own = w * mid + (1.0 - w) * glob
        thr = np.where(fallback, glob, own)
    met = np.where(fallback & (rule != "best_f1"), glob_met, met)
    return ThresholdChoice(
        thresholds=np.asarray(thr, dtype=np.float64),
        global_threshold=float(glob),
        n_pos=n_pos,
        fallback=fallback,
        unmet=~met,
        rule=rule,
        objective=obj,
        shrink=shrink,
    )
