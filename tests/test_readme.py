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


# ----------------------------------------------------------------------------- the walk
WALK = "Your own photos, from folder to served model"
#: appended to the walk's `mlic train` line: a tiny network, 1 epoch (the README's own
#: recipe is the demo's pretrained EfficientNet-Lite0, minutes on a CPU)
TINY_TRAIN = [
    f"model.backbone={TINY_BACKBONE}",
    "model.pretrained=false",
    "data.image_size=32",
    "data.batch_size=4",
    "data.workers=0",
    "train.epochs=1",
    "run.progress=false",
]


def make_photo_folder(root: Path) -> None:
    """``mine/``: 24 small photos, ``train.csv`` (18) and ``val.csv`` (6), as the walk says."""
    names = ["cat", "dog", "person"]
    rows = []
    for i in range(24):
        write_image(root / "mine" / "photos" / f"{i + 1:04d}.jpg", 500 + i)
        labels = [names[i % 3]] + ([names[(i + 1) % 3]] if i % 4 == 0 else [])
        rows.append(f"photos/{i + 1:04d}.jpg,{';'.join(labels)}")
    (root / "mine" / "train.csv").write_text("\n".join(["image,labels", *rows[:18]]) + "\n")
    (root / "mine" / "val.csv").write_text("\n".join(["image,labels", *rows[18:]]) + "\n")


def serve_and_ask(argv: list[str], ask: str, cwd: Path, env: dict[str, str]) -> str:
    """Start the walk's `mlic serve` on a free loopback port, wait (bounded) until it is
    ready, run the walk's `curl` line against it, stop the server; the answer."""
    import shlex
    import signal
    import time

    httpx = pytest.importorskip("httpx")
    from serve_fixtures import free_port

    port = free_port()
    log = cwd / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlic", *argv[1:], "--port", str(port)],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        for _ in range(600):  # at most ~3 minutes
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        else:
            pytest.fail(f"mlic serve not ready:\n{log.read_text()[-3000:]}")
        curl = shlex.split(ask.replace("127.0.0.1:8000", f"127.0.0.1:{port}"))
        done = subprocess.run(curl, cwd=cwd, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_the_own_photos_walk_runs_from_folder_to_served_model(tmp_path: Path) -> None:
    """Every command of the walk, in order, as written (the train line with tiny overrides
    appended); `mlic serve` in the background answers the walk's `curl`, then stops."""
    import json
    import shlex
    import shutil

    pytest.importorskip("onnxruntime")
    pytest.importorskip("litserve")
    if shutil.which("curl") is None:
        pytest.skip("the walk's last line needs curl")
    lines = [
        ln.strip()
        for block in section_blocks(WALK, "bash")
        for ln in block.splitlines()
        if ln.strip() and not ln.strip().startswith("#")
    ]
    commands = [ln.split()[1] for ln in lines if ln.startswith("mlic ")]
    assert commands == ["data", "data", "train", "eval", "predict", "export", "serve"]
    make_photo_folder(tmp_path)
    env = {**os.environ, "PYTHONPATH": SRC}
    env.pop("MLIC_SERVE_TOKEN", None)
    serve_line = next(ln for ln in lines if ln.startswith("mlic serve"))
    for line in lines[: lines.index(serve_line)]:
        argv = shlex.split(line)
        if argv[:2] == ["mlic", "train"]:
            argv += TINY_TRAIN
        done = subprocess.run(
            [sys.executable, "-m", "mlic", *argv[1:]],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, f"{line}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        assert "Traceback" not in done.stderr, line
    assert (tmp_path / "data-show.png").is_file()
    assert (tmp_path / "runs" / "baseline-mine" / "best.onnx").is_file()
    answer = json.loads(serve_and_ask(shlex.split(serve_line), lines[-1], tmp_path, env))
    assert len(answer["results"]) == 1, answer
