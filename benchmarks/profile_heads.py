"""Where a training step goes: per-op profile and thread use of each model's head.

For every model given, builds it with its ``<model>_<recipe>`` recipe's options on the backbone and input size given (random weights, a
random label set: speed does not depend on them), runs a few warm-up training steps
(forward, ASL loss, backward, AdamW step) and then profiles ``--steps`` more with
``torch.profiler``. Prints, per model: the step time, the ratio to ``baseline`` measured in
the same run, the thread use (process CPU seconds / wall seconds over the timed steps) and
the ``--top`` operators by self CPU time.

    python benchmarks/profile_heads.py --models baseline,msformer,q2l \
        --backbone tf_efficientnet_lite0 --image-size 224 --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
from torch.profiler import ProfilerActivity, profile

from mlic.bench import forward_flops, random_labelset
from mlic.cli import resolve_config_path
from mlic.config import load_config
from mlic.host import retain_freed_memory
from mlic.losses import build_loss
from mlic.models import create_model


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def recipe_kwargs(name: str, recipe: str = "demo") -> dict:
    """The model options of the model's ``<name>_<recipe>`` recipe: ``demo`` for the head
    widths used at small sizes, ``voc2007`` for the papers' (ResNet-101) widths."""
    return dict(load_config(resolve_config_path(f"{name}_{recipe}")).model.kwargs or {})


def profile_model(
    name: str,
    backbone: str,
    image_size: int,
    batch: int,
    steps: int,
    warmup: int,
    top: int,
    num_classes: int = 20,
    kwargs: dict | None = None,
    bf16: bool = False,
    fused: bool = True,
) -> dict:
    """Step time, thread use and the top operators of one model's training step."""
    retain_freed_memory()  # as mlic train and mlic bench run
    torch.manual_seed(0)
    model = create_model(
        name,
        num_classes,
        labels=random_labelset(num_classes),
        backbone=backbone,
        pretrained=False,
        **(kwargs or {}),
    )
    gflops = forward_flops(model, image_size) / 1e9  # per image, forward
    model.train().to(memory_format=torch.channels_last)  # as the trainer runs it
    if steps == 0:  # FLOPs only
        return {"model": name, "gflops": gflops}
    loss_fn = build_loss("asl", gamma_neg=4.0, gamma_pos=0.0, clip=0.0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)  # mlic train: fused
    x = torch.randn(batch, 3, image_size, image_size).contiguous(
        memory_format=torch.channels_last
    )  # [B, 3, H, W]
    y = (torch.rand(batch, num_classes) < 0.1).float()  # [B, C]

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            logits = model(x)  # [B, C]
        loss_fn(logits, y).backward()
        opt.step()

    for _ in range(warmup):
        step()
    t0, c0 = time.perf_counter(), _cpu_seconds()
    for _ in range(steps):
        step()
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(max(1, steps // 2)):
            step()
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    return {
        "model": name,
        "gflops": gflops,
        "step_s": wall / steps,
        "threads_used": cpu / wall,
        "top_ops": [
            {"op": e.key, "share": e.self_cpu_time_total / total, "calls": e.count} for e in ops
        ],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="baseline,msformer,q2l,ssgrl,aamn,mgsgn,attn_gcn")
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=6, help="timed steps (0: FLOPs only)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--unfused", action="store_true", help="for-loop AdamW (before fusing)")
    ap.add_argument("--recipe", default="demo", help="model options from <model>_<recipe>")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (as train.amp=bf16)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.backbone}, "
        f"{args.image_size} px, batch {args.batch_size}"
    )
    results = []
    for name in args.models.split(","):
        r = profile_model(
            name,
            args.backbone,
            args.image_size,
            args.batch_size,
            args.steps,
            args.warmup,
            args.top,
            kwargs=recipe_kwargs(name, args.recipe),
            bf16=args.bf16,
            fused=not args.unfused,
        )
        results.append(r)
        base = next((q for q in results if q["model"] == "baseline"), None)
        flops = f"{r['gflops']:.1f} GFLOPs/img fwd"
        if base:
            flops += f" ({r['gflops'] / base['gflops']:.2f}x baseline)"
        if "step_s" not in r:
            print(f"{name}: {flops}")
            continue
        ratio = f"  {r['step_s'] / base['step_s']:.2f}x baseline" if base else ""
        print(
            f"\n{name}: {r['step_s'] * 1000:.0f} ms/step{ratio}, "
            f"{r['threads_used']:.2f} threads busy, {flops}"
        )
        for op in r["top_ops"]:
            print(f"  {100 * op['share']:5.1f}%  {op['calls']:5d}  {op['op']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
