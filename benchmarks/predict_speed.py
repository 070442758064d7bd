"""Latency and throughput of ``mlic predict``: eager PyTorch vs ONNX Runtime, same run, same images.

For each model: a checkpoint (a trained one, or a freshly initialised one of the right
architecture: speed does not depend on the weights), exported once to ONNX (verified
against eager), then both backends predict the same JPEG files through the same
Predictor code path (decode, resize, normalise, forward, thresholds):

* single-image latency: median over ``--repeats`` calls of ``predict(path)``;
* batch throughput: images/s of ``predict(paths, batch_size=B)``.

    python benchmarks/predict_speed.py --images data/demo/VOCdevkit/VOC2007/JPEGImages \
        --checkpoint runs/demo/best.safetensors --model msformer:resnet101:448
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import mlic
from mlic.bench import random_labelset
from mlic.export import export_checkpoint
from mlic.inference import OnnxPredictor, Predictor


def fresh_checkpoint(spec: str, out: Path) -> Path:
    """``name:backbone:size`` -> a randomly initialised 80-class checkpoint."""
    name, backbone, size = spec.split(":")
    labels = random_labelset(80)
    model = mlic.create_model(name, 80, labels=labels, backbone=backbone, pretrained=False).eval()
    path = out / f"{name}-{backbone}-{size}.safetensors"
    s = int(size)
    return mlic.save_checkpoint(model, path, labels.names, input_size=[3, s, s])


def measure(pred: Predictor, images: list[Path], repeats: int, batch: int) -> tuple[float, float]:
    pred.predict(images[:2])  # warm-up
    lat = []
    for i in range(repeats):
        t0 = time.perf_counter()
        pred.predict(images[i % len(images)])
        lat.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    pred.predict(images, batch_size=batch)
    return statistics.median(lat) * 1e3, len(images) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", required=True, help="folder of JPEGs")
    ap.add_argument("--checkpoint", action="append", default=[], help="trained checkpoint(s)")
    ap.add_argument(
        "--model", action="append", default=[], help="name:backbone:size, fresh weights"
    )
    ap.add_argument("--num-images", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    images = sorted(Path(args.images).glob("*.jpg"))[: args.num_images]
    tmp = Path(tempfile.mkdtemp())
    ckpts = [Path(c) for c in args.checkpoint] + [fresh_checkpoint(m, tmp) for m in args.model]
    print(f"torch threads: {torch.get_num_threads()}; {len(images)} images")
    print(f"| model | input | backend | latency ms (1 image) | img/s (batch {args.batch_size}) |")
    print("|---|---|---|---:|---:|")
    for ckpt in ckpts:
        meta = mlic.engine.checkpoint.read_metadata(ckpt)
        onnx = export_checkpoint(ckpt, tmp / (ckpt.stem + ".onnx"))
        n = min(len(images), args.num_images if meta["input_size"][-1] < 300 else 16)
        for backend, pred in (
            ("eager PyTorch", Predictor.from_checkpoint(ckpt)),
            (
                "ONNX Runtime",
                OnnxPredictor.from_checkpoint(onnx.path, threads=torch.get_num_threads()),
            ),
        ):
            lat, thr = measure(pred, images[:n], min(args.repeats, n), args.batch_size)
            desc = f"{meta['model']} ({meta['model_kwargs'].get('backbone')})"
            print(
                f"| {desc} | {meta['input_size'][-1]} px | {backend} | {lat:.1f} | {thr:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
