"""The README's Python section runs as written, on a small made-up set laid out as it says."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import mlic
from conftest import TINY_BACKBONE, make_voc, write_image

README = Path(__file__).resolve().parents[1] / "README.md"
SRC = str(Path(__file__).resolve().parents[1] / "src")


def section_blocks(title: str, language: str) -> list[str]:
    """The ``language`` code blocks of the README section ``## title``."""
    text = README.read_text()
    section = text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", section, re.S)


@pytest.fixture
def readme_folder(tmp_path: Path) -> Path:
    """What the README's examples name: runs/demo, photos/0001.jpg, 0002.jpg, VOCdevkit/."""
    names = ["cat", "dog", "car", "person", "tree"]
    model = mlic.create_model("baseline", len(names), backbone=TINY_BACKBONE, pretrained=False)
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    mlic.save_checkpoint(
        model,
        tmp_path / "runs" / "demo" / "best.safetensors",
        names,
        input_size=[3, 64, 64],
        thresholds=[0.5, 0.4, 0.6, 0.5, 0.5],
    )
    for i in (1, 2):
        write_image(tmp_path / "photos" / f"{i:04d}.jpg", i)
    make_voc(tmp_path, {"trainval": [[("cat", 0)], [("dog", 0), ("person", 0)]] * 4})
    return tmp_path


@pytest.mark.parametrize("index", range(len(section_blocks("Python API", "python"))))
def test_the_python_api_section_runs_as_written(readme_folder: Path, index: int) -> None:
    code = section_blocks("Python API", "python")[index]
    env = {**os.environ, "PYTHONPATH": SRC}
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=readme_folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip(), "the example prints what it shows"
    assert "Traceback" not in done.stderr
