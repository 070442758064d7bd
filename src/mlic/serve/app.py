"""``mlic serve``: a trained model behind an HTTP API, with dynamic batching, on LitServe.

Processes (LitServe's layout): the main process owns the shared state and waits; one
uvicorn/FastAPI process (forked) answers HTTP, validates and decodes uploads
(:mod:`mlic.serve.validation`) and puts each request on LitServe's queue; ``--workers``
inference processes (spawned) each load the model once, take up to ``--max-batch-size``
queued requests (waiting at most ``--max-wait-ms`` for more), run them as one tensor
batch and answer each request.

Hostile clients and signals: a request counts against ``--max-queue`` only once its body
is in; the body is read in chunks, refused (413) as soon as it passes ``--max-request-mb``,
and must arrive within ``--read-timeout`` (408), as must a request's head (a connection
that does not send one is closed). SIGTERM to the main process or to the whole process
group (systemd's default) drains: admitted requests are answered, then the server exits 0.
A dead inference worker or HTTP process makes ``/readyz`` say so and the server exit 1.

LitServe internals used (hence the ``litserve<0.3`` pin): the batched loop's sentinel and
response statuses (:class:`WaitForFirstBatchedLoop`), ``workers_setup_status`` (for
``/readyz``), ``_shutdown_event`` (SIGTERM), and three methods :class:`_MlicServer`
extends (manager start, HTTP process start, shutdown). This module deliberately has no
``from __future__ import annotations``: FastAPI reads
the parameter annotation of :meth:`MlicAPI.decode_request` (an ``Annotated`` dependency)
at runtime, and that dependency is what validates requests in the HTTP process.
"""

import asyncio
import base64
import hmac
import io
import logging
import math
import multiprocessing as mp
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from queue import Empty
from typing import Annotated, Any

import litserve as ls
import numpy as np
from fastapi import Depends, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from litserve.loops.base import _SENTINEL_VALUE, _StopLoopError
from litserve.loops.simple_loops import BatchedLoop
from litserve.utils import LitAPIStatus, LoopResponseType
from starlette.requests import ClientDisconnect

from mlic.engine.precision import ONNX_RUNTIME, Precision, check_device, resolve_precision
from mlic.errors import ConfigError
from mlic.files import file_sha256
from mlic.serve import SERVE_RANGES
from mlic.serve.examples import Example, add_example_routes, find_examples
from mlic.serve.validation import (
    MAX_HEATMAP_IMAGES,
    MAX_HEATMAP_LABELS,
    ImagePreparer,
    Limits,
    PreparedRequest,
    RequestError,
    check_heatmap_count,
    display_name,
    parse_json_body,
    parse_options,
)
from mlic.thresholds import META_KEYS

__all__ = ["ServeConfig", "MlicAPI", "build_server", "serve", "model_info"]

log = logging.getLogger("mlic.serve")

INFER_CHUNK = 64  # images per forward pass inside one dynamic batch (bounds memory)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
KEEP_ALIVE_S = 5  # uvicorn closes a connection idle this long after an answer
WATCH_INTERVAL_S = 0.5  # how often the main process checks its worker and HTTP processes
FAILED_HOLD_S = 2.0  # after a process died: /readyz answers 503 at least this long, then exit 1
# ServeConfig.failed codes -> the /readyz reason
FAILURES = {1: "an inference worker died", 2: "the HTTP process died", 3: "drain timed out"}


@dataclass
class ServeConfig:
    """Everything ``mlic serve`` was told (see ``mlic serve --help``)."""

    target: str
    backend: str = "torch"
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 16
    max_wait_ms: float = 10.0
    workers: int = 1
    max_upload_mb: float = 10.0
    max_request_mb: float | None = None  # whole request body; None: max(64, 2 x max_upload_mb)
    max_images: int = 32
    max_pixels: int = 40_000_000
    max_queue: int = 64
    token: str | None = None
    timeout_s: float = 60.0
    read_timeout_s: float = 30.0  # a request's head, and its whole body, must arrive within it
    drain_timeout_s: float = 30.0
    device: str = "cpu"
    precision: str = "fp32"  # torch backend: fp32 / bf16 / auto (mlic.engine.precision)
    threads: int | None = None
    model_path: str = field(default="", init=False)  # resolved .safetensors or .onnx

    def limits(self) -> Limits:
        return Limits(int(self.max_upload_mb * 2**20), self.max_images, self.max_pixels)

    def max_request_bytes(self) -> int:
        """The cap on one request body (all its images, multipart or base64 JSON)."""
        mb = self.max_request_mb
        return int((mb if mb is not None else max(64.0, 2 * self.max_upload_mb)) * 2**20)

    def check(self) -> None:
        """ConfigError naming the option for any value out of :data:`SERVE_RANGES`
        (nan and inf included), an unknown host or device, or limits that contradict."""
        fields = {
            "--port": self.port,
            "--max-batch-size": self.max_batch_size,
            "--max-wait-ms": self.max_wait_ms,
            "--workers": self.workers,
            "--max-upload-mb": self.max_upload_mb,
            "--max-request-mb": self.max_request_mb,
            "--max-images": self.max_images,
            "--max-pixels": self.max_pixels,
            "--max-queue": self.max_queue,
            "--timeout": self.timeout_s,
            "--read-timeout": self.read_timeout_s,
            "--drain-timeout": self.drain_timeout_s,
            "--threads": self.threads,
        }
        for option, value in fields.items():
            kind, low, high = SERVE_RANGES[option]
            if value is None and option in ("--max-request-mb", "--threads"):
                continue
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if ok and kind is int:
                ok = float(value).is_integer()
            if not (ok and math.isfinite(value) and low <= value <= high):
                raise ConfigError(f"{option} {value!r}: must be a number in [{low:g}, {high:g}]")
        if self.host not in ("127.0.0.1", "localhost", "0.0.0.0", "::"):
            raise ConfigError(f"--host {self.host}: LitServe binds 127.0.0.1, 0.0.0.0 or :: only")
        if self.max_wait_ms / 1000.0 >= self.timeout_s:
            raise ConfigError(
                f"--max-wait-ms {self.max_wait_ms:g} must be below the request timeout"
            )
        if self.max_request_bytes() < int(self.max_upload_mb * 2**20):
            raise ConfigError(
                f"--max-request-mb {self.max_request_mb:g} is below --max-upload-mb "
                f"{self.max_upload_mb:g}: no largest image could be sent"
            )
        if self.token is not None and (not self.token or any(c.isspace() for c in self.token)):
            raise ConfigError("--token: must be non-empty and have no spaces or line breaks")
        check_device(self.device, types=("cpu", "cuda"))  # what LitServe maps


def resolve_model(config: ServeConfig) -> tuple[Path, dict[str, Any]]:
    """Run folder / checkpoint / ``.onnx`` -> (model file, its metadata); checks the backend."""
    target = Path(config.target)
    if target.suffix == ".onnx":
        if config.backend != "onnxruntime":
            raise ConfigError(f"{target}: an .onnx model needs --backend onnxruntime")
        from mlic.export import read_export_metadata

        return target, read_export_metadata(target)
    from mlic.engine.checkpoint import read_metadata
    from mlic.evaluate import resolve_target

    ckpt, _ = resolve_target(target)
    return ckpt, read_metadata(ckpt)


def check_port_free(host: str, port: int) -> None:
    """ConfigError when ``host:port`` cannot be listened on (in use, not permitted), before
    the model is loaded (uvicorn would log it and exit 1 after the workers started)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind((host, port))
        except OSError as e:
            raise ConfigError(f"--port {port}: cannot listen on {host}: {e.strerror}") from None


def serve_precision(config: ServeConfig) -> Precision:
    """What the inference workers compute in: the torch backend resolves ``--precision`` for
    its device; the ONNX Runtime graph runs as exported (fp32)."""
    if config.backend == "onnxruntime":
        return ONNX_RUNTIME
    return resolve_precision(config.precision, config.device)


def model_info(
    path: Path, meta: dict[str, Any], backend: str, precision: str = "fp32"
) -> dict[str, Any]:
    """The ``GET /v1/model`` answer: name, labels, thresholds, input size, versions, hash, and
    the precision the workers compute in (with the reason it was chosen)."""
    from mlic import __version__

    names = list(meta["label_names"])
    stored = meta.get("thresholds")
    return {
        "name": meta.get("model"),
        "backbone": (meta.get("model_kwargs") or {}).get("backbone"),
        "labels": names,
        "thresholds": [float(t) for t in stored] if stored is not None else [0.5] * len(names),
        "thresholds_source": "checkpoint" if stored is not None else "default 0.5",
        # how they were chosen and on how many positives per class (mlic.thresholds)
        **{k: meta[k] for k in META_KEYS if k in meta and k != "thresholds"},
        "input_size": [int(s) for s in meta["input_size"]],
        "mean": [float(m) for m in meta["mean"]],
        "std": [float(s) for s in meta["std"]],
        "resize": meta.get("resize"),  # warp side before the centre crop (data.resize)
        "mlic_version": meta.get("mlic_version"),
        "server_mlic_version": __version__,
        "file": path.name,
        "sha256": file_sha256(path),
        "backend": backend,
        "heatmaps": backend == "torch",
        "max_heatmaps_per_image": MAX_HEATMAP_LABELS,
        "max_heatmap_images": MAX_HEATMAP_IMAGES,
        "precision": precision,
    }


# ----------------------------------------------------------------------------- HTTP-process state
@dataclass
class _Runtime:
    """State of the HTTP side, made in the main process before the HTTP process forks."""

    config: ServeConfig
    info: dict[str, Any]
    preparer: ImagePreparer
    inflight: Any  # mp.Value('i'): requests admitted and not yet answered (the queue depth)
    draining: Any  # mp.Value('i'): 1 after SIGTERM: new requests get 503
    failed: Any  # mp.Value('i'): a FAILURES code once a process died: 503, then exit 1
    stopping: Any  # spawn Value('i'): 1 once the workers may stop (their SIGTERM then exits)
    batch_requests: Any  # shared per-bucket counts of requests per dynamic batch (+ sum)
    batch_images: Any  # the same for images per dynamic batch
    metrics: dict[str, Any] = field(default_factory=dict)
    examples: list[Example] = field(default_factory=list)  # the page's, chosen at start-up


_RUNTIME: _Runtime | None = None


def _runtime() -> _Runtime:
    if _RUNTIME is None:
        raise RuntimeError("mlic.serve: no server built in this process (call build_server)")
    return _RUNTIME


def _error(
    status: int, message: str, retry_after: int | None = None, close: bool = False
) -> HTTPException:
    """An HTTP error; ``close``: end the connection after it (a body left unread)."""
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
    if close:
        headers["Connection"] = "close"
    return HTTPException(status_code=status, detail=message, headers=headers or None)


async def _read_body(request: Request, cap: int, timeout_s: float) -> bytes:
    """The request body, in chunks: 413 as soon as it passes ``cap`` bytes (at once when
    Content-Length says so), 408 when it has not all arrived within ``timeout_s``."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > cap:
        raise _error(
            413,
            f"request body of {int(length):,} bytes is over the limit of "
            f"{cap:,} (--max-request-mb)",
            close=True,
        )
    body = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                if len(body) + len(chunk) > cap:
                    raise _error(
                        413,
                        f"request body is over the limit of {cap:,} bytes (--max-request-mb)",
                        close=True,
                    )
                body += chunk
    except TimeoutError:
        raise _error(
            408,
            f"request body not received within {timeout_s:g} s "
            f"({len(body):,} bytes came; --read-timeout)",
            close=True,
        ) from None
    except ClientDisconnect:
        raise _error(400, "client disconnected before sending the whole body", close=True) from None
    return bytes(body)


async def _parse_request(request: Request, query: dict[str, Any], body: bytes) -> PreparedRequest:
    """Multipart uploads (field ``images``) or JSON (``{"images": [base64, ...]}``) -> prepared."""
    rt = _runtime()
    ctype = request.headers.get("content-type", "").lower()
    raw_opts = dict(query)
    if ctype.startswith("multipart/form-data"):

        async def replay() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=10_000, max_fields=1_000)
        except HTTPException as e:
            raise _error(400, f"malformed multipart body: {e.detail}") from None
        files: list[tuple[str, bytes]] = []
        for key, value in form.multi_items():
            if hasattr(value, "read"):  # an uploaded file
                if key not in ("images", "image"):
                    raise RequestError(
                        400, f"unexpected file field {key!r}; send image files as 'images'"
                    )
                files.append((value.filename or "", await value.read()))
            elif key in ("images", "image"):
                raise RequestError(400, f"field {key!r} must be a file upload, not text")
            else:
                raw_opts[key] = value
        opts = parse_options(raw_opts)
        _check_heatmaps(opts.heatmaps)
        rt.preparer.check_count(len(files))
        check_heatmap_count(opts.heatmaps, len(files))
        keep = opts.heatmaps != "false"
        images = await run_in_threadpool(
            lambda: [
                rt.preparer.prepare(display_name(n, i), d, keep) for i, (n, d) in enumerate(files)
            ]
        )
        return PreparedRequest(images=images, options=opts)
    if ctype.startswith("application/json"):
        doc = parse_json_body(body)
        items = doc.pop("images")
        if not isinstance(items, list):
            items = [items]
        raw_opts.update(doc)
        opts = parse_options(raw_opts)
        _check_heatmaps(opts.heatmaps)
        rt.preparer.check_count(len(items))
        check_heatmap_count(opts.heatmaps, len(items))
        keep = opts.heatmaps != "false"
        images = await run_in_threadpool(
            lambda: [rt.preparer.from_base64(i, it, keep) for i, it in enumerate(items)]
        )
        return PreparedRequest(images=images, options=opts)
    raise RequestError(
        415,
        f"content type {ctype or 'none'!r} not accepted; send multipart/form-data "
        "(files in 'images') or application/json",
    )


def _check_heatmaps(heatmaps: str) -> None:
    if heatmaps != "false" and not _runtime().info["heatmaps"]:
        raise RequestError(400, "heat maps need the torch backend (--backend torch)")


async def prepared_request(
    request: Request,
    threshold: Annotated[
        float | None,
        Query(ge=0.0, le=1.0, description="one threshold for all labels (default: calibrated)"),
    ] = None,
    top_k: Annotated[int | None, Query(ge=1, description="at most this many labels")] = None,
    scores: Annotated[
        str | None, Query(pattern="^(all|labels)$", description="'all': every label's score")
    ] = None,
    heatmaps: Annotated[
        str | None,
        Query(
            pattern="^(true|false|all)$",
            description="PNG overlays (base64) per predicted label ('true') or every label ('all')",
        ),
    ] = None,
) -> AsyncIterator[PreparedRequest]:
    """FastAPI dependency of ``POST /v1/predict``: read the body, admit (bounded queue), parse,
    validate.

    Runs in the HTTP process. The request takes a queue slot only once its whole body is in
    (a client that stalls holds none, and gets 408 after ``--read-timeout``). A full queue
    answers 503 with ``Retry-After``; a bad request a 4xx naming the problem; the admitted
    request counts in the queue depth until answered.
    """
    rt = _runtime()
    _refuse_when_stopping(rt)
    body = await _read_body(request, rt.config.max_request_bytes(), rt.config.read_timeout_s)
    with rt.inflight.get_lock():  # the SIGTERM handler sets `draining` under this lock too
        _refuse_when_stopping(rt)
        if rt.inflight.value >= rt.config.max_queue:
            raise _error(
                503, f"queue full ({rt.config.max_queue} requests waiting); retry", retry_after=1
            )
        rt.inflight.value += 1
    try:
        query = {"threshold": threshold, "top_k": top_k, "scores": scores, "heatmaps": heatmaps}
        try:
            prepared = await _parse_request(
                request, {k: v for k, v in query.items() if v is not None}, body
            )
        except RequestError as e:
            raise _error(e.status, e.message) from None
        yield prepared
    finally:
        with rt.inflight.get_lock():
            rt.inflight.value -= 1


def _refuse_when_stopping(rt: _Runtime) -> None:
    if rt.failed.value:
        raise _error(503, f"server is stopping: {FAILURES[rt.failed.value]}", retry_after=5)
    if rt.draining.value:
        raise _error(503, "server is shutting down", retry_after=5)


def _png_base64(image: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _count(shared: Any, value: int) -> None:
    """Add one observation to a shared bucket array [len(BATCH_BUCKETS) + 1 (+Inf), sum]."""
    idx = next((i for i, b in enumerate(BATCH_BUCKETS) if value <= b), len(BATCH_BUCKETS))
    with shared.get_lock():
        shared[idx] += 1
        shared[len(BATCH_BUCKETS) + 1] += value


# ----------------------------------------------------------------------------- batching loop
class WaitForFirstBatchedLoop(BatchedLoop):
    """LitServe's batched loop, collecting each batch without busy-waiting.

    LitServe's own collection polls its request queue (a multiprocessing manager queue,
    one IPC round trip per poll) every millisecond, idle or not: a worker and the manager
    process then spin on two cores. Here a batch starts with a blocking wait for its
    first request, then takes more until ``max_batch_size`` or until ``batch_timeout``
    has passed *since that first request* (the usual dynamic-batching deadline).
    """

    idle_wait_s = 1.0  # wake up this often while idle (and notice a shutdown sentinel)

    def get_batch_requests(
        self, lit_api: Any, request_queue: Any, transport: Any
    ) -> tuple[list, list]:
        payloads: list[tuple[Any, str, Any]] = []
        timed_out: list[tuple[Any, str]] = []
        deadline = None
        while len(payloads) < lit_api.max_batch_size:
            if deadline is None:
                timeout = self.idle_wait_s
            else:
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    break
            try:
                item = request_queue.get(timeout=timeout)
            except Empty:
                break
            if item == _SENTINEL_VALUE:
                raise _StopLoopError()
            response_queue_id, uid, timestamp, x_enc = item
            if deadline is None:
                deadline = time.monotonic() + lit_api.batch_timeout
            self.put_response(
                transport, response_queue_id, uid, (), LitAPIStatus.START, LoopResponseType.REGULAR
            )
            if lit_api.request_timeout not in (-1, False) and (
                time.monotonic() - timestamp > lit_api.request_timeout
            ):
                timed_out.append((response_queue_id, uid))
            else:
                payloads.append((response_queue_id, uid, x_enc))
        return payloads, timed_out


# ----------------------------------------------------------------------------- the LitAPI
class MlicAPI(ls.LitAPI):
    """LitServe API of one mlic model: decode in the HTTP process, predict batches in workers."""

    def __init__(
        self, config: ServeConfig, batch_requests: Any, batch_images: Any, stopping: Any = None
    ) -> None:
        super().__init__(
            max_batch_size=config.max_batch_size,
            batch_timeout=config.max_wait_ms / 1000.0,
            api_path="/v1/predict",
            loop=WaitForFirstBatchedLoop() if config.max_batch_size > 1 else "auto",
        )
        self.config = config
        self.batch_requests = batch_requests
        self.batch_images = batch_images
        self.stopping = stopping

    # -- HTTP process
    def authorize(self, request: Request) -> None:
        """Bearer-token check (only when ``--token`` / ``MLIC_SERVE_TOKEN`` is set)."""
        token = self.config.token
        if not token:
            return
        sent = request.headers.get("authorization", "")
        if not (
            sent.startswith("Bearer ") and hmac.compare_digest(sent[7:].encode(), token.encode())
        ):
            raise HTTPException(
                401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"}
            )

    def decode_request(
        self, request: Annotated[PreparedRequest, Depends(prepared_request)]
    ) -> PreparedRequest:
        return request  # already validated and decoded by the dependency, in the HTTP process

    # -- inference worker
    def setup(self, device: str) -> None:
        from mlic.host import retain_freed_memory
        from mlic.inference import OnnxPredictor, Predictor

        stopping = self.stopping

        def on_stop_signal(signum: int, frame: Any) -> None:
            # A process-group SIGTERM (or Ctrl+C) reaches the worker with the main process:
            # keep answering until the main process has drained and says stop.
            if stopping.value:
                os._exit(0)

        if stopping is not None:  # None: set up in a process of the caller's (tests)
            signal.signal(signal.SIGTERM, on_stop_signal)
            signal.signal(signal.SIGINT, on_stop_signal)
        if ":" in self.config.device:  # LitServe numbers its own devices (cuda:0)
            device = self.config.device
        retain_freed_memory()
        if self.config.threads and self.config.backend == "torch":
            import torch

            torch.set_num_threads(self.config.threads)
        path = self.config.model_path
        if self.config.backend == "onnxruntime":
            self.predictor = OnnxPredictor.from_checkpoint(path, threads=self.config.threads)
        else:
            self.predictor = Predictor.from_checkpoint(
                path, device=device, precision=self.config.precision
            )
        from mlic.data.transforms import ToNormalizedFloat

        self.normalise = ToNormalizedFloat(self.predictor.meta["mean"], self.predictor.meta["std"])

    def batch(self, inputs: list[PreparedRequest]) -> list[PreparedRequest]:
        return list(inputs)

    def unbatch(self, outputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return outputs

    def predict(self, x: PreparedRequest | list[PreparedRequest]) -> Any:
        single = isinstance(x, PreparedRequest)
        return self._predict([x])[0] if single else self._predict(x)

    def _predict(self, requests: list[PreparedRequest]) -> list[dict[str, Any]]:
        import torch

        pixels = np.stack([im.pixels for r in requests for im in r.images])  # uint8 [N, 3, S, S]
        want_maps = any(r.options.heatmaps != "false" for r in requests)
        probs_parts, maps_parts = [], []
        for start in range(0, len(pixels), INFER_CHUNK):
            batch = self.normalise(torch.from_numpy(pixels[start : start + INFER_CHUNK]))
            probs, maps = self.predictor.predict_tensor(batch, return_attention=want_maps)
            probs_parts.append(probs)  # [n, C]
            if maps is not None:
                maps_parts.append(maps)  # [n, C, h, w]
        probs = np.concatenate(probs_parts)  # [N, C]
        maps = np.concatenate(maps_parts) if maps_parts else None
        _count(self.batch_requests, len(requests))
        _count(self.batch_images, len(pixels))
        return self._answers(requests, probs, maps)

    def _answers(
        self, requests: list[PreparedRequest], probs: np.ndarray, maps: np.ndarray | None
    ) -> list[dict[str, Any]]:
        from PIL import Image

        from mlic.viz import overlay_heatmap

        names = self.predictor.names
        index = {n: j for j, n in enumerate(names)}
        out, k = [], 0
        for req in requests:
            opts = req.options
            thr = self.predictor._thresholds(opts.threshold)
            results = []
            for im in req.images:
                pred = self.predictor._results(
                    probs[k : k + 1], None, [im.name], opts.threshold, opts.top_k, [None]
                )[0]
                entry: dict[str, Any] = {
                    "name": im.name,
                    "labels": [
                        {
                            "label": n,
                            "probability": pred.scores[n],
                            "threshold": float(thr[index[n]]),
                        }
                        for n in pred.labels
                    ],
                }
                if opts.scores:
                    entry["scores"] = pred.scores
                if maps is not None and opts.heatmaps != "false" and im.photo is not None:
                    photo = Image.fromarray(im.photo)
                    # 'all': the most probable labels, predicted or not; both capped.
                    ranked = [names[j] for j in np.argsort(-probs[k], kind="stable")]
                    chosen = ranked if opts.heatmaps == "all" else pred.labels
                    chosen = chosen[:MAX_HEATMAP_LABELS]
                    entry["heatmaps"] = {
                        n: _png_base64(overlay_heatmap(photo, maps[k, index[n]])) for n in chosen
                    }
                results.append(entry)
                k += 1
            out.append(
                {
                    "model": self.predictor.meta.get("model"),
                    "batch_size": len(requests),
                    "results": results,
                }
            )
        return out

    def encode_response(self, output: dict[str, Any]) -> dict[str, Any]:
        return output


# ----------------------------------------------------------------------------- the server
PREDICT_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "images": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                        },
                        "threshold": {"type": "number"},
                        "top_k": {"type": "integer"},
                        "scores": {"type": "string", "enum": ["all", "labels"]},
                        "heatmaps": {"type": "string", "enum": ["true", "false", "all"]},
                    },
                    "required": ["images"],
                }
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "images": {
                            "type": "array",
                            "items": {"type": "string", "description": "base64 image file"},
                        },
                        "threshold": {"type": "number"},
                        "top_k": {"type": "integer"},
                        "scores": {"type": "string", "enum": ["all", "labels"]},
                        "heatmaps": {"type": "string", "enum": ["true", "false", "all"]},
                    },
                    "required": ["images"],
                }
            },
        },
    },
    "responses": {
        "200": {
            "description": "per image: labels above threshold with probabilities; "
            "optionally all scores and base64 PNG heat-map overlays"
        },
        "400": {"description": "bad request (empty, truncated, wrong field), JSON detail"},
        "401": {"description": "bearer token missing or wrong"},
        "413": {"description": "file or request too large, too many images, too many pixels"},
        "415": {"description": "not an image, or unsupported content type"},
        "503": {"description": "queue full or shutting down; see Retry-After"},
    },
}


def _static_dir() -> Path:
    return Path(str(resources.files("mlic.serve") / "static"))


def _metrics_collector(rt: _Runtime) -> Any:
    from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily

    class _Shared:
        def collect(self) -> Any:
            gauge = GaugeMetricFamily("mlic_queue_depth", "requests admitted and not yet answered")
            gauge.add_metric([], rt.inflight.value)
            yield gauge
            for name, doc, arr in (
                ("mlic_batch_requests", "requests per dynamic batch", rt.batch_requests),
                ("mlic_batch_images", "images per dynamic batch", rt.batch_images),
            ):
                with arr.get_lock():
                    counts = list(arr[: len(BATCH_BUCKETS) + 1])
                    total = arr[len(BATCH_BUCKETS) + 1]
                cumulative, buckets = 0, []
                for b, c in zip([*map(str, BATCH_BUCKETS), "+Inf"], counts, strict=True):
                    cumulative += c
                    buckets.append((b, cumulative))
                h = HistogramMetricFamily(name, doc)
                h.add_metric([], buckets, sum_value=total)
                yield h

    return _Shared()


class _MlicServer(ls.LitServer):
    """LitServer, made to outlive a process-group SIGTERM and to let mlic watch its processes.

    LitServe's queue manager process would die of a process-group SIGTERM (and with it every
    admitted request): it starts with SIGTERM ignored (the main process stops it at the end).
    The HTTP processes are kept for :func:`watch_processes`; the shutdown first tells the
    inference workers they may stop (their SIGTERM handler ignores a signal before that).
    """

    mlic_stopping: Any = None  # the runtime's `stopping` flag
    mlic_http: dict[int, Any] | None = None  # the HTTP processes, once started

    def _init_manager(self, num_api_servers: int) -> Any:
        # Inherited by the manager process (an ignored signal stays ignored across fork and exec).
        previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            return super()._init_manager(num_api_servers)
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _start_server(self, *args: Any, **kwargs: Any) -> dict[int, Any]:
        self.mlic_http = super()._start_server(*args, **kwargs)
        return self.mlic_http

    def _perform_graceful_shutdown(self, *args: Any, **kwargs: Any) -> None:
        if self.mlic_stopping is not None:
            self.mlic_stopping.value = 1
        super()._perform_graceful_shutdown(*args, **kwargs)


def _head_deadline_protocol(seconds: float) -> type:
    """uvicorn's h11 protocol, closing a connection whose request head has not arrived
    within ``seconds`` of its opening or of its previous answer (uvicorn waits forever for a
    partial head; its keep-alive timeout covers only a connection that sends nothing)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadDeadlineProtocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm_head_deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_head_deadline()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

        def _arm_head_deadline(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(seconds, self._head_expired)

        def _head_expired(self) -> None:
            between_requests = self.cycle is None or self.cycle.response_complete
            if between_requests and not self.transport.is_closing():
                self.transport.close()  # a request in progress has its own body deadline

    return HeadDeadlineProtocol


def _build_runtime(config: ServeConfig) -> _Runtime:
    """The model's description, the counters shared with the worker processes, and the
    Prometheus registry (request counts, errors, latency, queue depth, batch sizes)."""
    from prometheus_client import CollectorRegistry, Counter, Histogram

    path, meta = resolve_model(config)
    config.model_path = str(path)
    info = model_info(path, meta, config.backend, str(serve_precision(config)))
    info["max_images_per_request"] = config.max_images  # the page sends batches within it
    spawn = mp.get_context("spawn")  # shared with spawned inference workers
    rt = _Runtime(
        config=config,
        info=info,
        preparer=ImagePreparer(int(info["input_size"][-1]), config.limits(), info["resize"]),
        inflight=mp.Value("i", 0),
        draining=mp.Value("i", 0),
        failed=mp.Value("i", 0),
        stopping=spawn.Value("i", 0),
        batch_requests=spawn.Array("q", len(BATCH_BUCKETS) + 2),
        batch_images=spawn.Array("q", len(BATCH_BUCKETS) + 2),
    )
    registry = CollectorRegistry()
    latency_doc = "predict request latency"
    rt.metrics = {
        "registry": registry,
        "requests": Counter(
            "mlic_requests", "predict requests by status code", ["code"], registry=registry
        ),
        "errors": Counter(
            "mlic_errors", "predict requests answered with an error (4xx/5xx)", registry=registry
        ),
        "latency": Histogram(
            "mlic_request_latency_seconds", latency_doc, buckets=LATENCY_BUCKETS, registry=registry
        ),
    }
    registry.register(_metrics_collector(rt))
    rt.examples = find_examples(config.target, info["labels"], config.limits().max_upload_bytes)
    return rt


def _add_routes(app: Any, server: ls.LitServer, api: "MlicAPI", rt: _Runtime) -> None:
    """The page, /v1/model, /examples, /healthz, /readyz, /metrics and the request counter;
    LitServe's own "/" ("litserve running") gives way to the page."""
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) != "/"]
    for route in app.router.routes:
        if getattr(route, "path", None) == "/v1/predict":
            route.openapi_extra = PREDICT_OPENAPI
            route.summary = "Predict the labels of one or several images"
    auth = [Depends(api.authorize)]

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(_static_dir() / "index.html")

    app.mount("/static", StaticFiles(directory=_static_dir()), name="static")

    @app.get("/v1/model", dependencies=auth, summary="The served model")
    async def get_model() -> dict[str, Any]:
        return rt.info

    add_example_routes(app, rt.examples, rt.config.limits().max_upload_bytes, auth)

    @app.get("/healthz", summary="Liveness: the HTTP process answers")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: every inference worker has loaded the model")
    async def readyz() -> JSONResponse:
        from litserve.utils import WorkerSetupStatus

        status = dict(getattr(server, "workers_setup_status", None) or {})
        ready = bool(status) and all(v == WorkerSetupStatus.READY for v in status.values())
        if rt.failed.value:
            reason = FAILURES[rt.failed.value]
            return JSONResponse({"ready": False, "reason": reason}, status_code=503)
        if rt.draining.value:
            return JSONResponse({"ready": False, "reason": "shutting down"}, status_code=503)
        if not ready:
            return JSONResponse({"ready": False, "reason": "workers starting"}, status_code=503)
        return JSONResponse({"ready": True, "workers": len(status)})

    @app.get("/metrics", dependencies=auth, summary="Prometheus metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(rt.metrics["registry"]), media_type=CONTENT_TYPE_LATEST)

    @app.middleware("http")
    async def count_requests(request: Request, call_next: Any) -> Response:
        if request.url.path != "/v1/predict":
            return await call_next(request)
        start = time.perf_counter()
        response = await call_next(request)
        rt.metrics["latency"].observe(time.perf_counter() - start)
        rt.metrics["requests"].labels(code=str(response.status_code)).inc()
        if response.status_code >= 400:
            rt.metrics["errors"].inc()
        return response


def build_server(config: ServeConfig) -> ls.LitServer:
    """The LitServer with the API, the page, /v1/model, /healthz, /readyz and /metrics."""
    global _RUNTIME
    rt = _build_runtime(config)
    _RUNTIME = rt
    api = MlicAPI(config, rt.batch_requests, rt.batch_images, rt.stopping)
    accelerator = "cpu" if config.device == "cpu" else "cuda"
    server = _MlicServer(
        api,
        accelerator=accelerator,
        devices=1,
        workers_per_device=config.workers,
        timeout=config.timeout_s,
    )
    server.mlic_stopping = rt.stopping
    server._monitor_workers = False  # watch_processes replaces LitServe's watcher
    server.uvicorn_graceful_timeout = config.drain_timeout_s
    app = server.app
    app.title = "mlic serve"
    app.description = (
        f"Multi-label image classification: {rt.info['name']} ({len(rt.info['labels'])} labels)"
    )
    _add_routes(app, server, api, rt)
    return server


def _set_draining(rt: _Runtime) -> None:
    with rt.inflight.get_lock():  # atomic with the admission check of prepared_request
        rt.draining.value = 1


def _drain(rt: _Runtime, seconds: float, workers: list[Any]) -> bool:
    """Wait until every admitted request is answered (True), or ``seconds`` pass or no
    inference worker is left alive to answer (False)."""
    deadline = time.monotonic() + seconds
    while rt.inflight.value > 0:
        if time.monotonic() >= deadline or (workers and not any(p.is_alive() for p in workers)):
            return False
        time.sleep(0.02)
    return True


def _stop(server: _MlicServer) -> None:
    """End ``server.run`` (LitServe then stops the HTTP process, the workers, the manager)."""
    if _runtime().stopping.value:  # stopped already (a second Ctrl+C, then the drain's end)
        return
    _runtime().stopping.value = 1
    event = getattr(server, "_shutdown_event", None)
    if event is None:  # still starting: nothing is in flight, no child to stop
        os._exit(1 if _runtime().failed.value else 0)
    event.set()


def _install_sigterm(server: _MlicServer, config: ServeConfig) -> None:
    """SIGTERM or Ctrl+C: refuse new requests (503), wait for admitted ones to be answered,
    then stop (a second Ctrl+C stops at once).

    The same whether the signal reaches the main process alone or its whole process group:
    the HTTP process finishes its open requests (uvicorn), the queue manager ignores the
    signal, the inference workers ignore it until the drain is over.
    """
    rt = _runtime()
    main_pid = os.getpid()

    def drain_and_stop() -> None:
        _set_draining(rt)
        if _drain(rt, config.drain_timeout_s, list(getattr(server, "inference_workers", []))):
            print("mlic serve: drained, stopping", flush=True)
        else:
            with rt.failed.get_lock():
                rt.failed.value = rt.failed.value or 3
            print(
                f"mlic serve: error: drain timed out with {rt.inflight.value} request(s) "
                "unanswered; stopping with exit code 1",
                file=sys.stderr,
                flush=True,
            )
        _stop(server)

    def on_stop_signal(signum: int, frame: Any) -> None:
        # A forked HTTP process inherits this handler, and re-raises the signal uvicorn
        # caught once it has stopped: only the main process drains.
        if os.getpid() != main_pid:
            return
        # Threads of their own: the main thread is blocked in a manager call that a signal
        # handler must not re-enter.
        if not rt.draining.value:
            threading.Thread(target=drain_and_stop, name="mlic-drain", daemon=True).start()
        elif signum == signal.SIGINT:  # a second Ctrl+C: unanswered requests fail
            threading.Thread(target=_stop, args=(server,), name="mlic-stop", daemon=True).start()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_stop_signal)


def _exit_status(code: int | None) -> str:
    if code is not None and code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def _abort_start(server: _MlicServer) -> None:
    """A process died while LitServe still waits for its workers (it would wait forever)."""
    for proc in getattr(server, "inference_workers", None) or []:
        if proc.is_alive():
            proc.kill()
    manager = getattr(server.transport_config, "manager", None)
    if manager is not None:
        manager.shutdown()
    os._exit(1)


def _setup_failed(server: _MlicServer) -> bool:
    from litserve.utils import WorkerSetupStatus

    status = dict(getattr(server, "workers_setup_status", None) or {})
    return any(v == WorkerSetupStatus.ERROR for v in status.values())


def watch_processes(server: _MlicServer, config: ServeConfig) -> None:
    """Main-process thread: a dead inference worker or HTTP process stops the server.

    ``/readyz`` and new requests answer 503 naming the failure, requests that other workers
    hold are answered (up to ``--drain-timeout``), and the server exits 1, so that a
    supervisor restarts it (a request the dead worker held cannot be answered).
    """
    rt = _runtime()
    while not rt.stopping.value:
        time.sleep(WATCH_INTERVAL_S)
        if rt.draining.value or rt.stopping.value:
            continue  # a drain ends the server itself; its stopped processes are expected
        workers = list(getattr(server, "inference_workers", None) or [])
        http = list((server.mlic_http or {}).values())
        dead = next((p for p in [*workers, *http] if not p.is_alive()), None)
        if dead is None or (server.mlic_http is None and _setup_failed(server)):
            continue  # a worker whose setup raised: LitServe's start raises (see serve)
        rt.failed.value = 2 if dead in http else 1
        print(
            f"mlic serve: error: {FAILURES[rt.failed.value]} ({dead.name}, pid {dead.pid}, "
            f"{_exit_status(dead.exitcode)}); stopping with exit code 1",
            file=sys.stderr,
            flush=True,
        )
        if server.mlic_http is None:
            _abort_start(server)
        _set_draining(rt)
        time.sleep(FAILED_HOLD_S)  # probes of /readyz see the failure meanwhile
        if rt.failed.value == 1:  # the other workers answer what they hold
            _drain(rt, config.drain_timeout_s, workers)
        _stop(server)
        return


def serve(config: ServeConfig) -> int:
    """Build and run the server until SIGTERM / Ctrl+C: 0 after a clean drain, 1 when an
    inference worker or the HTTP process died or the drain timed out."""
    config.check()
    host = "127.0.0.1" if config.host == "localhost" else config.host
    check_port_free(host, config.port)
    server = build_server(config)
    _install_sigterm(server, config)
    info = _runtime().info
    print(
        f"mlic serve: {info['name']} ({len(info['labels'])} labels, {config.backend}, "
        f"{info['precision']}) on "
        f"http://{host}:{config.port}/  (API docs at /docs)",
        flush=True,
    )
    log.debug("serve config: %s", asdict(config) | {"token": "***" if config.token else None})
    watcher = threading.Thread(
        target=watch_processes, args=(server, config), name="mlic-watch", daemon=True
    )
    watcher.start()
    try:
        server.run(
            host=host,
            port=config.port,
            num_api_servers=1,
            log_level="warning",
            generate_client_file=False,
            api_server_worker_type="process",
            timeout_keep_alive=KEEP_ALIVE_S,
            http=_head_deadline_protocol(config.read_timeout_s),
        )
    except RuntimeError as e:  # LitServe: a worker's setup raised (its traceback is above)
        _runtime().stopping.value = 1
        for proc in getattr(server, "inference_workers", None) or []:
            proc.kill()
        raise ConfigError(f"{config.target}: the inference worker did not start ({e})") from None
    return 1 if _runtime().failed.value else 0
