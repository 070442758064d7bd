"""mlic's fast paths against a plain reference written the way published repositories do it.

One run, one machine, same images and models; every row is a ratio of two timings taken
by this script in the same run:

* data pipeline, per worker (1 thread, as in a data-loader worker): ``PIL.open -> convert
  -> Resize -> ToTensor -> Normalize`` (torchvision.transforms v1) vs mlic's
  ``decode_image`` (libjpeg-turbo, JPEG DCT-domain downscaling) + the same augmentation on
  uint8 tensors;
* training epoch (data + step on the same cores, data inline): fp32 NCHW eager, the
  reference pipeline, ``loss.item()`` every step, BLAS linears and attention-weight dropout
  0.1 (DETR/Query2Label code) vs mlic's pipeline, channels_last, no per-step host sync, the
  oneDNN linears and the fused attention kernel, freed memory kept in the process;
* inference: eager fp32 PyTorch (freed memory kept, as ``mlic predict`` runs it) vs ONNX
  Runtime fp32 and int8 (static QDQ, calibrated on 32
  validation images), with the mAP change on the validation images;
* mAP of 50,000 x 80 scores: a per-class, per-sample Python loop (ML-GCN's
  AveragePrecisionMeter style) vs ``mlic.metrics``.

The data and training rows run every measurement in a fresh process (so neither side
inherits the other's warmed-up allocator, caches or threads), alternating reference and
mlic for ``--rounds`` rounds; the table gives the median of each side, and the spread of
the per-round ratios.

    python benchmarks/side_by_side.py --data data/demo --checkpoint runs/demo/best.safetensors
    python benchmarks/side_by_side.py --data data/demo --model msformer:resnet101 --num-images 32 --batch-size 8 --skip-map

With ``--model`` (no checkpoint) a freshly initialised model of that architecture is timed
(speed does not depend on the weights; no mAP change is reported for it).
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

import mlic
from mlic.bench import random_labelset
from mlic.config import load_config
from mlic.data.dataset import load_split
from mlic.data.transforms import build_transform, decode_image, load_image
from mlic.export import export_checkpoint, quantize_onnx_int8
from mlic.inference import OnnxPredictor, Predictor
from mlic.losses import build_loss
from mlic.metrics import average_precision_per_class

MEAN = STD = (0.5, 0.5, 0.5)


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


# ----------------------------------------------------------------------------- one side
def pipeline(side: str, s: int):
    """path -> normalised float [3, s, s]: the reference's or mlic's training pipeline."""
    if side == "ref":
        tf = T.Compose(
            [T.Resize((s, s)), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)]
        )
        return lambda p: tf(Image.open(p).convert("RGB"))
    tf = build_transform(s, MEAN, STD, train=True, randaugment=False)
    return lambda p: tf(decode_image(p, draft_size=s))


def data_rate(side: str, files: list[Path], s: int) -> float:
    """Images/s of one side's pipeline on one thread (a data-loader worker's setting)."""
    torch.set_num_threads(1)
    load = pipeline(side, s)
    load(files[0])  # imports, first-call set-up
    t0 = time.perf_counter()
    for p in files:
        load(p)
    return len(files) / (time.perf_counter() - t0)


def train_rate(
    side: str, ckpt: Path, files: list[Path], targets: torch.Tensor, s: int, batch: int
) -> float:
    """Images/s of one epoch (decode + augment + step, inline) after one untimed step."""
    from mlic.models import _layers as layers

    fast = side == "mlic"
    if fast:
        from mlic.host import retain_freed_memory

        retain_freed_memory()
    else:
        layers.ONEDNN_LINEAR_MIN_ROWS = 2**62  # every linear through BLAS
    model = mlic.load_checkpoint(ckpt)[0].train()
    if not fast:
        for m in model.modules():
            if isinstance(m, layers.CrossAttention):
                m.dropout = 0.1  # DETR/Q2L attention dropout: the unfused path on CPU
    layout = torch.channels_last if fast else torch.contiguous_format
    model.to(memory_format=layout)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = build_loss("bce")
    load = pipeline(side, s)
    warm = torch.randn(batch, 3, s, s).contiguous(memory_format=layout)
    loss_fn(model(warm), targets[:batch]).backward()  # kernel selection, allocation
    opt.zero_grad()
    t0 = time.perf_counter()
    acc = torch.zeros(())
    for i in range(0, len(files), batch):
        x = torch.stack([load(p) for p in files[i : i + batch]]).contiguous(memory_format=layout)
        loss = loss_fn(model(x), targets[i : i + batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if fast:
            acc += loss.detach()
        else:
            _ = loss.item()  # the published loops log every step
    float(acc)
    return len(files) / (time.perf_counter() - t0)


def alternate(fn, rounds: int, *args) -> tuple[float, float, list[float]]:
    """Median ref and mlic rates over ``rounds`` rounds, each call in a fresh process."""
    ctx = multiprocessing.get_context("spawn")
    rates = {"ref": [], "mlic": []}
    for _ in range(rounds):
        for side in ("ref", "mlic"):
            with ProcessPoolExecutor(1, mp_context=ctx) as pool:
                rates[side].append(pool.submit(fn, side, *args).result())
    ratios = [m / r for r, m in zip(rates["ref"], rates["mlic"], strict=True)]
    return statistics.median(rates["ref"]), statistics.median(rates["mlic"]), ratios


# ----------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/demo", help="demo data root (generated if absent)")
    ap.add_argument("--checkpoint", help="a trained checkpoint (demo): its model is timed")
    ap.add_argument("--model", help="name:backbone to time with fresh weights instead")
    ap.add_argument("--skip-map", action="store_true", help="skip the 50,000 x 80 mAP row")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--num-images", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per row")
    args = ap.parse_args()
    torch.manual_seed(0)
    s = args.image_size
    cfg = load_config(None, ["data.format=demo", f"data.root={args.data}"])
    train_ann = load_split(cfg.data, "train")
    val_ann = load_split(cfg.data, "val", class_names=train_ann.names)
    tmp = Path(tempfile.mkdtemp())
    files = large_jpegs(train_ann.images[: args.num_images], tmp / "train")
    targets = torch.from_numpy(train_ann.targets[: args.num_images].clip(0).astype(np.float32))
    print(
        f"# side by side, {torch.get_num_threads()} threads, {len(files)} images of 640x480 -> {s} px, "
        f"{args.rounds} alternating rounds, each side in a fresh process\n"
    )
    rows = []

    # --- data pipeline, per worker
    rows.append(("data pipeline, img/s per worker", *alternate(data_rate, args.rounds, files, s)))

    # --- training epoch (data + step)
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
    epoch = alternate(train_rate, args.rounds, ckpt, files, targets, s, args.batch_size)
    rows.append(("training epoch (data + step), img/s", *epoch))

    # --- inference: eager fp32 vs ONNX Runtime fp32 / int8, and the mAP change. Eager runs
    # as `mlic predict` runs it, freed memory kept (without, it is ~2x slower in a fresh
    # process): the ratio is to eager PyTorch at its best, not to a cold process.
    from mlic.host import retain_freed_memory

    retain_freed_memory()
    onnx = export_checkpoint(ckpt, tmp / "model.onnx").path
    meta = mlic.engine.checkpoint.read_metadata(ckpt)
    size = int(meta["input_size"][-1])
    tf = build_transform(size, meta["mean"], meta["std"], train=False)
    calib = torch.stack([tf(load_image(p)) for p in val_ann.images[:32]])
    int8 = quantize_onnx_int8(onnx, tmp / "model.int8.onnx", calib)
    threads = torch.get_num_threads()
    eager = Predictor.from_checkpoint(ckpt)
    fp32 = OnnxPredictor.from_checkpoint(onnx, threads=threads)
    q = OnnxPredictor.from_checkpoint(int8, threads=threads)
    val_x = torch.stack([tf(load_image(p)) for p in val_ann.images])  # decoded once: model only

    def batched(pred: Predictor, b: int = 16) -> np.ndarray:
        return np.concatenate(
            [pred.predict_tensor(val_x[i : i + b])[0] for i in range(0, len(val_x), b)]
        )

    times: dict[str, list[float]] = {"eager": [], "fp32": [], "int8": []}
    outputs = {}
    for pred in (eager, fp32, q):
        pred.predict_tensor(val_x[:8])  # warm-up
    for _ in range(args.rounds):
        for key, pred in (("eager", eager), ("fp32", fp32), ("int8", q)):
            t, outputs[key] = timed(batched, pred)
            times[key].append(len(val_x) / t)
    med = {k: statistics.median(v) for k, v in times.items()}
    for key, label in (("fp32", "ORT fp32"), ("int8", "ORT int8")):
        ratios = [a / b for a, b in zip(times[key], times["eager"], strict=True)]
        rows.append(
            (f"inference batch 16, img/s (eager fp32 vs {label})", med["eager"], med[key], ratios)
        )
    map_e = np.nanmean(average_precision_per_class(outputs["eager"], val_ann.targets))
    map_q = np.nanmean(average_precision_per_class(outputs["int8"], val_ann.targets))

    # --- mAP of 50,000 x 80
    if not args.skip_map:
        g = torch.Generator().manual_seed(0)
        sc = torch.rand(50_000, 80, generator=g)
        tg = (torch.rand(50_000, 80, generator=g) < 0.05).to(torch.int8)
        t_ref_map, ref_map = timed(reference_ap, sc, tg)
        average_precision_per_class(sc.numpy(), tg.numpy())  # warm-up: first-touch page faults
        t_mlic_map, ap_mlic = min(
            timed(average_precision_per_class, sc.numpy(), tg.numpy()) for _ in range(3)
        )
        assert abs(ref_map - float(np.nanmean(ap_mlic))) < 1e-6, "the two mAPs must agree"
        ratio = t_ref_map / t_mlic_map
        rows.append(("mAP of 50,000 x 80, computations/s", 1 / t_ref_map, 1 / t_mlic_map, [ratio]))

    report(rows, args.checkpoint, map_e, map_q, len(val_x))


def report(rows: list, trained: str | None, map_e: float, map_q: float, n: int) -> None:
    print("| measurement | reference | mlic | ratio (medians) | per-round ratios |")
    print("|---|---:|---:|---:|---:|")
    for name, ref, fast, ratios in rows:
        spread = f"{min(ratios):.2f}-{max(ratios):.2f}x" if len(ratios) > 1 else ""
        print(f"| {name} | {ref:.3g} | {fast:.3g} | **{fast / ref:.2f}x** | {spread} |")
    if trained:
        print(
            f"\nint8 mAP on the {n} demo val images: fp32 {100 * map_e:.2f} -> int8 {100 * map_q:.2f} "
            f"({100 * (map_q - map_e):+.2f} points)"
        )


if __name__ == "__main__":
    main()
