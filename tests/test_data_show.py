"""``mlic data show``: training images after the training augmentation, titled with their labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import one_error_line
from mlic.cli import main, resolve_config_path
from mlic.config import load_config
from mlic.data.show import grid_shape, label_title, show_batch
from mlic.data.voc import load_voc


def overrides(voc: Path, **over: str) -> list[str]:
    base = {"data.format": "voc", "data.root": str(voc), "data.image_size": "48"}
    base.update(over)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.mark.parametrize(("n", "shape"), [(1, (1, 1)), (5, (2, 3)), (16, (4, 4)), (17, (4, 5))])
def test_grid_shape_is_near_square(n: int, shape: tuple[int, int]) -> None:
    assert grid_shape(n) == shape


def test_label_title_names_the_present_labels_only() -> None:
    names = ["cat", "dog", "car"]
    assert label_title(names, np.array([1, 0, 1])) == "cat, car"
    assert label_title(names, np.array([0, -1, 0])) == "(no labels)"  # -1: difficult, not present
    assert label_title(["a" * 20, "b" * 20], np.array([1, 1])) == "a" * 20 + ",\n" + "b" * 20


def test_the_titles_are_the_images_labels_and_the_grid_has_their_number(tiny_voc: Path) -> None:
    cfg = load_config(resolve_config_path("demo"), overrides(tiny_voc))
    path, titles = show_batch(cfg.data, Path("grid.png"), n=6)
    ann = load_voc(tiny_voc, "train")
    expected = [", ".join(ann.names[j] for j in np.nonzero(t == 1)[0]) for t in ann.targets[:6]]
    assert [t.replace(",\n", ", ") for t in titles] == expected
    with Image.open(path) as img:  # 2 rows x 3 columns of 2.4 inch panels at 90 dpi
        assert img.width == round(3 * 2.4 * 90)
        assert img.height > round(2 * 2.4 * 90)
    again, same = show_batch(cfg.data, Path("again.png"), n=6)  # seeded: the same augmentation
    assert same == titles and again.read_bytes() == path.read_bytes()


def test_mlic_data_show_writes_the_png_and_prints_its_path(
    tiny_voc: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["data", "show", "demo", *overrides(tiny_voc), "--n", "4"]) == 0
    out = capsys.readouterr().out
    assert "data-show.png" in out and Path("data-show.png").is_file()
    with Image.open("data-show.png") as img:
        assert img.width == round(2 * 2.4 * 90)  # 4 images: 2 x 2
    assert main(["data", "show", "demo", *overrides(tiny_voc), "--split", "val"]) == 0
    assert "12 val images" in capsys.readouterr().out  # the val split has 12, fewer than 16


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--output", "grid.jpg"], "must end in .png"),
        (["--n", "65"], "must be in [1, 64]"),
        (["--n", "0"], "must be >= 1"),
    ],
)
def test_bad_show_options_are_one_error_line(
    tiny_voc: Path, capsys: pytest.CaptureFixture, args: list[str], says: str
) -> None:
    line = one_error_line(["data", "show", "demo", *overrides(tiny_voc), *args], capsys)
    assert says in line


def test_show_refuses_to_replace_a_runs_own_file(
    tiny_voc: Path, capsys: pytest.CaptureFixture
) -> None:
    run = Path("runs/r")
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("{}\n")
    (run / "metrics.csv").write_text("epoch\n")
    line = one_error_line(
        ["data", "show", "demo", *overrides(tiny_voc), "--output", str(run / "pr_curves.png")],
        capsys,
    )
    assert "would replace pr_curves.png" in line
