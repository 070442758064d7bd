"""``mlic push --dry-run`` and loading ``hf-hub:ORG/NAME`` from an offline Hugging Face cache.

The cache is built by the test from the dry-run folder, laid out as huggingface_hub lays it
out (``hub/models--ORG--NAME/{refs/main, snapshots/<commit>/..., blobs/<sha256>}``), and read
with ``HF_HUB_OFFLINE=1`` and an unreachable endpoint: no network.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import TINY_BACKBONE
from mlic.cli import main as cli_main
from mlic.engine.checkpoint import read_metadata
from test_wds import NAMES, make_set

SRC = str(Path(__file__).resolve().parents[1] / "src")
REPO = "acme/tiny-voc"


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hub")
    voc = make_set(root)
    over = [
        "data.format=voc",
        f"data.root={voc}",
        "data.image_size=48",
        "data.batch_size=8",
        "data.workers=0",
        f"model.backbone={TINY_BACKBONE}",
        "model.pretrained=false",
        "train.epochs=1",
        f"run.output_dir={root}",
        "run.name=r",
        "run.progress=false",
        "run.tensorboard=false",
    ]
    assert cli_main(["train", "demo", *over]) == 0
    return root / "r"


def hf_cache_from_folder(folder: Path, hf_home: Path, repo_id: str) -> str:
    """Lay ``folder`` out as huggingface_hub's cache of model ``repo_id``; returns the commit."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in sorted(folder.iterdir()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    return commit


def test_dry_run_writes_the_exact_upload_folder(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "push"
    args = ["push", "--dry-run", str(run), str(out), "--repo-id", REPO, "--license", "apache-2.0"]
    assert cli_main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["model.safetensors", "config.json", "config.yaml", "README.md"]
    )
    assert (out / "model.safetensors").read_bytes() == (run / "best.safetensors").read_bytes()
    assert (out / "config.yaml").read_text() == (run / "config.yaml").read_text()
    meta = read_metadata(run / "best.safetensors")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"] == "baseline" and cfg["label_names"] == NAMES
    assert (
        cfg["input_size"] == [3, 48, 48]
        and cfg["mean"] == meta["mean"]
        and cfg["std"] == meta["std"]
    )
    assert cfg["model_kwargs"]["backbone"] == TINY_BACKBONE and "thresholds" in cfg
    assert cfg["dataset"]["format"] == "voc"
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["license"] == "apache-2.0" and front["library_name"] == "mlic"
    assert f"{100 * meta['metrics']['mAP']:.2f}" in card  # the metric table
    for name in NAMES:
        assert f"| {name} |" in card  # per-class AP
    assert f"mlic predict hf-hub:{REPO}" in card and "data.format=voc" in card
    root = str(yaml.safe_load((run / "config.yaml").read_text())["data"]["root"])
    assert root not in card  # a local folder is not put on a public page
    results = front["model-index"][0]["results"][0]  # the Hub's metadata: the run's metrics
    mAP = round(100 * meta["metrics"]["mAP"], 2)
    assert {"type": "mAP", "name": "mAP", "value": mAP} in results["metrics"]
    assert "## Intended use and limitations" in card and "predictor.predict([" in card
    assert f"weights of epoch {meta['epoch']}." in card  # counted from 1, as metrics.csv
    assert cli_main(args) == 2  # refuses to write into a non-empty folder


OFFLINE_SCRIPT = """
import sys, torch, mlic
from pathlib import Path
from huggingface_hub import scan_cache_dir
from mlic.cli import main
from mlic.errors import CheckpointError

repo, local, image, out, voc = sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4]), sys.argv[5]
assert sorted(r.repo_id for r in scan_cache_dir().repos) == sorted([repo, "evil/pickle"])
model, meta = mlic.load_checkpoint(f"hf-hub:{repo}")
ref, ref_meta = mlic.load_checkpoint(local)
assert meta == ref_meta
for (k, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
    assert torch.equal(a, b), k
p = mlic.Predictor.from_checkpoint(f"hf-hub:{repo}")
assert p.names == meta["label_names"]
assert main(["predict", f"hf-hub:{repo}", image, "--output", str(out / "preds.csv"), "-q"]) == 0
# a downloaded config's data locations are never used: the user names the data
assert main(["eval", f"hf-hub:{repo}", "data.workers=0", "run.progress=false",
             "--output", str(out / "ev")]) == 2
assert main(["eval", f"hf-hub:{repo}", "data.workers=0", "run.progress=false", f"data.root={voc}",
             "--output", str(out / "ev")]) == 0
assert main(["export", f"hf-hub:{repo}", "--format", "torchscript"]) == 0
try:
    mlic.load_checkpoint("hf-hub:acme/not-cached")
    raise SystemExit("a repo that is not cached loaded")
except CheckpointError as e:
    assert "not in the local Hugging Face cache" in str(e), e
try:
    mlic.load_checkpoint("hf-hub:evil/pickle")
    raise SystemExit("a pickle loaded")
except CheckpointError as e:
    assert "not a safetensors checkpoint" in str(e), e
print("OK")
"""


class _Payload:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def test_hf_hub_ids_load_offline_from_the_local_cache(run: Path, tmp_path: Path) -> None:
    folder = tmp_path / "push"
    assert cli_main(["push", "--dry-run", str(run), str(folder), "--repo-id", REPO]) == 0
    hf_home = tmp_path / "hf"
    hf_cache_from_folder(folder, hf_home, REPO)
    evil = tmp_path / "evil"
    evil.mkdir()
    marker = tmp_path / "pwned"
    (evil / "model.safetensors").write_bytes(pickle.dumps(_Payload(marker)))
    hf_cache_from_folder(evil, hf_home, "evil/pickle")
    image = sorted(run.parent.rglob("*.jpg"))[0]
    work = tmp_path / "work"
    work.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": SRC,
        "OMP_NUM_THREADS": "1",
        "HF_HOME": str(hf_home),
        "HF_HUB_OFFLINE": "1",
        "HF_ENDPOINT": "http://127.0.0.1:9",
    }
    env.pop("HF_HUB_CACHE", None)
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    voc = yaml.safe_load((run / "config.yaml").read_text())["data"]["root"]
    p = subprocess.run(
        [
            sys.executable,
            "-c",
            OFFLINE_SCRIPT,
            REPO,
            str(run / "best.safetensors"),
            str(image),
            str(work),
            voc,
        ],
        env=env,
        cwd=work,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0 and "OK" in p.stdout, p.stderr[-3000:]
    rows = (work / "preds.csv").read_text().splitlines()
    assert len(rows) == 2 and image.name in rows[1]
    assert json.loads((work / "ev" / "metrics.json").read_text())["metrics"][
        "mAP"
    ] == pytest.approx(read_metadata(run / "best.safetensors")["metrics"]["mAP"], abs=1e-6)
    assert (work / "tiny-voc.ts").exists()  # exported beside the user, not into the cache
    assert not marker.exists()  # never unpickled
