"""``mlic serve``: a trained model behind an HTTP API, with dynamic batching, on LitServe.

Processes (LitServe's layout): the main process owns the shared state and waits; one
uvicorn/FastAPI process (forked) answers HTTP, validates and decodes uploads
(:mod:`mlic.serve.validation`) and puts each request on LitServe's queue; ``--workers``
inference processes (spawned) each load the model once, take up to ``--max-batch-size``
queued requests (waiting at most ``--max-wait-ms`` for more), run them as one tensor
batch and answer each request.

LitServe internals used (hence the ``litserve<0.3`` pin): the batched loop's sentinel and
response statuses (:class:`WaitForFirstBatchedLoop`), ``workers_setup_status`` (for
``/readyz``) and ``_shutdown_event`` (SIGTERM). This module deliberately has no
``from __future__ import annotations``: FastAPI reads
the parameter annotation of :meth:`MlicAPI.decode_request` (an ``Annotated`` dependency)
at runtime, and that dependency is what validates requests in the HTTP process.
"""

import base64
import hmac
import io
import json
import logging
import multiprocessing as mp
import os
import signal
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

from mlic.engine.precision import ONNX_RUNTIME, Precision, resolve_precision
from mlic.errors import ConfigError
from mlic.files import file_sha256
from mlic.serve.validation import (
    ImagePreparer,
    Limits,
    PreparedRequest,
    RequestError,
    display_name,
    parse_options,
)

__all__ = ["ServeConfig", "MlicAPI", "build_server", "serve", "model_info"]

log = logging.getLogger("mlic.serve")

INFER_CHUNK = 64  # images per forward pass inside one dynamic batch (bounds memory)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


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
    max_images: int = 32
    max_pixels: int = 40_000_000
    max_queue: int = 64
    token: str | None = None
    timeout_s: float = 60.0
    drain_timeout_s: float = 30.0
    device: str = "cpu"
    precision: str = "auto"  # torch backend: auto / fp32 / bf16 (mlic.engine.precision)
    threads: int | None = None
    model_path: str = field(default="", init=False)  # resolved .safetensors or .onnx

    def limits(self) -> Limits:
        return Limits(int(self.max_upload_mb * 2**20), self.max_images, self.max_pixels)


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
        "input_size": [int(s) for s in meta["input_size"]],
        "mean": [float(m) for m in meta["mean"]],
        "std": [float(s) for s in meta["std"]],
        "mlic_version": meta.get("mlic_version"),
        "server_mlic_version": __version__,
        "file": path.name,
        "sha256": file_sha256(path),
        "backend": backend,
        "heatmaps": backend == "torch",
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
    batch_requests: Any  # shared per-bucket counts of requests per dynamic batch (+ sum)
    batch_images: Any  # the same for images per dynamic batch
    metrics: dict[str, Any] = field(default_factory=dict)


_RUNTIME: _Runtime | None = None


def _runtime() -> _Runtime:
    if _RUNTIME is None:
        raise RuntimeError("mlic.serve: no server built in this process (call build_server)")
    return _RUNTIME


def _error(status: int, message: str, retry_after: int | None = None) -> HTTPException:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return HTTPException(status_code=status, detail=message, headers=headers)


async def _read_body(request: Request, cap: int) -> bytes:
    """The request body, refusing (413) anything over ``cap`` bytes before reading it all."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > cap:
        raise _error(413, f"request body of {int(length):,} bytes is over the limit of {cap:,}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise _error(413, f"request body is over the limit of {cap:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _parse_request(request: Request, query: dict[str, Any]) -> PreparedRequest:
    """Multipart uploads (field ``images``) or JSON (``{"images": [base64, ...]}``) -> prepared."""
    rt = _runtime()
    limits = rt.preparer.limits
    cap = limits.max_upload_bytes * limits.max_images + (1 << 20)
    body = await _read_body(request, cap)
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
        keep = opts.heatmaps != "false"
        images = await run_in_threadpool(
            lambda: [
                rt.preparer.prepare(display_name(n, i), d, keep) for i, (n, d) in enumerate(files)
            ]
        )
        return PreparedRequest(images=images, options=opts)
    if ctype.startswith("application/json"):
        try:
            doc = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(400, f"body is not valid JSON ({e})") from None
        if not isinstance(doc, dict):
            raise RequestError(422, 'JSON body must be an object {"images": [base64, ...]}')
        if "images" not in doc:
            others = ", ".join(repr(k) for k in list(doc)[:3]) or "none"
            raise RequestError(400, f"JSON body has no 'images' field (fields: {others})")
        items = doc.pop("images")
        if not isinstance(items, list):
            items = [items]
        raw_opts.update(doc)
        opts = parse_options(raw_opts)
        _check_heatmaps(opts.heatmaps)
        rt.preparer.check_count(len(items))
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
    """FastAPI dependency of ``POST /v1/predict``: admit (bounded queue), parse, validate.

    Runs in the HTTP process. A full queue answers 503 with ``Retry-After``; a bad request
    a 4xx naming the problem; the admitted request counts in the queue depth until answered.
    """
    rt = _runtime()
    if rt.draining.value:
        raise _error(503, "server is shutting down", retry_after=5)
    with rt.inflight.get_lock():
        if rt.inflight.value >= rt.config.max_queue:
            raise _error(
                503, f"queue full ({rt.config.max_queue} requests waiting); retry", retry_after=1
            )
        rt.inflight.value += 1
    try:
        query = {"threshold": threshold, "top_k": top_k, "scores": scores, "heatmaps": heatmaps}
        try:
            prepared = await _parse_request(
                request, {k: v for k, v in query.items() if v is not None}
            )
        except RequestError as e:
            raise _error(e.status, e.message) from None
        yield prepared
    finally:
        with rt.inflight.get_lock():
            rt.inflight.value -= 1


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
            self.put_response(transport, response_queue_id, uid, (), LitAPIStatus.START,
                              LoopResponseType.REGULAR)  # fmt: skip
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

    def __init__(self, config: ServeConfig, batch_requests: Any, batch_images: Any) -> None:
        super().__init__(
            max_batch_size=config.max_batch_size,
            batch_timeout=config.max_wait_ms / 1000.0,
            api_path="/v1/predict",
            loop=WaitForFirstBatchedLoop() if config.max_batch_size > 1 else "auto",
        )
        self.config = config
        self.batch_requests = batch_requests
        self.batch_images = batch_images

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
        from mlic.engine.host import retain_freed_memory
        from mlic.inference import OnnxPredictor, Predictor

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
                    chosen = names if opts.heatmaps == "all" else pred.labels
                    entry["heatmaps"] = {
                        n: _png_base64(overlay_heatmap(photo, maps[k, index[n]])) for n in chosen
                    }
                results.append(entry)
                k += 1
            out.append({"model": self.predictor.meta.get("model"), "batch_size": len(requests),
                        "results": results})  # fmt: skip
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
        },  # fmt: skip
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


def build_server(config: ServeConfig) -> ls.LitServer:
    """The LitServer with the API, the page, /v1/model, /healthz, /readyz and /metrics."""
    global _RUNTIME
    from prometheus_client import CollectorRegistry, Counter, Histogram

    path, meta = resolve_model(config)
    config.model_path = str(path)
    info = model_info(path, meta, config.backend, str(serve_precision(config)))
    spawn = mp.get_context("spawn")  # shared with spawned inference workers
    batch_requests = spawn.Array("q", len(BATCH_BUCKETS) + 2)
    batch_images = spawn.Array("q", len(BATCH_BUCKETS) + 2)
    rt = _Runtime(
        config=config,
        info=info,
        preparer=ImagePreparer(int(info["input_size"][-1]), config.limits()),
        inflight=mp.Value("i", 0),
        draining=mp.Value("i", 0),
        batch_requests=batch_requests,
        batch_images=batch_images,
    )
    registry = CollectorRegistry()
    rt.metrics = {
        "registry": registry,
        "requests": Counter(
            "mlic_requests", "predict requests by status code", ["code"], registry=registry
        ),  # fmt: skip
        "errors": Counter(
            "mlic_errors", "predict requests answered with an error (4xx/5xx)", registry=registry
        ),  # fmt: skip
        "latency": Histogram(
            "mlic_request_latency_seconds",
            "predict request latency",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        ),  # fmt: skip
    }
    registry.register(_metrics_collector(rt))
    _RUNTIME = rt

    api = MlicAPI(config, batch_requests, batch_images)
    accelerator = "cpu" if config.device == "cpu" else "cuda"
    server = ls.LitServer(
        api,
        accelerator=accelerator,
        devices=1,
        workers_per_device=config.workers,
        timeout=config.timeout_s,
    )
    app = server.app
    app.title = "mlic serve"
    app.description = (
        f"Multi-label image classification: {info['name']} ({len(info['labels'])} labels)"
    )
    # LitServe's own "/" says "litserve running"; the page takes its place.
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

    @app.get("/healthz", summary="Liveness: the HTTP process answers")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: every inference worker has loaded the model")
    async def readyz() -> JSONResponse:
        from litserve.utils import WorkerSetupStatus

        status = dict(getattr(server, "workers_setup_status", None) or {})
        ready = bool(status) and all(v == WorkerSetupStatus.READY for v in status.values())
        if rt.draining.value:
            return JSONResponse({"ready": False, "reason": "shutting down"}, status_code=503)
        if not ready:
            return JSONResponse({"ready": False, "reason": "workers starting"}, status_code=503)
        return JSONResponse({"ready": True, "workers": len(status)})

    @app.get("/metrics", dependencies=auth, summary="Prometheus metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

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

    return server


def _install_sigterm(server: ls.LitServer, config: ServeConfig) -> None:
    """SIGTERM: refuse new requests (503), wait for admitted ones to be answered, then stop."""
    rt = _runtime()

    def drain_and_stop() -> None:
        rt.draining.value = 1
        deadline = time.monotonic() + config.drain_timeout_s
        while rt.inflight.value > 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        print("mlic serve: drained, stopping", flush=True)
        event = getattr(server, "_shutdown_event", None)
        if event is not None:
            event.set()
        else:  # still starting: nothing is in flight
            os._exit(0)

    def on_sigterm(signum: int, frame: Any) -> None:
        # A thread of its own: the main thread is blocked in a manager call that a signal
        # handler must not re-enter.
        threading.Thread(target=drain_and_stop, name="mlic-drain", daemon=True).start()

    signal.signal(signal.SIGTERM, on_sigterm)


def serve(config: ServeConfig) -> int:
    """Build and run the server until SIGTERM / Ctrl+C; 0 after a clean shutdown."""
    host = "127.0.0.1" if config.host == "localhost" else config.host
    if host not in ("127.0.0.1", "0.0.0.0", "::"):
        raise ConfigError(f"--host {config.host}: LitServe binds 127.0.0.1, 0.0.0.0 or :: only")
    if config.max_wait_ms / 1000.0 >= config.timeout_s:
        raise ConfigError(f"--max-wait-ms {config.max_wait_ms:g} must be below the request timeout")
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
    server.run(host=host, port=config.port, num_api_servers=1, log_level="warning",
               generate_client_file=False, api_server_worker_type="process")  # fmt: skip
    return 0
