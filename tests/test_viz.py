"""The report's plots say their numbers: AP bar values, an AP axis that shows differences,
co-occurrence percentages in the cells of small label sets."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest

from mlic.viz import (
    MAX_NUMBERED_CLASSES,
    ap_axis_start,
    cooccurrence_figure,
    per_class_ap_figure,
    plot_cooccurrence,
    plot_per_class_ap,
)


def texts(fig) -> list[str]:
    return [t.get_text() for t in fig.axes[0].texts]


@pytest.mark.parametrize(
    ("ap", "start"),
    [([91, 93, 98], 85), ([10, 50, 90], 0), ([60, 62], 55), ([100, 100], 95), ([], 0)],
)
def test_the_ap_axis_starts_a_little_below_the_lowest_ap(ap: list[float], start: float) -> None:
    assert ap_axis_start(np.array(ap, dtype=float)) == start


def test_each_ap_bar_is_labelled_and_a_cut_axis_says_so() -> None:
    names = ["cat", "dog", "car", "empty"]
    fig = per_class_ap_figure(names, np.array([0.91, 0.98, 0.935, np.nan]))
    ax = fig.axes[0]
    assert sorted(texts(fig)) == ["91.0", "93.5", "98.0"]  # NaN (no positives): no bar
    assert [t.get_text() for t in ax.get_yticklabels()] == ["cat", "car", "dog"]  # best on top
    assert ax.get_xlim()[0] == 85
    assert "starts at 85, not 0" in ax.get_xlabel()
    assert "mAP 94.17" in ax.get_title()
    plt.close(fig)
    low = per_class_ap_figure(["a", "b"], np.array([0.05, 0.9]))
    assert low.axes[0].get_xlim()[0] == 0 and low.axes[0].get_xlabel() == "AP (%)"
    plt.close(low)


def test_cooccurrence_cells_carry_percentages_for_small_label_sets() -> None:
    targets = np.array([[1, 1, 0], [1, 0, 0], [0, 1, 1], [1, 1, -1]])
    fig = cooccurrence_figure(["a", "b", "c"], targets)
    cells = {
        (round(t.get_position()[1]), round(t.get_position()[0])): t.get_text()
        for t in fig.axes[0].texts
    }
    # P(b | a) = 2/3, P(a | b) = 2/3, P(c | b) = 1/3, P(b | c) = 1 (the -1 is not present)
    assert cells == {
        (0, 1): "67",
        (0, 2): "0",
        (1, 0): "67",
        (1, 2): "33",
        (2, 0): "0",
        (2, 1): "100",
    }
    plt.close(fig)
    n = MAX_NUMBERED_CLASSES + 1
    big = cooccurrence_figure([f"c{i}" for i in range(n)], np.eye(n, dtype=int))
    assert texts(big) == []  # too many cells to read numbers in
    plt.close(big)


def test_the_plot_functions_still_write_their_png(tmp_path: Path) -> None:
    ap_png = plot_per_class_ap(["a", "b"], np.array([0.5, 0.7]), tmp_path / "ap.png")
    co_png = plot_cooccurrence(["a", "b"], np.array([[1, 0], [1, 1]]), tmp_path / "co.png")
    assert ap_png.read_bytes()[:4] == co_png.read_bytes()[:4] == b"\x89PNG"
