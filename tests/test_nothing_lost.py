"""Issue #12, "Nothing lost, round two": run folders, resume checks, empty data, decode
paths, hostile checkpoint metadata, non-regular files, atomic outputs, annotations, and
every CLI command turning bad input into one ``mlic: error:`` line."""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import mlic
from conftest import TINY_BACKBONE, make_coco, make_voc, no_hang, one_error_line, write_image
from mlic.cli import main
from mlic.config import load_config
from mlic.data import Annotations
from mlic.data.coco import load_coco
from mlic.data.csv import load_csv
from mlic.data.dataset import MultiLabelDataset, SkippedImage, collate_raw, decode_batch
from mlic.data.transforms import build_transform, device_decodable_jpeg, probe_image
from mlic.engine.checkpoint import load_resume, save_checkpoint, save_resume
from mlic.engine.trainer import TrainingStopped, train
from mlic.errors import CheckpointError, ConfigError, DataError, WriteError
from mlic.inference import Predictor

NAMES = ["cat", "dog", "car", "person", "tree"]


def run_cfg(voc: Path, out: Path, name: str, **over: str):
    base = {
        "data.format": "voc",
        "data.root": str(voc),
        "data.image_size": "48",
        "data.batch_size": "8",
        "data.workers": "0",
        "data.randaugment": "false",
        "model.backbone": TINY_BACKBONE,
        "model.pretrained": "false",
        "train.epochs": "1",
        "train.ema": "false",
        "optim.lr": "0.003",
        "run.output_dir": str(out),
        "run.name": name,
        "run.progress": "false",
        "run.tensorboard": "false",
    }
    base.update(over)
    return load_config(None, [f"{k}={v}" for k, v in base.items()])


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder``: (content, mtime in ns)."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def tiny_checkpoint(path: Path, **meta: Any) -> Path:
    model = mlic.create_model("baseline", 5, backbone=TINY_BACKBONE, pretrained=False)
    meta = {"input_size": [3, 32, 32], **meta}
    return save_checkpoint(model, path, NAMES, **meta)


def doctored(src: Path, dst: Path, **changes: Any) -> Path:
    """A copy of checkpoint ``src`` whose metadata values are replaced (a hostile file)."""
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
    meta.update({k: json.dumps(v) for k, v in changes.items()})
    save_file(load_file(str(src)), str(dst), metadata=meta)
    return dst


# ----------------------------------------------------------------------------- run folders
def test_existing_run_name_is_refused_and_the_old_run_untouched(
    tiny_voc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "runs"
    renamed: list[str] = []
    replace = os.replace

    def recording_replace(src: Any, dst: Any) -> None:
        renamed.append(str(Path(dst).relative_to(out / "r")))
        replace(src, dst)

    monkeypatch.setattr("mlic.files.os.replace", recording_replace)
    train(run_cfg(tiny_voc, out, "r"))
    monkeypatch.undo()
    before = snapshot(out / "r")
    assert "best.safetensors" in before and "config.yaml" in before
    assert sorted(before) == sorted(set(renamed))  # every file of the run: temporary + rename
    with pytest.raises(ConfigError) as e:
        train(run_cfg(tiny_voc, out, "r", **{"train.epochs": "2"}))
    msg = str(e.value)
    assert "already exists" in msg and f"--resume {out / 'r'}" in msg
    assert "run.name" in msg and "run.overwrite=true" in msg and "\n" not in msg
    # a run that fails after start-up (bad data) with overwrite=true touches nothing either
    with pytest.raises(DataError):
        train(run_cfg(tiny_voc, out, "r", **{"run.overwrite": "true", "data.val": "nosuch"}))
    assert snapshot(out / "r") == before
    # an explicit overwrite replaces the run, old files included
    (out / "r" / "stale.txt").write_text("from the old run")
    train(run_cfg(tiny_voc, out, "r", **{"run.overwrite": "true", "train.seed": "1"}))
    assert not (out / "r" / "stale.txt").exists()
    assert (out / "r" / "best.safetensors").read_bytes() != before["best.safetensors"][0]


def test_resume_refuses_a_changed_label_set_or_data_with_a_diff(
    tiny_voc: Path, tmp_path: Path
) -> None:
    out = tmp_path / "runs"
    with pytest.raises(TrainingStopped):
        train(run_cfg(tiny_voc, out, "r", **{"train.epochs": "2"}), stop_after_steps=2)
    state = load_resume(out / "r" / "last.resume.pt")
    assert state["signature"]["label_names"] == NAMES
    before = snapshot(out / "r")
    # a class renamed in the annotations: resuming would permute the label columns
    for xml in (tiny_voc / "Annotations").glob("*.xml"):
        xml.write_text(xml.read_text().replace("<name>cat</name>", "<name>kitten</name>"))
    (tiny_voc / "labels.txt").write_text("\n".join(["kitten", *NAMES[1:]]) + "\n")
    with pytest.raises(CheckpointError) as e:
        train(None, resume=out / "r")
    msg = str(e.value)
    assert "cannot resume" in msg and "label set" in msg and "'cat'" in msg and "'kitten'" in msg
    assert snapshot(out / "r") == before  # refused before anything was written
    # labels restored, one training image dropped: the data differ
    for xml in (tiny_voc / "Annotations").glob("*.xml"):
        xml.write_text(xml.read_text().replace("<name>kitten</name>", "<name>cat</name>"))
    (tiny_voc / "labels.txt").write_text("\n".join(NAMES) + "\n")
    split = tiny_voc / "ImageSets" / "Main" / "train.txt"
    split.write_text("\n".join(split.read_text().split()[1:]) + "\n")
    with pytest.raises(CheckpointError, match=r"train data: saved 24 images, now 23"):
        train(None, resume=out / "r")


def test_zero_images_never_train(tiny_voc: Path, tmp_path: Path) -> None:
    (tiny_voc / "ImageSets" / "Main" / "empty.txt").write_text("")
    for over, words in [
        ({"data.val": "empty"}, "val split .*no images to validate on"),
        ({"data.train": "empty"}, "train split .*no images to train on"),
    ]:
        with pytest.raises(DataError, match=words):
            train(run_cfg(tiny_voc, tmp_path / "runs", "z", **over))
    assert not (tmp_path / "runs").exists()  # no run folder, no "best" checkpoint
    for key in ("data.max_train_images=0", "train.max_steps_per_epoch=-1", "data.max_val_images=0"):
        with pytest.raises(ConfigError, match=r"must be >= 1"):
            load_config(None, [key])


# ----------------------------------------------------------------------------- decode paths
def decode_zoo(root: Path) -> dict[str, Path]:
    """Images of every kind the normal decoder accepts (and a truncated one)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:80]
    smooth = np.stack([xx * 3, yy * 4, (xx + yy) * 2], -1).astype(np.uint8)  # [64, 80, 3]
    files = {}

    def put(name: str, img: Image.Image, **kw: Any) -> None:
        files[name] = root / name
        img.save(files[name], **kw)

    put("baseline.jpg", Image.fromarray(smooth), quality=92)
    put("grey.jpg", Image.fromarray(smooth[..., 0]), quality=92)
    put("progressive.jpg", Image.fromarray(smooth), quality=92, progressive=True)
    exif = Image.Exif()
    exif[0x0112] = 6
    put("rotated.jpg", Image.fromarray(smooth), quality=92, exif=exif)
    put("cmyk.jpg", Image.fromarray(smooth).convert("CMYK"), quality=92)
    rgba = np.dstack([smooth, rng.integers(0, 255, (64, 80), dtype=np.uint8)])
    put("alpha.png", Image.fromarray(rgba))
    put("deep.png", Image.fromarray(smooth[..., 0].astype(np.uint16) * 257))
    put("image.tiff", Image.fromarray(smooth))
    frames = [Image.fromarray(smooth), Image.fromarray(255 - smooth)]
    files["anim.gif"] = root / "anim.gif"
    frames[0].save(files["anim.gif"], save_all=True, append_images=frames[1:])
    big = np.kron(smooth, np.ones((4, 4, 1), dtype=np.uint8))  # 256 x 320: DCT-reduced on CPU
    put("big.jpg", Image.fromarray(big), quality=92)
    data = files["baseline.jpg"].read_bytes()
    files["truncated.jpg"] = root / "truncated.jpg"
    files["truncated.jpg"].write_bytes(data[: len(data) // 2])
    return files


def test_gpu_decode_path_gives_the_normal_pixels_or_names_the_file(tmp_path: Path) -> None:
    files = decode_zoo(tmp_path)
    assert Image.open(files["deep.png"]).mode in ("I;16", "I")
    good = [k for k in files if k != "truncated.jpg"]
    size, mean, std = 40, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    ann = Annotations(names=["x"], images=[files[k] for k in good], targets=np.ones((len(good), 1)))
    normal = MultiLabelDataset(ann, build_transform(size, mean, std, train=False), draft_size=size)
    raw = MultiLabelDataset(ann, draft_size=size, raw_bytes=True)
    items = [raw[i] for i in range(len(good))]
    on_device = {k for k, (x, _, _) in zip(good, items, strict=True) if x.ndim == 1}
    assert on_device == {"baseline.jpg", "grey.jpg"}  # everything else: the CPU decoder
    encoded, _ = collate_raw(items)
    batch = decode_batch(encoded, size, mean, std, torch.device("cpu"))  # [B, 3, S, S]
    for i, name in enumerate(good):
        torch.testing.assert_close(batch[i], normal[i][0], rtol=0, atol=0.05, msg=name)
    # the truncated JPEG: refused (never sent to the device), named; skipped when asked
    bad = Annotations(names=["x"], images=[files["truncated.jpg"]], targets=np.ones((1, 1)))
    assert not device_decodable_jpeg(files["truncated.jpg"].read_bytes())
    with pytest.raises(DataError, match=r"^" + str(files["truncated.jpg"]).replace(".", r"\.")):
        MultiLabelDataset(bad, draft_size=size, raw_bytes=True)[0]
    skipped = MultiLabelDataset(bad, draft_size=size, raw_bytes=True, skip_bad=True)[0][0]
    assert isinstance(skipped, SkippedImage) and str(files["truncated.jpg"]) in skipped.message


def test_truncated_jpeg_fails_the_fast_check(tmp_path: Path) -> None:
    files = decode_zoo(tmp_path)
    assert probe_image(files["baseline.jpg"]) == (80, 64)
    with pytest.raises(DataError, match=r"truncated\.jpg: truncated JPEG"):
        probe_image(files["truncated.jpg"])


def test_image_failing_mid_epoch_is_skipped_and_counted(
    tiny_voc: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad = tiny_voc / "JPEGImages" / "000003.jpg"  # a training image
    bad.write_bytes(bad.read_bytes()[:300])  # broken after any start-of-run check
    over = {"data.image_check": "off", "data.skip_bad_images": "true", "data.workers": "1"}
    with caplog.at_level(logging.WARNING, logger="mlic"):
        result = train(run_cfg(tiny_voc, tmp_path, "skip", **over))
    run = result["run_dir"]
    assert (run / "best.safetensors").exists() and result["best_epoch"] == 1
    listed = (run / "bad_images.txt").read_text()
    assert str(bad) in listed and "skipped 1 image(s)" in caplog.text
    assert load_resume(run / "last.resume.pt")["run"]["skipped"] == listed.splitlines()
    with pytest.raises(DataError, match=r"000003\.jpg"):  # without skipping: named, fatal
        train(run_cfg(tiny_voc, tmp_path, "noskip", **{**over, "data.skip_bad_images": "false"}))


# ----------------------------------------------------------------------------- hostile metadata
@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"input_size": [3, 40000, 40000]}, "input_size must be"),
        ({"label_names": "abcde"}, "label_names must be a list of strings"),
        ({"label_names": ["a", "a", "b", "c", "d"]}, r"label_names has duplicates \['a'\]"),
        ({"num_classes": 10**9}, "num_classes must be"),
        ({"std": [0.0, 1.0, 1.0]}, "std must be"),
        ({"thresholds": [0.5]}, "thresholds must be 5 numbers"),
        ({"model_kwargs": {"backbone": TINY_BACKBONE, "pretrained": "/x.pth"}}, "must be false"),
        ({"model_kwargs": {"backbone": {"nested": 1}}}, "not a plain option value"),
        # a model far larger than the file's tensors: refused from shapes, nothing allocated
        ({"model_kwargs": {"backbone": "resnet152"}}, "weights do not match the model"),
    ],
)
def test_hostile_checkpoint_metadata_is_refused(tmp_path: Path, change: dict, words: str) -> None:
    ck = doctored(
        tiny_checkpoint(tmp_path / "ok.safetensors"), tmp_path / "bad.safetensors", **change
    )
    with pytest.raises(CheckpointError, match=words):
        Predictor.from_checkpoint(ck)


# ----------------------------------------------------------------------------- non-regular files
def test_fifos_are_refused_never_opened(
    tiny_voc: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    fifo_img = tiny_voc / "JPEGImages" / "000030.jpg"  # a val image
    fifo_img.unlink()
    os.mkfifo(fifo_img)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  format: voc\n  root: {tiny_voc}\n  workers: 0\n")
    assert no_hang(main, ["data", "check", str(cfg), "-q"]) == 1
    with pytest.raises(DataError, match=r"000030\.jpg: is a FIFO"):
        no_hang(train, run_cfg(tiny_voc, tmp_path, "fifo"))
    ck = tiny_checkpoint(tmp_path / "m.safetensors")
    assert no_hang(main, ["predict", str(ck), str(fifo_img), "-q"]) == 2
    assert "no input could be predicted" in capsys.readouterr().err
    os.mkfifo(tmp_path / "pipe.safetensors")
    with pytest.raises(CheckpointError, match="is a FIFO"):
        no_hang(Predictor.from_checkpoint, tmp_path / "pipe.safetensors")
    os.mkfifo(tmp_path / "pipe.resume.pt")
    with pytest.raises(CheckpointError, match="is a FIFO"):
        no_hang(load_resume, tmp_path / "pipe.resume.pt")


# ----------------------------------------------------------------------------- atomic outputs
def test_predictions_are_written_atomically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    ck = tiny_checkpoint(tmp_path / "m.safetensors")
    write_image(tmp_path / "img" / "a.jpg", 1)
    preds = tmp_path / "preds.csv"
    preds.write_text("earlier predictions\n")
    # every input fails: the earlier file stays
    assert main(["predict", str(ck), str(tmp_path / "nope.jpg"), "--output", str(preds), "-q"]) == 2
    assert "preds.csv left unchanged" in capsys.readouterr().err
    assert preds.read_text() == "earlier predictions\n"

    def disk_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("mlic.files.os.fsync", disk_full)
    assert main(["predict", str(ck), str(tmp_path / "img"), "--output", str(preds), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mlic: error: {preds}: cannot write (disk full") and err.count("\n") == 1
    assert preds.read_text() == "earlier predictions\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img", "m.safetensors", "preds.csv"]
    monkeypatch.undo()
    assert main(["predict", str(ck), str(tmp_path / "img"), "--output", str(preds), "-q"]) == 0
    assert preds.read_text().startswith("image,labels,cat,dog")


def test_full_disk_while_saving_checkpoints_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ck = tiny_checkpoint(tmp_path / "best.safetensors")
    previous = ck.read_bytes()

    def no_space(*args: Any, **kw: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("mlic.engine.checkpoint.save_file", no_space)
    with pytest.raises(WriteError, match=r"best\.safetensors: cannot write \(disk full") as e:
        tiny_checkpoint(ck)
    assert "\n" not in str(e.value) and ck.read_bytes() == previous

    def stream_fails(obj: Any, f: Any) -> None:  # what torch.save's C++ writer raises
        Path(f).write_bytes(b"half")
        raise RuntimeError(
            "[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing "
            "file data/0: file write failed"
        )

    save_resume({"x": torch.ones(2)}, tmp_path / "last.resume.pt")
    monkeypatch.setattr("mlic.engine.checkpoint.torch.save", stream_fails)
    with pytest.raises(WriteError, match=r"last\.resume\.pt: cannot write \(.*file write failed"):
        save_resume({"x": torch.zeros(2)}, tmp_path / "last.resume.pt")
    monkeypatch.undo()
    assert torch.equal(load_resume(tmp_path / "last.resume.pt")["x"], torch.ones(2))
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize(
    ("code", "cause"),
    [(errno.ENOSPC, "disk full"), (errno.EACCES, "permission denied"), (errno.EROFS, "read-only")],
)
def test_write_failures_name_the_file_and_the_cause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, cause: str
) -> None:
    from mlic.files import write_text

    target = write_text(tmp_path / "report.md", "previous")

    def fails(fd: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr("mlic.files.os.fsync", fails)
    with pytest.raises(WriteError) as e:
        write_text(target, "new")
    assert str(e.value).startswith(f"{target}: cannot write ({cause}")
    assert target.read_text() == "previous" and [p.name for p in tmp_path.iterdir()] == [
        "report.md"
    ]


# ----------------------------------------------------------------------------- annotations
def test_annotations_that_would_be_silently_wrong_are_errors(tmp_path: Path) -> None:
    path, img_dir = make_coco(tmp_path / "c", [(1, "person"), (1, "bicycle")], [[1]])
    with pytest.raises(DataError, match=r"duplicate category id 1 \('bicycle' and 'person'\)"):
        load_coco(path, img_dir)
    (tmp_path / "q.csv").write_text('image,labels\na.jpg,"cat;dog\nb.jpg,cat\nc.jpg,dog\n')
    with pytest.raises(DataError, match=r"q\.csv:2: a quoted field runs on .*unbalanced quote"):
        load_csv(tmp_path / "q.csv", tmp_path)
    (tmp_path / "e.csv").write_text('image,labels\na.jpg,cat\nb.jpg,"cat\n')
    with pytest.raises(DataError, match=r"e\.csv:3: .*unbalanced quote"):
        load_csv(tmp_path / "e.csv", tmp_path)
    (tmp_path / "d.csv").write_text("image,labels\nimg/a.jpg,cat\n./img/a.jpg,dog\n")
    with pytest.raises(DataError, match=r"d\.csv:3: duplicate image '\./img/a\.jpg'"):
        load_csv(tmp_path / "d.csv", tmp_path)
    voc = make_voc(tmp_path / "v", {"train": [[("cat", 0)], [("dog", 0)]]})
    from mlic.data.dataset import load_split

    coco_imgs = json.loads(path.read_text())
    coco_imgs["categories"] = [{"id": 1, "name": "person"}]
    coco_imgs["images"].append({"id": 7, "file_name": "./" + coco_imgs["images"][0]["file_name"]})
    path.write_text(json.dumps(coco_imgs))
    cfg = load_config(
        None,
        [
            "data.format=coco",
            f"data.root={path.parent}",
            f"data.train={path.name}",
            f"data.train_images={img_dir.name}",
        ],
    )
    with pytest.raises(DataError, match=r"is listed twice \(entries 1 and 2"):
        load_split(cfg.data, "train")
    assert (
        len(load_split(load_config(None, ["data.format=voc", f"data.root={voc}"]).data, "train"))
        == 2
    )


# ----------------------------------------------------------------------------- the CLI, fuzzed
@pytest.fixture(scope="module")
def fuzz(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Files the malformed CLI calls point at (made once; nothing here is trained)."""
    root = tmp_path_factory.mktemp("fuzz")
    voc = make_voc(
        root / "data",
        {"train": [[("cat", 0)], [("dog", 0)]], "val": [[("cat", 0)]]},
        labels_txt=["cat", "dog"],
    )
    (voc / "ImageSets" / "Main" / "empty.txt").write_text("")
    fifo_voc = make_voc(root / "fifo", {"train": [[("cat", 0)]], "val": [[("cat", 0)]]})
    (fifo_voc / "Annotations" / "000000.xml").unlink()
    os.mkfifo(fifo_voc / "Annotations" / "000000.xml")
    cfg = root / "c.yaml"
    cfg.write_text(
        f"data:\n  format: voc\n  root: {voc}\n  workers: 0\n  image_size: 32\n"
        f"model:\n  backbone: {TINY_BACKBONE}\n  pretrained: false\n"
        f"train:\n  epochs: 1\nrun:\n  output_dir: {root / 'runs'}\n  progress: false\n"
        "  tensorboard: false\n"
    )
    (root / "runs" / "taken").mkdir(parents=True)
    (root / "runs" / "taken" / "best.safetensors").write_bytes(b"an earlier run")
    resume = root / "runs" / "broken"
    resume.mkdir()
    (resume / "config.yaml").write_text(cfg.read_text())
    (resume / "last.resume.pt").write_bytes(b"PK\x03\x04 not a zip")
    (root / "bad.yaml").write_text("data: [unclosed\n")
    (root / "list.yaml").write_text("- a\n- b\n")
    os.mkfifo(root / "pipe.yaml")
    os.mkfifo(root / "pipe.jpg")
    os.mkfifo(root / "pipe.safetensors")
    (root / "junk.safetensors").write_bytes(os.urandom(256))
    (root / "text.jpg").write_text("not an image")
    ck = tiny_checkpoint(root / "m.safetensors")
    paths = {"root": root, "voc": voc, "fifo_voc": fifo_voc, "cfg": cfg, "ck": ck}
    for name, change in {
        "huge": {"input_size": [3, 40000, 40000]},
        "strnames": {"label_names": "abcde"},
        "dupnames": {"label_names": ["a", "a", "b", "c", "d"]},
        "nanstd": {"std": [float("nan"), 1.0, 1.0]},
    }.items():
        paths[name] = doctored(ck, root / f"{name}.safetensors", **change)
    return {k: str(v) for k, v in paths.items()}


# One row per malformed call: (case id, argv with {placeholders}, words the error must contain).
CLI_CASES = [
    ("no-command", [], "required: command"),
    ("unknown-command", ["fly"], "invalid choice"),
    ("train-no-config", ["train"], "give a CONFIG"),
    ("train-missing-config", ["train", "{root}/nope.yaml"], "config file not found"),
    ("train-config-is-folder", ["train", "{root}"], "is a folder"),
    ("train-config-is-fifo", ["train", "{root}/pipe.yaml"], "is a FIFO"),
    ("train-bad-yaml", ["train", "{root}/bad.yaml"], "not valid YAML"),
    ("train-yaml-list", ["train", "{root}/list.yaml"], "list.yaml"),
    ("train-unknown-key", ["train", "{cfg}", "train.epoch=3"], "unknown config key"),
    ("train-bad-type", ["train", "{cfg}", "train.epochs=many"], "train.epochs"),
    ("train-no-equals", ["train", "{cfg}", "epochs"], "must look like key=value"),
    ("train-zero-epochs", ["train", "{cfg}", "train.epochs=0"], "must be > 0"),
    ("train-zero-images", ["train", "{cfg}", "data.max_train_images=0"], "must be >= 1"),
    ("train-negative-steps", ["train", "{cfg}", "train.max_steps_per_epoch=-1"], "must be >= 1"),
    ("train-negative-workers", ["train", "{cfg}", "data.workers=-2"], "data.workers"),
    ("train-huge-image-size", ["train", "{cfg}", "data.image_size=100000"], "data.image_size"),
    ("train-run-name-path", ["train", "{cfg}", "run.name=../escape"], "run.name"),
    ("train-run-name-taken", ["train", "{cfg}", "run.name=taken"], "already exists"),
    ("train-missing-root", ["train", "{cfg}", "data.root={root}/nowhere"], "not found"),
    ("train-missing-split", ["train", "{cfg}", "data.val=nosuch"], "not found"),
    ("train-empty-val", ["train", "{cfg}", "data.val=empty"], "no images to validate on"),
    ("train-fifo-annotation", ["train", "{cfg}", "data.root={fifo_voc}"], "is a FIFO"),
    ("train-bad-format", ["train", "{cfg}", "data.format=parquet"], "data.format"),
    ("train-resume-missing", ["train", "--resume", "{root}/runs/nope"], "nope"),
    ("train-resume-garbage", ["train", "--resume", "{root}/runs/broken"], "resume state"),
    ("demo-bad-override", ["demo", "optim.lr=-1"], "optim.lr"),
    ("eval-missing", ["eval", "{root}/nope.safetensors"], "no such run folder"),
    ("eval-junk", ["eval", "{root}/junk.safetensors"], "not a safetensors checkpoint"),
    ("eval-fifo", ["eval", "{root}/pipe.safetensors"], "is a FIFO"),
    ("eval-bad-split", ["eval", "{ck}", "--split", "test"], "invalid choice"),
    ("eval-huge-input", ["eval", "{huge}"], "input_size must be"),
    ("predict-junk", ["predict", "{root}/junk.safetensors", "{root}/text.jpg"], "safetensors"),
    ("predict-huge-input", ["predict", "{huge}", "{root}/text.jpg"], "input_size must be"),
    ("predict-string-names", ["predict", "{strnames}", "x.jpg"], "label_names must be a list"),
    ("predict-dup-names", ["predict", "{dupnames}", "x.jpg"], "label_names has duplicates"),
    ("predict-nan-std", ["predict", "{nanstd}", "x.jpg"], "std must be"),
    ("predict-batch-0", ["predict", "{ck}", "x.jpg", "--batch-size", "0"], "must be >= 1"),
    ("predict-batch-word", ["predict", "{ck}", "x.jpg", "--batch-size", "lots"], "not int"),
    ("predict-top-k-neg", ["predict", "{ck}", "x.jpg", "--top-k", "-1"], "must be >= 1"),
    ("predict-threshold-2", ["predict", "{ck}", "x.jpg", "--threshold", "2"], "in [0.0, 1.0]"),
    ("predict-threshold-nan", ["predict", "{ck}", "x.jpg", "--threshold", "nan"], "finite"),
    (
        "predict-output-txt",
        ["predict", "{ck}", "x.jpg", "--output", "{root}/p.txt"],
        ".csv or .jsonl",
    ),
    ("predict-all-missing", ["predict", "{ck}", "{root}/nope.jpg", "-q"], "no input could be"),
    ("predict-not-image", ["predict", "{ck}", "{root}/text.jpg", "-q"], "not an image file"),
    ("predict-fifo-input", ["predict", "{ck}", "{root}/pipe.jpg", "-q"], "is a FIFO"),
    ("predict-bad-backend", ["predict", "{ck}", "x.jpg", "--backend", "tf"], "invalid choice"),
    ("export-junk", ["export", "{root}/junk.safetensors"], "not a safetensors checkpoint"),
    ("export-bad-format", ["export", "{ck}", "--format", "tflite"], "invalid choice"),
    ("export-size-0", ["export", "{ck}", "--image-size", "0"], "in [16, 4096]"),
    ("export-int8-torchscript", ["export", "{ck}", "--format", "torchscript", "--int8"], "--int8"),
    ("export-hostile", ["export", "{dupnames}"], "label_names has duplicates"),
    ("data-bad-action", ["data", "fix", "{cfg}"], "invalid choice"),
    ("data-missing-config", ["data", "check", "{root}/nope.yaml"], "config file not found"),
    ("data-fifo-annotation", ["data", "check", "{cfg}", "data.root={fifo_voc}"], "is a FIFO"),
    ("data-workers-0", ["data", "check", "{cfg}", "--workers", "0"], "must be >= 1"),
    ("data-stats-bad-key", ["data", "stats", "{cfg}", "data.rot=x"], "unknown config key"),
    ("bench-unknown-model", ["bench", "nosuchmodel", "--backbone", TINY_BACKBONE], "nosuchmodel"),
    ("bench-batch-0", ["bench", "baseline", "--batch-size", "0"], "must be >= 1"),
    ("bench-bad-device", ["bench", "baseline", "--device", "tpu"], "invalid choice"),
    (
        "bench-data-missing",
        [
            "bench",
            "baseline",
            "--backbone",
            TINY_BACKBONE,
            "--image-size",
            "32",
            "--data",
            "{root}/nowhere",
        ],
        "nowhere",
    ),
    ("models-size-0", ["models", "--image-size", "0"], "in [16, 4096]"),
    (
        "models-bad-backbone",
        ["models", "baseline", "--backbone", "nosuchnet", "--no-flops"],
        "nosuchnet",
    ),
]


@pytest.mark.parametrize(("case", "argv", "words"), CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_is_one_error_line(
    fuzz: dict[str, str], case: str, argv: list[str], words: str, capsys: pytest.CaptureFixture
) -> None:
    line = one_error_line([a.format(**fuzz) for a in argv], capsys)
    assert words in line, line
