"""Issue #29, "Hostile input, round three" (the run side): a downloaded config runs nothing
and reads nothing it names, Hub ids and model-card text are validated, a run folder is
locked while a run writes it and no other command writes over its files, per-label file
names never collide, resume overrides are honoured or refused by name, and bad arguments
end as one ``mlic: error:`` line."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import mlic
from conftest import TINY_BACKBONE, make_voc, write_image
from conftest import one_error_line as cli_error_line
from mlic.cli import main
from mlic.config import RESUME_OVERRIDES, load_config, save_config
from mlic.engine.checkpoint import save_checkpoint
from mlic.engine.trainer import TrainingStopped, train
from mlic.errors import ConfigError, RunBusyError
from mlic.files import RUN_LOCK, RunLock, location_problem
from mlic.viz import label_file_names
from test_hub import hf_cache_from_folder
from test_nothing_lost import NAMES, run_cfg, snapshot, tiny_checkpoint

SRC = str(Path(__file__).resolve().parents[1] / "src")


def one_error_line(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    return cli_error_line(argv, capsys, seconds=120)


def tiny_voc_set(root: Path) -> Path:
    """A VOC tree with the five NAMES: 6 training and 4 validation images."""
    cycle = [[(NAMES[i % 5], 0), (NAMES[(i + 2) % 5], 0)] for i in range(10)]
    return make_voc(root, {"train": cycle[:6], "val": cycle[6:]}, labels_txt=NAMES)


def env_for_subprocess(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", **extra}
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "MLIC_FAULT"):
        env.pop(key, None)
    return env


# ----------------------------------------------------------------------------- 1. downloaded configs
# One row per hostile Hub repository: (case, its config.yaml's data section, the key the
# error must name, words of the reason). "{marker}" is a file the command would create.
HOSTILE_CONFIGS = [
    ("wds-pipe-val", {"format": "wds", "val": "pipe:touch {marker}"}, "data.val", "pipe:"),
    ("wds-s3-shell", {"format": "wds", "val": "s3://b/x.tar;touch {marker}"}, "data.val", "URL"),
    (
        "https-val",
        {"format": "wds", "val": "https://127.0.0.1:9/s-{{0..1}}.tar"},
        "data.val",
        "URL",
    ),
    ("pipe-train", {"format": "wds", "train": "pipe:touch {marker}"}, "data.train", "pipe:"),
    (
        "pipe-index",
        {"format": "wds", "val": "v", "index": "pipe:touch {marker}"},
        "data.index",
        "pipe",
    ),
    ("absolute-root", {"format": "csv", "root": "/", "val": "etc/passwd"}, "data.root", "absolute"),
    ("dotdot-val", {"format": "csv", "val": "../../../../etc/passwd"}, "data.val", ".."),
    (
        "absolute-classes",
        {"format": "openimages", "classes": "/etc/passwd"},
        "data.classes",
        "absolute",
    ),
    ("home-root", {"format": "voc", "root": "~/data"}, "data.root", "home"),
    ("env-interpolation", {"format": "voc", "root": "${{oc.env:HOME}}"}, "data.root", "absolute"),
    ("file-url-images", {"format": "csv", "val_images": "file:///etc"}, "data.val_images", "URL"),
    ("brace-dotdot", {"format": "csv", "val": "{{.,.}}{{.,.}}/x.csv"}, "data.val", "brace"),
    ("control-chars", {"format": "voc", "val": "val\nx"}, "data.val", "control"),
]

HUB_SCRIPT = """
import contextlib, io, json, sys
from mlic.cli import main

out, voc = sys.argv[1], sys.argv[2]
calls = json.loads(sys.argv[3])
results = {}
for case, argv in calls.items():
    argv = [a.replace("{out}", out).replace("{voc}", voc) for a in argv]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    results[case] = {"code": code, "err": err.getvalue()}
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def hub_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every hostile repository in an offline Hugging Face cache, and every command run on
    them in ONE subprocess (HF_HUB_OFFLINE=1, HF_HOME in tmp, unreachable endpoint)."""
    root = tmp_path_factory.mktemp("hubcfg")
    marker = root / "pwned"
    voc = tiny_voc_set(root / "data")
    hf_home = root / "hf"
    ck = tiny_checkpoint(root / "m.safetensors")
    calls: dict[str, list[str]] = {}
    for case, data, _, _ in HOSTILE_CONFIGS:
        folder = root / "repos" / case
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(ck.read_bytes())
        values = {k: v.format(marker=marker) for k, v in data.items()}
        cfg = {"data": {**values, "workers": 0}, "run": {"progress": False}}
        (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
        commit = hf_cache_from_folder(folder, hf_home, f"evil/{case}")
        calls[case] = ["eval", f"hf-hub:evil/{case}", "--output", f"{{out}}/{case}"]
        snapshot_file = hf_home / "hub" / f"models--evil--{case}" / "snapshots" / commit
        snapshot_file /= "model.safetensors"
    # the same repository named by its path in the Hugging Face cache
    calls["cache-path"] = ["eval", str(snapshot_file), "--output", "{out}/cache"]
    calls["cache-path-int8"] = ["export", str(snapshot_file), "--int8", "--output", "{out}/c.onnx"]
    # the user's own values on the command line are used: this evaluation runs
    calls["user-gives-data"] = [
        "eval",
        "hf-hub:evil/wds-pipe-val",
        "data.format=voc",
        "data.root={voc}",
        "data.val=val",
        "--output",
        "{out}/own",
    ]
    # the user's data.val alone: the repository's data.train is still refused
    calls["user-gives-val-only"] = ["eval", "hf-hub:evil/pipe-train", "data.val=val"]
    calls["export-int8"] = [
        "export",
        "hf-hub:evil/wds-pipe-val",
        "--int8",
        "--output",
        "{out}/m.onnx",
    ]
    work = root / "work"
    work.mkdir()
    env = env_for_subprocess(
        HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9"
    )
    p = subprocess.run(
        [sys.executable, "-c", HUB_SCRIPT, str(work), str(voc), json.dumps(calls)],
        env=env,
        cwd=work,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    results = json.loads(p.stdout.strip().splitlines()[-1])
    return {"results": results, "marker": marker, "work": work}


@pytest.mark.parametrize(
    ("case", "data", "key", "why"), HOSTILE_CONFIGS, ids=[c[0] for c in HOSTILE_CONFIGS]
)
def test_a_downloaded_config_names_no_data_location(
    hub_runs: dict, case: str, data: dict, key: str, why: str
) -> None:
    got = hub_runs["results"][case]
    lines = got["err"].strip().splitlines()
    assert got["code"] == 2, got["err"]
    assert len(lines) == 1 and lines[0].startswith("mlic: error: "), got["err"]
    assert f"hf-hub:evil/{case}" in lines[0] and key in lines[0] and why in lines[0], lines[0]
    assert f"{key}=..." in lines[0]  # tells the user what to type
    assert not hub_runs["marker"].exists()  # no command ran
    assert not (hub_runs["work"] / case).exists()  # nothing was evaluated or written


def test_data_locations_typed_by_the_user_are_used(hub_runs: dict) -> None:
    own = hub_runs["results"]["user-gives-data"]
    assert own["code"] == 0, own["err"]
    assert json.loads((hub_runs["work"] / "own" / "metrics.json").read_text())["num_images"] == 4
    partial = hub_runs["results"]["user-gives-val-only"]
    assert partial["code"] == 2 and "data.train is a pipe: command" in partial["err"]
    assert "data.val" not in partial["err"].split("(")[1]  # the user's value is not refused
    int8 = hub_runs["results"]["export-int8"]
    assert int8["code"] == 2 and "--calibration" in int8["err"], int8["err"]
    assert not hub_runs["marker"].exists()


def test_a_path_into_the_hub_cache_is_a_download_too(hub_runs: dict) -> None:
    case = HOSTILE_CONFIGS[-1][0]  # the last repository made: control characters in data.val
    got = hub_runs["results"]["cache-path"]
    assert got["code"] == 2 and "data.val holds control characters" in got["err"], got["err"]
    assert len(got["err"].strip().splitlines()) == 1 and f"models--evil--{case}" in got["err"]
    int8 = hub_runs["results"]["cache-path-int8"]
    assert int8["code"] == 2 and "--calibration" in int8["err"], int8["err"]
    assert not (hub_runs["work"] / "cache").exists()


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("train", None),
        ("val.csv", None),
        ("images/train2014", None),
        ("a..b/c", None),
        ("pipe:cat x", "pipe"),
        ("s3://b/k", "URL"),
        ("gs://b", "URL"),
        ("C:\\data", "URL"),
        ("/etc", "absolute"),
        ("\\\\host\\share", "absolute"),
        ("~user/x", "home"),
        ("a/../../b", ".."),
        ("..", ".."),
        ("a\\..\\b", ".."),
        ("s-{0..9}.tar", "brace"),
        ("x\ny", "control"),
        ("x\0y", "control"),
    ],
)
def test_location_problem_allows_only_plain_relative_paths(value: str, problem: str | None) -> None:
    got = location_problem(value)
    assert (got is None) if problem is None else (got is not None and problem in got), got


# ----------------------------------------------------------------------------- 2. Hub ids, card text
BAD_HUB_IDS = [
    "../../etc",
    "a/b/c",
    "/name",
    "org/",
    "org",
    "org/na..me",
    "org/na--me",
    "or g/name",
    "org/name\nx",
    "org/-name",
    "org/name.git",
    "a" * 50 + "/" + "b" * 50,
    "org/name@../../x",
    "org/name@main\nx",
    "org/name@",
]


@pytest.mark.parametrize("repo", BAD_HUB_IDS, ids=range(len(BAD_HUB_IDS)))
def test_a_malformed_hub_id_is_one_line_before_any_download(
    repo: str, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    image = tmp_path / "a.jpg"
    write_image(image, 0)
    for argv in (
        ["predict", f"hf-hub:{repo}", str(image)],
        ["eval", f"hf-hub:{repo}"],
        ["export", f"hf-hub:{repo}"],
    ):
        line = one_error_line(argv, capsys)
        assert "hf-hub:" in line or "repository id" in line or "revision" in line, line
    if "@" not in repo:  # `mlic push` names the repository without the prefix
        line = one_error_line(["push", str(tmp_path), repo], capsys)
        assert "not a Hugging Face repository id" in line
    assert list(tmp_path.iterdir()) == [image]  # nothing written


@pytest.fixture
def fake_run(tmp_path: Path) -> Path:
    """A run folder as `mlic push` reads it: best.safetensors with awkward label names."""
    run = tmp_path / "run"
    run.mkdir()
    names = ["cat", "a\n---\nlicense: evil", "x|y", "dog", "tree"]
    model = mlic.create_model("baseline", 5, backbone=TINY_BACKBONE, pretrained=False)
    save_checkpoint(model, run / "best.safetensors", names, input_size=[3, 32, 32])
    return run


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--repo-id", "a/b\nlicense: mit"], "not a Hugging Face repository id"),
        (["--repo-id", "../../etc"], "not a Hugging Face repository id"),
        (["--license", "mit\ntags: [evil]"], "not a licence identifier"),
        (["--license", "mit: x"], "not a licence identifier"),
        (["--license", ""], "not a licence identifier"),
        (["--license", "apache 2.0"], "not a licence identifier"),
        (["--license", "'other'"], "not a licence identifier"),
    ],
)
def test_push_text_cannot_inject_card_keys(
    fake_run: Path, tmp_path: Path, flags: list[str], words: str, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "push"
    line = one_error_line(["push", "--dry-run", str(fake_run), str(out), *flags], capsys)
    assert words in line and "\n" not in line
    assert not out.exists()


def test_card_front_matter_is_exactly_its_five_keys(fake_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "push"
    argv = ["push", "--dry-run", str(fake_run), str(out), "--repo-id", "acme/m.v-1_0"]
    assert main([*argv, "--license", "cc-by-nc-4.0"]) == 0
    card = (out / "README.md").read_text()
    assert card.startswith("---\n")
    front = yaml.safe_load(card.split("\n---\n")[0].removeprefix("---\n"))
    index = front.pop("model-index")
    assert front == {
        "library_name": "mlic",
        "license": "cc-by-nc-4.0",
        "pipeline_tag": "image-classification",
        "tags": ["mlic", "multi-label-image-classification", "baseline"],
    }
    assert [entry["name"] for entry in index] == ["m.v-1_0"] and len(index[0]["results"]) == 1


# ----------------------------------------------------------------------------- 3. run-folder lock
def write_train_yaml(path: Path, voc: Path, out: Path, **extra: object) -> Path:
    cfg = {
        "data": {
            "format": "voc",
            "root": str(voc),
            "image_size": 32,
            "batch_size": 4,
            "workers": 0,
            "randaugment": False,
        },
        "model": {"backbone": TINY_BACKBONE, "pretrained": False},
        "train": {"epochs": 1, "ema": False},
        "run": {"output_dir": str(out), "progress": False, "tensorboard": False},
    }
    for key, value in extra.items():
        section, name = key.split("__")
        cfg[section][name] = value
    path.write_text(yaml.safe_dump(cfg))
    return path


def mlic_process(*argv: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mlic", *argv],
        env=env_for_subprocess(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_running_run_holds_its_folder_until_it_exits(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    voc = tiny_voc_set(tmp_path / "data")
    cfg = write_train_yaml(
        tmp_path / "c.yaml",
        voc,
        tmp_path / "runs",
        train__epochs=100_000,
        train__max_steps_per_epoch=1,
    )
    run = tmp_path / "runs" / "r"
    first = mlic_process("train", str(cfg), "run.name=r")
    try:
        deadline = time.monotonic() + 240  # started: its config.yaml is written
        while not (run / "last.resume.pt").exists() and first.poll() is None:
            assert time.monotonic() < deadline, "the first run did not start"
            time.sleep(0.2)
        assert first.poll() is None, first.communicate()[1][-2000:]
        for argv in (
            ["train", str(cfg), "run.name=r"],
            ["train", "--resume", str(run)],
            ["train", str(cfg), "run.name=r", "run.overwrite=true"],
        ):
            line = one_error_line(argv, capsys)
            assert f"another mlic process (pid {first.pid})" in line and str(run) in line, line
        with pytest.raises(RunBusyError):
            RunLock(run).acquire()
    finally:
        first.send_signal(signal.SIGKILL)  # a crash: the kernel drops the lock
        first.communicate(timeout=60)
    RunLock(run).acquire().release()  # free again
    line = one_error_line(["train", str(cfg), "run.name=r"], capsys)
    assert "already exists" in line  # the killed run's files are kept, not mixed with new ones


def test_two_trains_of_one_name_started_together(tmp_path: Path) -> None:
    voc = tiny_voc_set(tmp_path / "data")
    cfg = write_train_yaml(tmp_path / "c.yaml", voc, tmp_path / "runs")
    procs = [mlic_process("train", str(cfg), "run.name=same", f"train.seed={i}") for i in (0, 1)]
    outcomes = [(p.wait(timeout=600), p.communicate()[1]) for p in procs]
    codes = sorted(code for code, _ in outcomes)
    assert codes == [0, 2], outcomes
    err = next(e for code, e in outcomes if code == 2).strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mlic: error: "), err
    assert "another mlic process" in err[0] or "already exists" in err[0], err
    winner = next(i for i, (code, _) in enumerate(outcomes) if code == 0)
    run = tmp_path / "runs" / "same"
    assert load_config(run / "config.yaml").train.seed == winner  # one run's files, not a mix
    assert (run / "best.safetensors").exists() and not (run / RUN_LOCK).exists()


def test_a_refused_run_leaves_no_folder_and_a_stale_lock_blocks_nothing(tmp_path: Path) -> None:
    voc = tiny_voc_set(tmp_path / "data")
    with pytest.raises(ConfigError, match="train.device"):
        train(run_cfg(voc, tmp_path / "runs", "r", **{"train.device": "tpu"}))
    assert not (tmp_path / "runs").exists()  # the folders made for the lock are gone
    (tmp_path / "runs" / "r").mkdir(parents=True)
    (tmp_path / "runs" / "r" / RUN_LOCK).write_text("12345\n")  # left by a killed process
    train(run_cfg(voc, tmp_path / "runs", "r"))
    assert not (tmp_path / "runs" / "r" / RUN_LOCK).exists()


# ----------------------------------------------------------------------------- 4. a run's own files
@pytest.fixture
def run_folder(tmp_path: Path) -> dict[str, str]:
    """A run folder (files as training leaves them) and a tiny VOC set its config names."""
    voc = tiny_voc_set(tmp_path / "data")
    run = tmp_path / "runs" / "r"
    (run / "labels").mkdir(parents=True)
    tiny_checkpoint(run / "best.safetensors")
    save_config(run_cfg(voc, tmp_path / "runs", "r"), run / "config.yaml")
    for name, text in [
        ("last.resume.pt", "resume"),
        ("metrics.csv", "epoch,mAP\n1,0.5\n"),
        ("report.md", "# the training report\n"),
        ("per_class_ap.png", "png"),
        ("labels/labels.json", "{}"),
    ]:
        (run / name).write_text(text)
    image = tmp_path / "a.jpg"
    write_image(image, 1)
    ck = tmp_path / "m.safetensors"
    ck.write_bytes((run / "best.safetensors").read_bytes())
    (tmp_path / "link.onnx").symlink_to(run / "best.safetensors")
    return {"run": str(run), "img": str(image), "ck": str(ck), "tmp": str(tmp_path)}


RUN_FILE_CASES = [
    (
        "export-over-best",
        ["export", "{run}", "--output", "{run}/best.safetensors"],
        "best.safetensors",
    ),
    (
        "export-ts-over-resume",
        ["export", "{run}", "--format", "torchscript", "--output", "{run}/last.resume.pt"],
        "last.resume.pt",
    ),
    ("export-over-config", ["export", "{run}", "--output", "{run}/config.yaml"], "config.yaml"),
    ("export-over-metrics", ["export", "{run}", "--output", "{run}/metrics.csv"], "metrics.csv"),
    ("export-over-report", ["export", "{run}", "--output", "{run}/report.md"], "report.md"),
    ("export-over-plot", ["export", "{run}", "--output", "{run}/per_class_ap.png"], "per_class_ap"),
    ("export-into-labels", ["export", "{run}", "--output", "{run}/labels/labels.json"], "labels"),
    (
        "export-via-dotdot",
        ["export", "{run}", "--output", "{run}/labels/../best.safetensors"],
        "best.safetensors",
    ),
    ("export-via-symlink", ["export", "{run}", "--output", "{tmp}/link.onnx"], "best.safetensors"),
    ("export-over-input", ["export", "{ck}", "--output", "{ck}"], "own input"),
    (
        "predict-over-metrics",
        ["predict", "{run}", "{img}", "--output", "{run}/metrics.csv"],
        "metrics.csv",
    ),
    (
        "models-over-config",
        ["models", "baseline", "--no-flops", "--json", "{run}/config.yaml"],
        "config.yaml",
    ),
    ("eval-into-labels", ["eval", "{run}", "--output", "{run}/labels"], "labels"),
    ("eval-into-report", ["eval", "{run}", "--output", "{run}/report.md"], "report.md"),
]


@pytest.mark.parametrize(
    ("case", "argv", "words"), RUN_FILE_CASES, ids=[c[0] for c in RUN_FILE_CASES]
)
def test_no_command_writes_over_a_run_s_files(
    run_folder: dict[str, str],
    case: str,
    argv: list[str],
    words: str,
    capsys: pytest.CaptureFixture,
) -> None:
    run, ck = Path(run_folder["run"]), Path(run_folder["ck"])
    before, ck_bytes = snapshot(run), ck.read_bytes()
    line = one_error_line([a.format(**run_folder) for a in argv], capsys)
    assert words in line, line
    assert snapshot(run) == before and ck.read_bytes() == ck_bytes


def test_eval_into_a_run_folder_keeps_the_training_report(run_folder: dict[str, str]) -> None:
    run = Path(run_folder["run"])
    before = snapshot(run)
    # (an override after an option is an override too, not "unrecognized arguments")
    assert main(["eval", str(run), "--output", str(run), "run.progress=false"]) == 0
    after = snapshot(run)
    assert {k: v for k, v in after.items() if not k.startswith("eval-val")} == before
    assert (run / "eval-val" / "report.md").exists() and (
        run / "eval-val" / "metrics.json"
    ).exists()


# ----------------------------------------------------------------------------- 5. per-label file names
ACCENTED = ["café", "cafe", "Cafe", "ca fe", "ca_fe", "猫", "犬", "🐱"]


@pytest.mark.parametrize(
    "names",
    [
        ACCENTED,
        ["grid", "Grid", "person", "person "],  # "grid" is the grid image's name
        ["a/b", "a_b", "a\\b", "a:b", ".", "..", "a" * 300, "a" * 301],
        ["ca_fe", "ca fe", "ca_fe-e136be51"],  # a label spelled like another's hashed slug
    ],
    ids=["accents-scripts", "grid-and-case", "separators-and-long", "hash-lookalike"],
)
def test_label_file_names_are_distinct_readable_and_safe(names: list[str]) -> None:
    parts = label_file_names(names, reserved=["grid"])
    assert len({p.lower() for p in parts.values()} | {"grid"}) == len(names) + 1
    for name, part in parts.items():
        assert part.isascii() and "/" not in part and "\\" not in part and 0 < len(part) <= 80
        assert part not in (".", "..") and not part.startswith(".")
        if name.isascii() and name.isidentifier() and names.count(name.lower()) <= 1:
            assert part.startswith(name[:60])  # readable: the label itself where it can be


def test_heat_maps_of_eight_look_alike_labels_are_eight_files(tmp_path: Path) -> None:
    model = mlic.create_model("baseline", len(ACCENTED), backbone=TINY_BACKBONE, pretrained=False)
    ck = save_checkpoint(model, tmp_path / "m.safetensors", ACCENTED, input_size=[3, 32, 32])
    image = tmp_path / "photo one.jpg"
    write_image(image, 3)
    heat = tmp_path / "heat"
    argv = [
        "predict",
        str(ck),
        str(image),
        "--threshold",
        "0",
        "--top-k",
        "8",
        "--heatmaps",
        str(heat),
        "-q",
    ]
    assert main(argv) == 0
    files = sorted(p.name for p in heat.iterdir())
    overlays = [f for f in files if not f.endswith("__grid.png")]
    assert len(files) == 9 and len(overlays) == 8, files
    assert len({f.lower() for f in files}) == 9  # distinct on case-insensitive disks too
    assert any(f.endswith("__ca_fe.png") for f in overlays)  # readable where it can be


# ----------------------------------------------------------------------------- 6. resume overrides
def metric_rows(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def test_resume_with_more_epochs_extends_the_run_as_if_planned(
    tiny_voc: Path, tmp_path: Path
) -> None:
    out = tmp_path / "runs"
    flat = {"schedule.name": "constant", "schedule.warmup_epochs": "0"}  # same rate either way
    train(run_cfg(tiny_voc, out, "straight", **flat, **{"train.epochs": "2"}))
    train(run_cfg(tiny_voc, out, "short", **flat))  # one epoch
    assert (
        main(["train", "--resume", str(out / "short"), "train.epochs=2", "run.progress=false"]) == 0
    )
    straight, short = metric_rows(out / "straight"), metric_rows(out / "short")
    assert len(short) == 2
    for a, b in zip(straight, short, strict=True):
        for key in ("train_loss", "mAP", "CF1", "OF1", "lr"):
            assert a[key] == b[key], (key, a, b)
    wa = load_file(str(out / "straight" / "best.safetensors"))
    wb = load_file(str(out / "short" / "best.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert load_config(out / "short" / "config.yaml").train.epochs == 2  # kept for the next resume


def test_resume_with_more_epochs_stretches_the_schedule(tiny_voc: Path, tmp_path: Path) -> None:
    out = tmp_path / "runs"
    train(run_cfg(tiny_voc, out, "cos"))  # warm-up then cosine over one epoch
    train(None, resume=out / "cos", overrides=["train.epochs=2"])
    rows = metric_rows(out / "cos")
    # the cosine of a 2-epoch run ends at optim.lr * schedule.min_lr_ratio, not back at the top
    assert len(rows) == 2 and float(rows[1]["lr"]) == pytest.approx(0.003 * 0.01, rel=1e-3)


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-epoch run stopped in its second epoch (a resume point, mid-epoch)."""
    root = tmp_path_factory.mktemp("resume")
    voc = tiny_voc_set(root / "data")
    # 6 training images (no hold-out) in batches of 2: 3 steps an epoch, step 4 in the second
    over = {"train.epochs": "2", "data.batch_size": "2", "data.calibration": "none"}
    with pytest.raises(TrainingStopped):
        train(run_cfg(voc, root / "runs", "r", **over), stop_after_steps=4)
    return root / "runs" / "r"


RESUME_CASES = [
    ("model-key", ["model.backbone=resnet50"], "model.backbone: cannot change when resuming"),
    ("data-root", ["data.root=/elsewhere"], "data.root: cannot change"),
    ("optim-lr", ["optim.lr=0.1"], "optim.lr: cannot change"),
    ("allowed-and-refused", ["train.epochs=3", "loss.name=bce"], "loss.name: cannot change"),
    ("unknown-key", ["nonsense.key=1"], "unknown config key"),
    ("zero-epochs", ["train.epochs=0"], "must be > 0"),
    ("fewer-epochs-than-trained", ["train.epochs=1"], "already trained 2 epoch(s)"),
    ("config-and-resume", ["demo"], "not both"),
    ("no-equals", ["train.epochs=3", "epochs"], "must look like key=value"),
]


@pytest.mark.parametrize(("case", "over", "words"), RESUME_CASES, ids=[c[0] for c in RESUME_CASES])
def test_resume_overrides_that_cannot_apply_are_refused_by_name(
    stopped_run: Path, case: str, over: list[str], words: str, capsys: pytest.CaptureFixture
) -> None:
    before = snapshot(stopped_run)
    line = one_error_line(["train", "--resume", str(stopped_run), *over], capsys)
    assert words in line, line
    if "cannot change" in words:
        assert all(k in line for k in RESUME_OVERRIDES)  # says what may be given
    assert snapshot(stopped_run) == before  # refused before anything was written


# ----------------------------------------------------------------------------- 7. one error line
@pytest.fixture(scope="module")
def bad_args(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("args")
    voc = tiny_voc_set(root / "data")
    cfg = write_train_yaml(root / "c.yaml", voc, root / "runs")
    image = root / "a.jpg"
    write_image(image, 0)
    (root / "folder.csv").mkdir()
    (root / "my run").mkdir()
    (root / "file").write_text("x")
    ck = tiny_checkpoint(root / "m.safetensors")
    (root / "interp.yaml").write_text("data:\n  root: ${oc.env:MLIC_NO_SUCH_VARIABLE}\n")
    paths = {"root": root, "cfg": cfg, "img": image, "ck": ck}
    return {k: str(v) for k, v in paths.items()}


NO_CUDA = not torch.cuda.is_available()
CLI_CASES = [
    ("predict-device-word", ["predict", "{ck}", "{img}", "--device", "tpu"], "not a device"),
    (
        "predict-output-folder",
        ["predict", "{ck}", "{img}", "--output", "{root}/folder.csv"],
        "is a folder",
    ),
    (
        "predict-heatmaps-file",
        ["predict", "{ck}", "{img}", "--heatmaps", "{root}/file"],
        "not a folder",
    ),
    ("eval-device-word", ["eval", "{ck}", "train.device=tpu"], "train.device"),
    ("eval-output-file", ["eval", "{ck}", "--output", "{root}/file"], "not a folder"),
    ("export-output-folder", ["export", "{ck}", "--output", "{root}/folder.csv"], "is a folder"),
    ("bench-batch-huge", ["bench", "baseline", "--batch-size", "100000000"], "must be <= 4096"),
    ("bench-classes-huge", ["bench", "baseline", "--num-classes", "2000000000"], "in [1, 100000]"),
    ("models-classes-huge", ["models", "--num-classes", "1000000000"], "in [1, 100000]"),
    (
        "models-json-folder",
        ["models", "baseline", "--no-flops", "--json", "{root}/folder.csv"],
        "is a folder",
    ),
    ("train-device-word", ["train", "{cfg}", "train.device=gpu0"], "train.device"),
    ("train-interpolation", ["train", "{root}/interp.yaml"], "cannot resolve 'data.root'"),
    ("train-config-and-resume", ["train", "{cfg}", "--resume", "{root}"], "not both"),
    (
        "push-newline-license",
        ["push", "--dry-run", "{root}", "{root}/o", "--license", "a\nb: c"],
        "licence",
    ),
    (
        "push-bad-default-repo-id",
        ["push", "--dry-run", "{root}/my run", "{root}/o"],
        "give --repo-id",
    ),
    *(
        [
            ("predict-missing-gpu", ["predict", "{ck}", "{img}", "--device", "cuda:7"], "CUDA"),
            ("bench-missing-gpu", ["bench", "baseline", "--device", "cuda"], "CUDA"),
        ]
        if NO_CUDA
        else []
    ),
]


@pytest.mark.parametrize(("case", "argv", "words"), CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_argument_is_one_error_line(
    bad_args: dict[str, str],
    case: str,
    argv: list[str],
    words: str,
    capsys: pytest.CaptureFixture,
) -> None:
    line = one_error_line([a.format(**bad_args) for a in argv], capsys)
    assert words in line, line
    assert not (Path(bad_args["root"]) / "runs").exists()  # nothing started


def test_non_utf8_file_names_are_written_escaped(
    bad_args: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    name = os.fsdecode(b"caf\xe9 \xff.jpg")  # Latin-1 bytes, not UTF-8: surrogate escapes
    image = tmp_path / name
    write_image(image, 5)
    for suffix in (".csv", ".jsonl"):
        out = tmp_path / os.fsdecode(b"r\xe9sultats" + suffix.encode())
        assert main(["predict", bad_args["ck"], str(image), "--output", str(out), "-q"]) == 0
        out.read_text(encoding="utf-8")  # valid UTF-8
    row = json.loads((tmp_path / os.fsdecode(b"r\xe9sultats.jsonl")).read_text())
    assert row["image"].endswith("caf\\xe9 \\xff.jpg"), row
    assert main(["predict", bad_args["ck"], str(tmp_path), "-q"]) == 0  # the table
    captured = capsys.readouterr()
    assert "caf\\xe9 \\xff.jpg" in captured.out and "Traceback" not in captured.err
    rows = list(csv.reader((tmp_path / os.fsdecode(b"r\xe9sultats.csv")).open(encoding="utf-8")))
    assert len(rows) == 2 and rows[1][0].endswith("caf\\xe9 \\xff.jpg")
