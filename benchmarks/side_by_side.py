"""mlic's fast paths against a plain reference written the way published repositories do it.

One run, one machine, same images and models; every row is a ratio of two timings taken
here, in this process:

* data pipeline (per worker, in-process): ``PIL.open -> convert -> Resize -> ToTensor ->
  Normalize`` (torchvision.transforms v1) vs mlic's decoder (JPEG DCT-domain downscaling,
  EXIF, uint8 tensor resize) + the same augmentation;
* training epoch (data + step on the same cores): fp32 NCHW eager, reference pipeline,
  ``loss.item()`` every step vs mlic's channels_last + pipeline, no per-step host sync;
* inference: eager fp32 PyTorch vs ONNX Runtime int8 (static QDQ, calibrated on 32
  validation images), with the mAP change on the validation images;
* mAP of 50,000 x 80 scores: a per-class, per-sample Python loop (ML-GCN's
  AveragePrecisionMeter style) vs ``mlic.metrics``.

    python benchmarks/side_by_side.py --data data/demo --checkpoint runs/demo/best.safetensors
    python benchmarks/side_by_side.py --data data/demo --model msformer:resnet101 --num-images 64 --batch-size 8

With ``--model`` (no checkpoint) a freshly initialised model of that architecture is timed
(speed does not depend on the weights; no mAP change is reported for it).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

import mlic
from mlic.bench import random_labelset
from mlic.config import load_config
from mlic.data.dataset import load_split
from mlic.data.transforms import build_transform, load_image
from mlic.export import export_checkpoint, quantize_onnx_int8
from mlic.inference import OnnxPredictor, Predictor
from mlic.losses import build_loss
from mlic.metrics import average_precision_per_class


def reference_ap(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """mAP the way many multi-label repositories compute it: a Python loop over classes and samples."""
    aps = []
    for k in range(scores.shape[1]):
        s, t = scores[:, k], targets[:, k]
        _, order = torch.sort(s, descending=True)
        pos, total, prec = 0.0, 0.0, 0.0
        for i in order:
            label = t[i]
            if label < 0:  # ignored
                continue
            total += 1
            if label == 1:
                pos += 1
                prec += pos / total
        if pos > 0:
            aps.append(prec / pos)
    return float(np.mean(aps))


def large_jpegs(images: list[Path], out: Path, size: tuple[int, int] = (640, 480)) -> list[Path]:
    """COCO-sized JPEGs (640 x 480) made from the demo photographs."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for p in images:
        q = out / p.name
        Image.open(p).convert("RGB").resize(size, Image.BICUBIC).save(q, quality=90)
        paths.append(q)
    return paths


def timed(fn, *args) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/demo", help="demo data root (generated if absent)")
    ap.add_argument("--checkpoint", help="a trained checkpoint (demo): its model is timed")
    ap.add_argument("--model", help="name:backbone to time with fresh weights instead")
    ap.add_argument("--skip-map", action="store_true", help="skip the 50,000 x 80 mAP row")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--num-images", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    torch.manual_seed(0)
    s = args.image_size
    cfg = load_config(None, ["data.format=demo", f"data.root={args.data}"])
    train_ann = load_split(cfg.data, "train")
    val_ann = load_split(cfg.data, "val", class_names=train_ann.names)
    tmp = Path(tempfile.mkdtemp())
    files = large_jpegs(train_ann.images[: args.num_images], tmp / "train")
    targets = torch.from_numpy(train_ann.targets[: args.num_images].clip(0).astype(np.float32))
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    print(
        f"# side by side, {torch.get_num_threads()} threads, {len(files)} images of 640x480 -> {s} px\n"
    )
    rows = []

    # --- data pipeline, per worker
    ref_tf = T.Compose(
        [T.Resize((s, s)), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)]
    )
    mlic_tf = build_transform(s, mean, std, train=True, randaugment=False)
    t_ref, _ = timed(lambda: [ref_tf(Image.open(p).convert("RGB")) for p in files])
    t_mlic, _ = timed(lambda: [mlic_tf(load_image(p, draft_size=s)) for p in files])
    rows.append(("data pipeline, img/s per worker", len(files) / t_ref, len(files) / t_mlic))

    # --- training epoch (data + step), baseline EfficientNet-Lite0
    if args.checkpoint:
        ckpt = Path(args.checkpoint)
        meta0 = mlic.engine.checkpoint.read_metadata(ckpt)
        name, backbone = meta0["model"], meta0["model_kwargs"]["backbone"]
    else:
        name, backbone = args.model.split(":")
        labels = random_labelset(len(train_ann.names))
        fresh = mlic.create_model(name, len(train_ann.names), labels=labels, backbone=backbone)
        ckpt = mlic.save_checkpoint(
            fresh, tmp / "fresh.safetensors", train_ann.names, input_size=[3, s, s]
        )
    print(f"model: {name} ({backbone})\n")

    def epoch(tf, loader_fn, channels_last: bool, sync_every_step: bool) -> float:
        model = mlic.load_checkpoint(ckpt)[0].train()
        if channels_last:
            model.to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        loss_fn = build_loss("bce")
        model.train()
        warm = torch.randn(
            args.batch_size, 3, s, s
        )  # one untimed step: kernel selection, allocation
        if channels_last:
            warm = warm.contiguous(memory_format=torch.channels_last)
        loss_fn(model(warm), targets[: args.batch_size]).backward()
        opt.zero_grad()
        t0 = time.perf_counter()
        acc = torch.zeros(())
        for i in range(0, len(files), args.batch_size):
            x = torch.stack([tf(loader_fn(p)) for p in files[i : i + args.batch_size]])
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            loss = loss_fn(model(x), targets[i : i + args.batch_size])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if sync_every_step:
                _ = loss.item()
            else:
                acc += loss.detach()
        float(acc)
        return len(files) / (time.perf_counter() - t0)

    # one epoch = the 256 images, after one untimed warm-up step
    ref_train = epoch(ref_tf, lambda p: Image.open(p).convert("RGB"), False, True)
    mlic_train = epoch(mlic_tf, lambda p: load_image(p, draft_size=s), True, False)
    rows.append(("training epoch (data + step), img/s", ref_train, mlic_train))

    # --- inference: eager fp32 vs ONNX Runtime int8, and the mAP change
    onnx = export_checkpoint(ckpt, tmp / "model.onnx").path
    meta = mlic.engine.checkpoint.read_metadata(ckpt)
    size = int(meta["input_size"][-1])
    tf = build_transform(size, meta["mean"], meta["std"], train=False)
    calib = torch.stack([tf(load_image(p)) for p in val_ann.images[:32]])
    int8 = quantize_onnx_int8(onnx, tmp / "model.int8.onnx", calib)
    eager, q = (
        Predictor.from_checkpoint(ckpt),
        OnnxPredictor.from_checkpoint(int8, threads=torch.get_num_threads()),
    )
    val_x = torch.stack(
        [tf(load_image(p)) for p in val_ann.images]
    )  # decoded once: time the model only
    eager.predict_tensor(val_x[:8])
    q.predict_tensor(val_x[:8])

    def batched(pred: Predictor, b: int = 16) -> np.ndarray:
        return np.concatenate(
            [pred.predict_tensor(val_x[i : i + b])[0] for i in range(0, len(val_x), b)]
        )

    fp32 = OnnxPredictor.from_checkpoint(onnx, threads=torch.get_num_threads())
    t_e, p_e = timed(batched, eager)
    t_f, _ = timed(batched, fp32)
    t_q, p_q = timed(batched, q)
    rows.append(
        ("inference batch 16, img/s (eager fp32 vs ORT fp32)", len(val_x) / t_e, len(val_x) / t_f)
    )
    rows.append(
        ("inference batch 16, img/s (eager fp32 vs ORT int8)", len(val_x) / t_e, len(val_x) / t_q)
    )
    map_e = np.nanmean(average_precision_per_class(p_e, val_ann.targets))
    map_q = np.nanmean(average_precision_per_class(p_q, val_ann.targets))

    # --- mAP of 50,000 x 80
    if args.skip_map:
        return report(rows, args.checkpoint, map_e, map_q, len(val_x))
    g = torch.Generator().manual_seed(0)
    sc = torch.rand(50_000, 80, generator=g)
    tg = (torch.rand(50_000, 80, generator=g) < 0.05).to(torch.int8)
    t_ref_map, ref_map = timed(reference_ap, sc, tg)
    average_precision_per_class(sc.numpy(), tg.numpy())  # warm-up: first-touch page faults
    t_mlic_map, ap_mlic = min(
        timed(average_precision_per_class, sc.numpy(), tg.numpy()) for _ in range(3)
    )
    assert abs(ref_map - float(np.nanmean(ap_mlic))) < 1e-6, "the two mAPs must agree"
    rows.append(("mAP of 50,000 x 80, computations/s", 1 / t_ref_map, 1 / t_mlic_map))

    report(rows, args.checkpoint, map_e, map_q, len(val_x))


def report(rows: list, trained: str | None, map_e: float, map_q: float, n: int) -> None:
    print("| measurement | reference | mlic | ratio |")
    print("|---|---:|---:|---:|")
    for name, ref, fast in rows:
        print(f"| {name} | {ref:.3g} | {fast:.3g} | **{fast / ref:.2f}x** |")
    if trained:
        print(f"\nint8 mAP on the {n} demo val images: fp32 {100 * map_e:.2f} -> int8 {100 * map_q:.2f} "
              f"({100 * (map_q - map_e):+.2f} points)")  # fmt: skip


if __name__ == "__main__":
    main()
