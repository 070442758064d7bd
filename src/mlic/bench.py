"""Model size and speed measurements: parameters, forward FLOPs (``torch.utils.flop_counter``)."""

from __future__ import annotations

import time
from itertools import cycle
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from mlic.config import DEFAULT_IMAGE_SIZE
from mlic.data.labels import LabelSet
from mlic.errors import DataError

__all__ = [
    "count_params",
    "forward_flops",
    "model_summary",
    "random_labelset",
    "matmul_peak",
    "matmul_peaks",
    "benchmark",
    "data_loader_speed",
    "jpeg_files",
    "gpu_decode_speed",
]


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops(model: torch.nn.Module, image_size: int, batch: int = 1) -> float:
    """FLOPs of one forward pass per image (a multiply-add counts 2).

    Gradients are switched off by freezing the parameters for the count (not by
    ``inference_mode``/``no_grad``, whose views of parameters trip FlopCounterMode's module
    tracker); they are restored afterwards.
    """
    model.eval()
    x = torch.zeros(batch, 3, image_size, image_size)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        counter = FlopCounterMode(display=False)
        with counter:
            model(x)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return counter.get_total_flops() / batch


def random_labelset(num_classes: int, seed: int = 0) -> LabelSet:
    """A plausible LabelSet (random sparse targets + random 300-d word vectors) for sizing models."""
    g = torch.Generator().manual_seed(seed)
    targets = (torch.rand(1000, num_classes, generator=g) < 0.05).to(torch.int8).numpy()
    labels = LabelSet.from_targets([f"class_{i}" for i in range(num_classes)], targets)
    labels.word_vectors = torch.randn(num_classes, 300, generator=g).numpy()
    return labels


def model_summary(
    name: str,
    backbone: str = "resnet101",
    image_size: int = DEFAULT_IMAGE_SIZE,
    num_classes: int = 80,
    flops: bool = True,
) -> dict[str, Any]:
    """Parameter count (M) and forward GFLOPs per image of a registered model."""
    from mlic.models import create_model

    model = create_model(
        name, num_classes, labels=random_labelset(num_classes), backbone=backbone, pretrained=False
    )
    return {
        "model": name,
        "backbone": backbone,
        "image_size": image_size,
        "num_classes": num_classes,
        "params_m": count_params(model) / 1e6,
        "gflops": forward_flops(model, image_size) / 1e9 if flops else None,
    }


# ----------------------------------------------------------------------------- speed
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _gemm_rate(fn, flops: float, device: torch.device, reps: int, rounds: int = 3) -> float:
    """Best FLOP/s of ``fn`` over ``rounds`` timed rounds of ``reps`` calls, after 2 warm-up calls."""
    for _ in range(2):
        fn()
    _sync(device)
    best = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        _sync(device)
        best = max(best, flops * reps / (time.perf_counter() - t0))
    return best


def matmul_peaks(
    device: torch.device, dtype: torch.dtype = torch.float32, n: int | None = None, reps: int = 10
) -> dict[str, float]:
    """Measured dense ``n^3`` matmul throughput (FLOP/s) of this device, per GEMM library.

    ``blas``: ``torch.matmul`` (cuBLAS on CUDA, MKL/OpenBLAS on CPU). On CPU also
    ``onednn``: the same product through oneDNN, the way :func:`mlic.models._layers.linear`
    runs it; the two differ a lot on AMD CPUs (BENCHMARKS.md section 5).
    """
    from mlic.models._layers import linear

    n = n or (8192 if device.type == "cuda" else 2048)  # a GPU needs large products to peak
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    flops = 2 * n**3
    with torch.inference_mode():
        peaks = {"blas": _gemm_rate(lambda: a @ b, flops, device, reps)}
        if device.type == "cpu" and torch.backends.mkldnn.is_available():
            peaks["onednn"] = _gemm_rate(lambda: linear(a, b, None), flops, device, reps)
    return peaks


def matmul_peak(
    device: torch.device, dtype: torch.dtype = torch.float32, n: int | None = None, reps: int = 10
) -> float:
    """The denominator of FLOP utilisation: the fastest measured matmul on this device.

    The fastest of the GEMM libraries PyTorch uses here (:func:`matmul_peaks`), so that a
    model whose convolutions run through the faster one cannot read above 100 %.
    """
    return max(matmul_peaks(device, dtype, n, reps).values())


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def jpeg_files(folder: str | Path) -> list[Path]:
    """The ``.jpg`` files under ``folder``, sorted; a missing or JPEG-less folder is a DataError.

    ``benchmark`` calls this before it builds and times the model, so that a wrong ``--data``
    is reported at once rather than after the model's timing.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"{folder}: no such folder (bench --data needs a folder of JPEGs)")
    files = sorted(root.rglob("*.jpg"))
    if not files:
        raise DataError(f"{folder}: no .jpg files (bench --data needs a folder of JPEGs)")
    return files


def data_loader_speed(
    folder: str | list[Path], image_size: int, workers: int, limit: int = 256
) -> float:
    """Images/s of the training input pipeline (decode + resize + augment) over a folder of JPEGs.

    ``folder`` may also be the list ``jpeg_files`` returned for it. The mean over a timed epoch
    that follows an untimed one, so that starting the (persistent) worker processes is not
    counted; a folder with fewer than ``limit`` files is cycled.
    """
    from itertools import islice

    import numpy as np

    from mlic.data import Annotations
    from mlic.data.dataset import MultiLabelDataset, SeededSampler, build_loader
    from mlic.data.transforms import build_transform

    files = folder if isinstance(folder, list) else jpeg_files(folder)
    files = list(islice(cycle(files), limit))  # the first `limit` files, cycled if fewer
    ann = Annotations(names=["x"], images=files, targets=np.zeros((len(files), 1), dtype=np.int8))
    # what `mlic train`'s workers ship: uint8, normalised later on the training device
    tf = build_transform(image_size, (0.5,) * 3, (0.5,) * 3, train=True, normalize=False)
    ds = MultiLabelDataset(ann, tf, draft_size=image_size)
    sampler = SeededSampler(len(ds))
    loader = build_loader(ds, 32, sampler, workers)
    for _ in loader:  # warm-up epoch: worker start-up, imports, first-touch of the files
        pass
    sampler.set_epoch(1)
    t0 = time.perf_counter()
    n = sum(len(x) for x, _ in loader)
    return n / (time.perf_counter() - t0)


def gpu_decode_speed(
    files: list[Path], image_size: int, device: str = "cuda", batch: int = 64, rounds: int = 3
) -> float:
    """Images/s of the ``data.gpu_decode`` path: encoded JPEG files decoded as a batch on
    ``device`` (nvJPEG on CUDA), resized and normalised there (:func:`decode_batch`).

    The files are read into memory first (the path's cost on the host is reading bytes);
    the best of ``rounds`` passes over them, after one untimed pass (decoder start-up).
    """
    from mlic.data.dataset import decode_batch

    dev = torch.device(device)
    encoded = [torch.frombuffer(bytearray(Path(f).read_bytes()), dtype=torch.uint8) for f in files]
    batches = [encoded[i : i + batch] for i in range(0, len(encoded), batch)]
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    best = 0.0
    for r in range(rounds + 1):
        _sync(dev)
        t0 = time.perf_counter()
        for b in batches:
            decode_batch(b, image_size, mean, std, dev)  # [b, 3, S, S]
        _sync(dev)
        if r:  # the first pass warms the decoder up
            best = max(best, len(encoded) / (time.perf_counter() - t0))
    return best


def _time_training(
    trainee: Any, batch: tuple[torch.Tensor, torch.Tensor], plan: Any, steps: int
) -> float:
    """Images/s of ``steps`` training steps on ``batch``, after one untimed step (warm-up,
    compilation): :func:`~mlic.engine.trainer.train_one_epoch`, the step ``mlic train`` runs."""
    from dataclasses import replace

    from mlic.engine.run_folder import RunState
    from mlic.engine.trainer import train_one_epoch

    def same(x: torch.Tensor) -> torch.Tensor:
        return x  # the batch is on the device already

    train_one_epoch(trainee, [batch], same, RunState(), replace(plan, batches=1))
    _sync(plan.device)
    t0 = time.perf_counter()
    train_one_epoch(trainee, [batch] * steps, same, RunState(), replace(plan, batches=steps))
    _sync(plan.device)
    return steps * len(batch[1]) / (time.perf_counter() - t0)


def _time_inference(run: Any, x: torch.Tensor, amp: Any, steps: int) -> tuple[float, list[float]]:
    """``(images/s at the batch size, per-image latencies in s at batch 1)``, each after a
    warm-up call."""
    from mlic.engine.precision import autocast

    dev = x.device
    with torch.inference_mode(), autocast(dev, amp):
        run(x)
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(steps):
            run(x)
        _sync(dev)
        images_per_s = steps * len(x) / (time.perf_counter() - t0)
        one = x[:1]
        run(one)
        latencies = []
        for _ in range(steps):
            t = time.perf_counter()
            run(one)
            _sync(dev)
            latencies.append(time.perf_counter() - t)
    return images_per_s, latencies


def benchmark(
    name: str,
    backbone: str = "resnet101",
    image_size: int = DEFAULT_IMAGE_SIZE,
    num_classes: int = 80,
    batch_size: int = 8,
    device: str = "cpu",
    precision: str = "fp32",
    compile: bool = False,
    channels_last: bool = True,
    steps: int = 5,
    data: str | None = None,
    workers: int = 2,
) -> dict[str, Any]:
    """Training and inference speed, latency, memory, FLOPs and FLOP utilisation of one model."""
    from mlic.engine.precision import resolve_precision
    from mlic.engine.trainer import EpochPlan, Trainee
    from mlic.host import retain_freed_memory
    from mlic.losses import build_loss
    from mlic.models import create_model

    data_files = jpeg_files(data) if data else None  # a wrong --data fails before the timing
    dev = torch.device(device)
    amp = resolve_precision(precision, dev)  # once, outside the timed steps
    retained = retain_freed_memory()  # as `mlic train` does
    model = create_model(
        name, num_classes, labels=random_labelset(num_classes), backbone=backbone, pretrained=False
    )
    flops = forward_flops(model, image_size)
    model.to(dev)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    run = torch.compile(model) if compile else model
    x = torch.randn(batch_size, 3, image_size, image_size, device=dev)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = (torch.rand(batch_size, num_classes, device=dev) < 0.1).float()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as mlic train
    scaler = torch.amp.GradScaler(dev.type, enabled=False)
    trainee = Trainee(model, build_loss("bce"), opt, None, scaler, forward=run)
    plan = EpochPlan(0, steps, batch_size, batch_size, dev, amp, channels_last=channels_last)
    train_ips = _time_training(trainee, (x, y), plan, steps)
    model.eval()
    infer_ips, lat = _time_inference(run, x, amp, steps)
    peaks = matmul_peaks(dev, torch.bfloat16 if precision == "bf16" else torch.float32)
    peak = max(peaks.values())
    train_flops = 3 * flops * train_ips  # forward + backward (~2x forward)
    out = {
        "model": name,
        "backbone": backbone,
        "device": str(dev),
        "precision": precision,
        "batch_size": batch_size,
        "image_size": image_size,
        "compile": compile,
        "retain_freed_memory": retained,
        "threads": torch.get_num_threads(),
        "params_m": count_params(model) / 1e6,
        "forward_gflops_per_image": flops / 1e9,
        "train_images_per_s": train_ips,
        "inference_images_per_s": infer_ips,
        "latency_ms_batch1": sorted(lat)[len(lat) // 2] * 1e3,
        "peak_memory_mb": _peak_memory_mb(dev),
        "matmul_peak_gflops": peak / 1e9,
        **{f"matmul_peak_{lib}_gflops": v / 1e9 for lib, v in peaks.items()},
        "train_flop_utilisation": train_flops / peak,
        "inference_flop_utilisation": flops * infer_ips / peak,
    }
    if data_files:
        out["data_images_per_s"] = data_loader_speed(data_files, image_size, workers)
        out["data_workers"] = workers
        out["data_images_per_s_per_worker"] = out["data_images_per_s"] / max(workers, 1)
    return out
