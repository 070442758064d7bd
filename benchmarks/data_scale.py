"""Data at scale: image files vs WebDataset shards, from one set of real JPEGs.

Measures, for the same JPEGs (default: the VOC 2007 trainval subset in
``../shared/realdata``; the script exits cleanly when it is absent):

* ``mlic data pack`` time per 1,000 images, and the size on disk of the files vs the shards;
* images/s through the training data loader (decode + resize + flip + RandAugment, uint8
  batches) reading individual files (``MultiLabelDataset`` + ``SeededSampler``) vs reading
  shards (``ShardTrainSet``), per process and per worker, for 1 and 2 workers, epoch 1
  (worker start included) and epoch 2;
* the same with a small training step per batch (``baseline`` on timm's ``test_resnet``,
  forward + backward + AdamW, on the batch average-pooled 4x), i.e. what a data-bound run sees.

Usage::

    python benchmarks/data_scale.py [--voc DIR] [--size 224] [--batch 32] [--out DIR]

Prints one Markdown table per measurement (what BENCHMARKS.md "Data at scale" shows).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from mlic.data.dataset import MultiLabelDataset, SeededSampler, build_loader
from mlic.data.sources import _loader
from mlic.data.transforms import ToNormalizedFloat, build_transform
from mlic.data.voc import load_voc
from mlic.data.wds import ShardTrainSet, open_shards, pack_shards

DEFAULT_VOC = (
    Path(__file__).resolve().parents[2]
    / "shared/realdata/voc2007-trainval-subset/VOCdevkit/VOC2007"
)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def disk_usage(paths: list[Path]) -> int:
    """Bytes allocated on disk (blocks), as ``du`` counts them."""
    return sum(os.stat(p).st_blocks * 512 for p in paths)


def make_step(size: int, num_classes: int):
    import mlic

    model = mlic.create_model("baseline", num_classes, backbone="test_resnet", pretrained=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    norm = ToNormalizedFloat(MEAN, STD)

    def step(images: torch.Tensor, targets: torch.Tensor) -> None:
        # small on purpose: the step runs on the batch pooled 4x (56 px at 224), so the data
        # pipeline still shows in the total instead of one core's convolution speed
        x = torch.nn.functional.avg_pool2d(norm(images), 4)  # [B, 3, S/4, S/4] float
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), targets.clamp(min=0))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def run_epochs(make_loader, set_epoch, step, epochs: int = 2) -> list[tuple[float, int]]:
    """``[(seconds, images)]`` per epoch; the loader iterator is created inside the timing."""
    out = []
    loader = make_loader()
    for epoch in range(epochs):
        set_epoch(epoch)
        t0 = time.perf_counter()
        n = 0
        for images, targets in loader:
            if step is not None:
                step(images, targets)
            n += len(images)
        out.append((time.perf_counter() - t0, n))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--voc", type=Path, default=DEFAULT_VOC, help="a VOC20xx folder of real JPEGs")
    p.add_argument("--split", default="trainval")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--out", type=Path, help="keep the shards here (default: a temp folder)")
    args = p.parse_args()
    if not (args.voc / "JPEGImages").is_dir():
        print(f"skipped: no VOC JPEGs at {args.voc}")
        return 0
    torch.set_num_threads(1)  # the loader is what is measured; one thread for the step
    ann = load_voc(args.voc, args.split)
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="mlic-data-scale-"))
    shards = work / "shards"
    if shards.exists():
        shutil.rmtree(shards)
    for f in ann.images:  # warm the page cache: both sources are read from memory
        f.read_bytes()
    t0 = time.perf_counter()
    index = pack_shards(ann, shards, shard_size="16MB")
    pack_s = time.perf_counter() - t0
    n = len(ann)
    files_bytes = sum(f.stat().st_size for f in ann.images)
    shard_paths = [shards / s["name"] for s in index["shards"]]
    shard_bytes = sum(f.stat().st_size for f in shard_paths)
    print(f"## {n} JPEGs from {args.voc} ({args.split}), {args.size} px, batch {args.batch}\n")
    print("| | files | shards |\n|---|---:|---:|")
    print(f"| count | {n} | {len(shard_paths)} (16 MB each) |")
    print(f"| bytes | {files_bytes / 1e6:.1f} MB | {shard_bytes / 1e6:.1f} MB |")
    print(
        f"| on disk (du) | {disk_usage(ann.images) / 1e6:.1f} MB | {disk_usage(shard_paths) / 1e6:.1f} MB |"
    )
    print(
        f"\n`mlic data pack`: {pack_s:.2f} s for {n} images = **{1000 * pack_s / n:.2f} s per 1,000 images**\n"
    )

    tf = build_transform(args.size, MEAN, STD, train=True, normalize=False)
    files_ds = MultiLabelDataset(ann, tf, draft_size=args.size)
    src = open_shards(str(shards))
    rows = []
    for with_step in (False, True):
        step = make_step(args.size, len(ann.names)) if with_step else None
        for workers in args.workers:
            sampler = SeededSampler(len(files_ds), True, 0)
            res_files = run_epochs(
                lambda s=sampler, w=workers: build_loader(files_ds, args.batch, s, w),
                sampler.set_epoch,
                step,
            )
            shard_ds = ShardTrainSet(src, tf, args.size, args.batch, seed=0, workers=workers)
            res_shards = run_epochs(
                lambda d=shard_ds: _loader(d, args.batch, d.workers, False, False),
                shard_ds.set_epoch,
                step,
            )
            for name, res in (("files", res_files), ("shards", res_shards)):
                for epoch, (secs, imgs) in enumerate(res, start=1):
                    rate = imgs / secs
                    rows.append(
                        (
                            ("loader + step" if with_step else "loader"),
                            name,
                            workers,
                            epoch,
                            imgs,
                            secs,
                            rate,
                            rate / workers,
                        )
                    )
                    print(
                        f"  {rows[-1][0]:<13} {name:<6} workers={workers} epoch {epoch}: "
                        f"{imgs} img in {secs:.2f} s = {rate:.0f} img/s",
                        file=sys.stderr,
                    )
    print("| what | source | workers | epoch | images | s | img/s per process | img/s per worker |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for what, name, workers, epoch, imgs, secs, rate, per_worker in rows:
        print(
            f"| {what} | {name} | {workers} | {epoch} | {imgs} | {secs:.2f} | {rate:.0f} | {per_worker:.0f} |"
        )
    padded = len(shard_ds) - n
    print(
        f"\nShards: {len(shard_paths)} shards for 1 rank x {max(args.workers)} workers; "
        f"an epoch reads {len(shard_ds)} samples ({padded} padding, {100 * padded / n:.1f} %)."
    )
    print(
        f"Steps per epoch: files {math.ceil(n / args.batch)}, shards {len(shard_ds) // args.batch}."
    )
    if not args.out:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
