"""Head-only probe: each model's head trained on frozen, cached backbone maps of real VOC photos.

A quick proxy for chasing learning-quality problems (BENCHMARKS.md section 9.2-9.3) without
paying for full fine-tuning runs: the backbone (pretrained, eval mode, so its BatchNorm uses
the ImageNet statistics) computes the maps of the ``train`` and ``val`` images once; then only
the head trains, with AdamW and the learning-rate schedule of ``demo.yaml`` (the trainer's
own scheduler: linear warm-up over half an epoch, then cosine), for as many epochs as the
demo recipes (6 epochs of 579 images at batch 32: 108 steps). No augmentation. It separates
"the head cannot learn this" from "fine-tuning the backbone under this head goes wrong": a
head that does well here and badly in full fine-tuning points at the second.

    python benchmarks/head_probe.py --models baseline,attn_gcn,mlgcn --loss bce
    python benchmarks/head_probe.py --models attn_gcn --kwargs gcn=false --seeds 0,1

Prints one row per (model, kwargs, seed): val mAP, the last batch's training loss and the
mean absolute val logit (a sign of run-away classifiers).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from mlic.cli import resolve_config_path
from mlic.config import load_config
from mlic.data.labels import LabelSet
from mlic.data.transforms import build_transform
from mlic.data.voc import load_voc
from mlic.engine.trainer import build_scheduler
from mlic.losses import build_loss
from mlic.metrics import average_precision_per_class
from mlic.models import create_model

DEFAULT_ROOT = (
    Path(__file__).resolve().parents[1].parent
    / "shared/realdata/voc2007-trainval-subset/VOCdevkit/VOC2007"
)


def cached_maps(model: torch.nn.Module, ann, size: int) -> list[torch.Tensor]:
    """The backbone's maps (list, shallow to deep) of every image of ``ann``, in eval mode."""
    model.eval()
    dcfg = model.default_cfg
    tf = build_transform(size, dcfg["mean"], dcfg["std"], train=False)
    chunks: list[list[torch.Tensor]] = []
    with torch.no_grad():
        for i in range(0, len(ann.images), 32):
            x = torch.stack([tf(Image.open(p).convert("RGB")) for p in ann.images[i : i + 32]])
            chunks.append(model.backbone(x))  # list of [b, D_k, h_k, w_k]
    return [torch.cat(level) for level in zip(*chunks, strict=True)]  # list of [N, D_k, h, w]


def maps_for(model, train_ann, val_ann, args, cache: dict) -> tuple[list, list]:
    """Train and val maps of ``model``'s backbone: from memory, from ``--cache``, or computed.

    The same maps serve every model whose backbone returns the same levels; on disk they
    are plain tensors this script wrote, read back with ``weights_only=True``.
    """
    bb = model.backbone
    key = f"{args.backbone}-{args.image_size}-" + "-".join(map(str, bb.strides))
    if key in cache:
        return cache[key]
    path = Path(args.cache) / f"{key}.pt" if args.cache else None
    if path is not None and path.exists():
        saved = torch.load(path, weights_only=True)
        cache[key] = (saved["train"], saved["val"])
    else:
        cache[key] = (
            cached_maps(model, train_ann, args.image_size),
            cached_maps(model, val_ann, args.image_size),
        )
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"train": cache[key][0], "val": cache[key][1]}, path)
    return cache[key]


def train_head(model, train, val, args, seed: int) -> tuple[float, float, float]:
    """Train the head (every parameter outside ``model.backbone``); return mAP, loss, |logit|."""
    (xtr, ytr), (xva, yva) = train, val
    params = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    per_epoch = len(ytr) // args.batch_size
    recipe = load_config(resolve_config_path("demo"), [f"train.epochs={args.epochs}"])
    sched = build_scheduler(opt, recipe, per_epoch)
    crit = build_loss(args.loss)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    loss = torch.zeros(())
    for _ in range(args.epochs):
        perm = torch.randperm(len(ytr), generator=gen)
        for i in range(0, per_epoch * args.batch_size, args.batch_size):
            idx = perm[i : i + args.batch_size]
            logits = model.classify([m[idx] for m in xtr])  # [B, C]
            loss = crit(logits, ytr[idx].float())
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        logits = torch.cat(
            [model.classify([m[i : i + 64] for m in xva]) for i in range(0, len(yva), 64)]
        )  # [N, C]
    ap = average_precision_per_class(torch.sigmoid(logits).numpy(), yva.numpy())
    return float(np.nanmean(ap) * 100), float(loss.detach()), float(logits.abs().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", default=str(DEFAULT_ROOT), help="the VOC2007 folder")
    ap.add_argument("--models", default="baseline")
    ap.add_argument("--kwargs", nargs="*", default=[], help="model kwargs, key=value")
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--loss", default="bce")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--cache", help="folder to keep the computed maps in, for later calls")
    args = ap.parse_args()
    if not Path(args.root).is_dir():
        raise SystemExit(f"{args.root}: not found (the real VOC subset, see ../shared/realdata)")
    kwargs = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.kwargs)}
    train_ann, val_ann = load_voc(args.root, "train"), load_voc(args.root, "val")
    ytr, yva = torch.as_tensor(train_ann.targets), torch.as_tensor(val_ann.targets)
    labels = LabelSet.from_targets(train_ann.names, train_ann.targets).with_word_vectors("glove")
    cache: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for name in args.models.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            t0 = time.perf_counter()
            torch.manual_seed(seed)
            model = create_model(
                name,
                len(labels.names),
                labels=labels,
                backbone=args.backbone,
                pretrained=True,
                **kwargs,
            )
            xtr, xva = maps_for(model, train_ann, val_ann, args, cache)
            mAP, loss, logit = train_head(model, (xtr, ytr), (xva, yva), args, seed)
            print(
                f"{name} {args.kwargs or ''} seed {seed}: mAP {mAP:.1f}  loss {loss:.3f}  "
                f"|logit| {logit:.2f}  ({time.perf_counter() - t0:.0f}s)",
                flush=True,
            )


if __name__ == "__main__":
    main()
