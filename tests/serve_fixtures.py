"""Helpers for the ``mlic serve`` tests: a checkpoint whose prediction we control, a real
server process on a free loopback port, and real photographs as JPEG bytes."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_BACKBONE

NAMES = ["cat", "dog", "car", "person", "tree"]
THRESHOLDS = [0.5, 0.6, 0.5, 0.45, 0.5]
SERVE_DEPS = ("litserve", "fastapi", "httpx", "prometheus_client", "multipart")


def require_serve_extra() -> None:
    for dep in SERVE_DEPS:
        pytest.importorskip(dep)


def make_checkpoint(path: Path, model: str = "baseline") -> Path:
    """A tiny 64 px model whose classifier bias makes 'dog' clearly present in any photo,
    'person' near its threshold and the rest absent (weights stay random, so probabilities
    still depend on the image)."""
    import mlic
    from mlic.engine.checkpoint import save_checkpoint

    torch.manual_seed(0)
    m = mlic.create_model(model, len(NAMES), backbone=TINY_BACKBONE)
    m.default_cfg["input_size"] = (3, 64, 64)
    with torch.no_grad():
        m.fc.weight.mul_(3.0)
        m.fc.bias.copy_(torch.tensor([-3.0, 4.0, -3.0, 0.0, -3.0]))
    return save_checkpoint(m, path, NAMES, thresholds=THRESHOLDS)


def photo_jpeg(name: str = "chelsea", quality: int = 90) -> bytes:
    """One of scikit-image's bundled photographs as JPEG bytes."""
    import skimage.data

    arr = getattr(skimage.data, name)()
    buf = io.BytesIO()
    Image.fromarray(np.asarray(arr)).convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Served:
    """A running ``mlic serve`` process."""

    url: str
    proc: subprocess.Popen
    checkpoint: Path
    log: Path

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(
    checkpoint: Path, *args: str, startup_s: float = 180.0, own_group: bool = False
) -> Served:
    """``python -m mlic serve CHECKPOINT --port P ARGS`` in a subprocess; waits for /readyz.
    ``own_group``: in a process group of its own (as systemd starts a service)."""
    import httpx

    port = free_port()
    log = checkpoint.parent / f"serve-{port}.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    env.pop("MLIC_SERVE_TOKEN", None)
    cmd = [sys.executable, "-m", "mlic", "serve", str(checkpoint), "--port", str(port), *args]
    with log.open("w") as f:
        proc = subprocess.Popen(
            cmd,
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=checkpoint.parent,
            start_new_session=own_group,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + startup_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlic serve exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return Served(url, proc, checkpoint, log)
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    if own_group:
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        proc.kill()
    raise RuntimeError(f"mlic serve not ready after {startup_s:.0f} s:\n{log.read_text()}")


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One real server for the HTTP and browser tests (dynamic batching on, small limits)."""
    require_serve_extra()
    root = tmp_path_factory.mktemp("serve")
    ckpt = make_checkpoint(root / "model.safetensors")
    server = start_server(
        ckpt,
        "--max-batch-size",
        "8",
        "--max-wait-ms",
        "200",
        "--max-images",
        "8",
        "--max-upload-mb",
        "1",
    )
    yield server
    server.stop()
