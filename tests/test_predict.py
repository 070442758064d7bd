"""Using a trained model from its checkpoint alone: predict, explain, thresholds, export."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mlic
from conftest import TINY_BACKBONE, make_voc
from mlic.cli import main
from mlic.config import load_config
from mlic.engine.checkpoint import read_metadata
from mlic.engine.trainer import train

NAMES = ["cat", "dog", "car", "person", "tree"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(checkpoint, VOC folder) of a baseline trained for a few steps on a tiny generated set."""
    root = tmp_path_factory.mktemp("predict")
    rng = np.random.default_rng(0)

    def sample(n):
        return [[(NAMES[c], 0) for c in rng.choice(5, size=2, replace=False)] for _ in range(n)]

    voc = make_voc(root, {"train": sample(16), "val": sample(10)}, labels_txt=NAMES)
    over = {
        "data.format": "voc",
        "data.root": str(voc),
        "data.image_size": "64",
        "data.batch_size": "8",
        "data.workers": "0",
        "model.backbone": TINY_BACKBONE,
        "model.pretrained": "false",
        "train.epochs": "1",
        "run.output_dir": str(root / "runs"),
        "run.name": "p",
        "run.progress": "false",
        "run.tensorboard": "false",
    }
    train(load_config(None, [f"{k}={v}" for k, v in over.items()]))
    return root / "runs" / "p" / "best.safetensors", voc


def test_predictor_accepts_every_input_kind(trained: tuple[Path, Path]) -> None:
    ckpt, voc = trained
    pred = mlic.Predictor.from_checkpoint(ckpt)
    path = sorted((voc / "JPEGImages").glob("*.jpg"))[0]
    pil = Image.open(path).convert("RGB")
    arr = np.asarray(pil)
    tensor = torch.from_numpy(arr.copy()).permute(2, 0, 1)  # [3, H, W] uint8
    by_path, by_pil, by_arr = pred.predict([path, pil, arr])
    by_tensor = pred.predict(tensor.unsqueeze(0))[0]
    for other in (by_pil, by_arr):
        np.testing.assert_allclose(other.probabilities, by_path.probabilities, atol=1e-6)
    # tensor inputs are resized by interpolation instead of PIL: close, not identical
    np.testing.assert_allclose(by_tensor.probabilities, by_path.probabilities, atol=0.05)
    assert set(by_path.scores) == set(NAMES)
    # labels: above the checkpoint's calibrated per-class thresholds (0.5 where none are stored)
    thr = dict(
        zip(NAMES, pred.thresholds if pred.thresholds is not None else [0.5] * 5, strict=True)
    )
    assert by_path.labels == [
        n for n in sorted(NAMES, key=lambda n: -by_path.scores[n]) if by_path.scores[n] >= thr[n]
    ]
    assert by_path.thresholds == pytest.approx(thr)
    top1 = pred.predict(path, threshold=0.0, top_k=1)[0]
    assert len(top1.labels) == 1 and top1.labels[0] == max(by_path.scores, key=by_path.scores.get)
    with_maps = pred.predict(path, return_attention=True)[0]
    assert with_maps.attention.shape[0] == len(NAMES)


def test_cli_predict_skips_broken_files_and_writes_csv(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    ckpt, voc = trained
    folder = tmp_path / "imgs" / "nested"
    folder.mkdir(parents=True)
    for p in sorted((voc / "JPEGImages").glob("*.jpg"))[:5]:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "broken.jpg").write_text("this is not a JPEG")
    out = tmp_path / "pred.csv"
    code = main(
        [
            "predict",
            str(ckpt),
            str(tmp_path / "imgs"),
            str(tmp_path / "missing.png"),
            "--output",
            str(out),
            "-q",
        ]
    )
    assert code == 1  # some inputs failed, the rest were predicted
    rows = list(csv.reader(out.open()))
    thr_cols = [f"threshold:{n}" for n in NAMES]
    assert rows[0] == ["image", "labels", *NAMES, *thr_cols] and len(rows) == 6
    # each row says which threshold each label was compared with: the checkpoint's
    stored = read_metadata(ckpt)["thresholds"]
    for r in rows[1:]:
        np.testing.assert_allclose([float(v) for v in r[7:]], stored, atol=1e-6)
        probs = dict(zip(NAMES, map(float, r[2:7]), strict=True))
        above = {n for n, t in zip(NAMES, stored, strict=True) if probs[n] >= t}
        assert set(filter(None, r[1].split(";"))) == above
    assert all(Path(r[0]).name != "broken.jpg" for r in rows[1:])
    jsonl = tmp_path / "pred.jsonl"
    assert (
        main(
            [
                "predict",
                str(ckpt),
                str(folder / "0*.jpg"),
                "--output",
                str(jsonl),
                "-q",
                "--threshold",
                "0.0",
                "--top-k",
                "2",
            ]
        )
        == 0
    )
    lines = [json.loads(x) for x in jsonl.read_text().splitlines()]
    assert len(lines) == 5 and all(len(x["labels"]) == 2 for x in lines)


def test_cli_predict_heatmaps(
    trained: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt, voc = trained
    image = sorted((voc / "JPEGImages").glob("*.jpg"))[0]
    heat = tmp_path / "heat"
    assert (
        main(
            [
                "predict",
                str(ckpt),
                str(image),
                "--threshold",
                "0.0",
                "--top-k",
                "3",
                "--heatmaps",
                str(heat),
                "-q",
            ]
        )
        == 0
    )
    assert "image" in capsys.readouterr().out
    overlays = sorted(heat.glob("*__*.png"))
    grids = [p for p in overlays if p.name.endswith("__grid.png")]
    assert len(grids) == 1 and len(overlays) == 4  # 3 labels + the grid
    assert Image.open(overlays[0]).size == Image.open(image).size


def test_eval_tunes_thresholds_that_predict_uses(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    src, voc = trained
    ckpt = tmp_path / "m.safetensors"
    ckpt.write_bytes(src.read_bytes())
    assert (
        main(
            [
                "eval",
                str(ckpt),
                "data.format=voc",
                f"data.root={voc}",
                "data.workers=0",
                "run.progress=false",
                "--tune-thresholds",
                "--output",
                str(tmp_path / "ev"),
            ]
        )
        == 0
    )
    thr = read_metadata(ckpt)["thresholds"]
    assert len(thr) == 5 and all(0.0 <= t <= 1.0 for t in thr)
    report = (tmp_path / "ev" / "report.md").read_text()
    for section in ("co-occurrence", "false positives", "false negatives"):
        assert section in report
    assert (tmp_path / "ev" / "cooccurrence.png").exists()
    pred = mlic.Predictor.from_checkpoint(ckpt)
    p = pred.predict(sorted((voc / "JPEGImages").glob("*.jpg"))[0])[0]
    assert p.labels == [
        n for n in sorted(NAMES, key=lambda n: -p.scores[n]) if p.scores[n] >= thr[NAMES.index(n)]
    ]


def test_eval_tunes_for_a_precision_target_and_says_it_is_in_sample(
    trained: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src, voc = trained
    ckpt = tmp_path / "m.safetensors"
    ckpt.write_bytes(src.read_bytes())
    args = ["eval", str(ckpt), "data.format=voc", f"data.root={voc}", "data.workers=0", "-q"]
    with caplog.at_level("WARNING", logger="mlic"):
        code = main(
            [*args, "--tune-thresholds", "--objective", "precision:0.8", "--rule", "global"]
        )
    assert code == 0
    meta = read_metadata(ckpt)
    assert meta["threshold_objective"] == "precision:0.8" and meta["threshold_rule"] == "global"
    assert meta["thresholds_from"].startswith("voc val split 'val' (mlic eval --tune-thresholds)")
    assert len(meta["threshold_n_pos"]) == 5
    text = caplog.text
    assert f"wrote the new thresholds (rule global) into {ckpt}" in text
    assert "in-sample" in text and "selected its weights on" in text
    # the target is met on the split the thresholds were chosen on (overall precision: one cut)
    metrics = json.loads((ckpt.parent / "eval-val" / "metrics.json").read_text())["metrics"]
    if meta["threshold_unmet"][0]:  # one global cut: unmet for all, and then said
        assert "not reached" in text
    else:
        assert metrics["tuned_OP"] >= 0.8 - 1e-9
    # --objective without --tune-thresholds is a one-line error, nothing written
    before = ckpt.read_bytes()
    assert main([*args, "--objective", "recall:0.9"]) == 2
    assert ckpt.read_bytes() == before


def test_cli_export_onnx_agrees_with_eager_and_predicts(
    trained: tuple[Path, Path], tmp_path: Path
) -> None:
    src, voc = trained
    ckpt = tmp_path / "m.safetensors"
    ckpt.write_bytes(src.read_bytes())
    assert main(["export", str(ckpt), "--format", "onnx"]) == 0
    onnx_path = ckpt.with_suffix(".onnx")
    assert onnx_path.exists()
    from mlic.export import verify_onnx
    from mlic.inference import OnnxPredictor

    model, _ = mlic.load_checkpoint(ckpt)
    assert verify_onnx(onnx_path, model, 64, batch_sizes=(1, 4)) < 1e-4
    images = sorted((voc / "JPEGImages").glob("*.jpg"))[:3]
    eager = mlic.Predictor.from_checkpoint(ckpt).predict(images)  # the default: as exported
    onnx = OnnxPredictor.from_checkpoint(onnx_path).predict(images)
    for a, b in zip(eager, onnx, strict=True):
        np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-4)
        assert a.labels == b.labels
    out = tmp_path / "o.jsonl"
    assert (
        main(
            [
                "predict",
                str(onnx_path),
                *map(str, images),
                "--backend",
                "onnxruntime",
                "--output",
                str(out),
                "-q",
            ]
        )
        == 0
    )
    assert len(out.read_text().splitlines()) == 3


def test_cli_export_int8_calibrated_on_images(trained: tuple[Path, Path], tmp_path: Path) -> None:
    src, voc = trained
    ckpt = tmp_path / "m.safetensors"
    ckpt.write_bytes(src.read_bytes())
    code = main(
        [
            "export",
            str(ckpt),
            "--int8",
            "--calibration",
            str(voc / "JPEGImages"),
            "--calibration-images",
            "8",
        ]
    )
    assert code == 0
    int8 = ckpt.with_suffix(".int8.onnx")
    import onnx

    from mlic.export import read_export_metadata
    from mlic.inference import OnnxPredictor

    graph = onnx.load(str(int8))
    assert any(n.op_type == "QuantizeLinear" for n in graph.graph.node)
    assert read_export_metadata(int8)["label_names"] == NAMES
    images = sorted((voc / "JPEGImages").glob("*.jpg"))[:4]
    fp32 = OnnxPredictor.from_checkpoint(ckpt.with_suffix(".onnx")).predict(images)
    q = OnnxPredictor.from_checkpoint(int8).predict(images)
    diff = max(
        float(np.abs(a.probabilities - b.probabilities).max()) for a, b in zip(fp32, q, strict=True)
    )
    assert 0 < diff < 0.1  # quantized: close to, but not the same as, fp32


def test_predict_and_serve_default_to_fp32(trained: tuple[Path, Path]) -> None:
    """Without --precision, predict (CLI and Python) and serve compute in fp32 on every CPU, so
    their probabilities are the exported graph's to 1e-4, also where auto would pick bf16."""
    from mlic.cli import build_parser
    from mlic.serve.app import ServeConfig

    src, _ = trained
    parser = build_parser()
    assert parser.parse_args(["predict", str(src), "x.jpg"]).precision == "fp32"
    assert parser.parse_args(["serve", str(src)]).precision == "fp32"
    assert ServeConfig(target=str(src)).precision == "fp32"
    assert mlic.Predictor.from_checkpoint(src).precision.name == "fp32"
    # the agreement itself: test_cli_export_onnx_agrees_with_eager_and_predicts, at the default


def test_the_table_shows_the_threshold_each_label_was_compared_with() -> None:
    from mlic.inference import Prediction
    from mlic.predict import format_table

    p = Prediction(
        labels=["dog"],
        scores={"dog": 0.91, "cat": 0.40, "car": 0.05},
        probabilities=np.array([0.91, 0.40, 0.05]),
        thresholds={"dog": 0.42, "cat": 0.55, "car": 0.3},
        source="photo.jpg",
    )
    table = format_table([p]).splitlines()
    assert "probability/threshold" in table[0]
    # cat at 0.40 is below its own threshold 0.55: not a label, and the table shows why
    assert table[1].split() == [
        "photo.jpg",
        "dog",
        "dog",
        "0.91/0.42",
        "cat",
        "0.40/0.55",
        "car",
        "0.05/0.30",
    ]
