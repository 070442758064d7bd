"""``mlic serve`` over real HTTP: answers equal ``mlic predict``, heat maps, metadata,
health, metrics, dynamic batching, and every kind of bad request answered with a 4xx."""

from __future__ import annotations

import base64
import io
import json
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mlic.cli import main
from serve_fixtures import NAMES, THRESHOLDS, Served, photo_jpeg, require_serve_extra

require_serve_extra()
import httpx  # noqa: E402

PHOTOS = ("chelsea", "astronaut", "coffee", "rocket")


def post(
    served: Served,
    files: list[tuple[str, bytes]] | None = None,
    field: str = "images",
    **params: str,
) -> httpx.Response:
    parts = [(field, (name, data, "application/octet-stream")) for name, data in files or []]
    return httpx.post(served.url + "/v1/predict", params=params, files=parts or None, timeout=60)


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header claiming width x height 1-bit pixels, with one tiny IDAT chunk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width // 8 + 1) * 16)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Real photographs as files: JPEGs, a PNG with alpha and a greyscale PNG."""
    root = tmp_path_factory.mktemp("photos")
    paths = []
    for name in PHOTOS:
        p = root / f"{name}.jpg"
        p.write_bytes(photo_jpeg(name))
        paths.append(p)
    rgba = Image.open(paths[0]).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(root / "alpha.png")
    Image.open(paths[1]).convert("L").save(root / "grey.png")
    return [*paths, root / "alpha.png", root / "grey.png"]


def test_answers_equal_mlic_predict(
    served: Served, photo_files: list[Path], tmp_path: Path
) -> None:
    out = tmp_path / "pred.jsonl"
    assert (
        main(
            ["predict", str(served.checkpoint), *map(str, photo_files), "--output", str(out), "-q"]
        )
        == 0
    )
    expected = [json.loads(line) for line in out.read_text().splitlines()]
    r = post(served, [(p.name, p.read_bytes()) for p in photo_files], scores="all")
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["name"] for x in results] == [p.name for p in photo_files]
    for got, want in zip(results, expected, strict=True):
        np.testing.assert_allclose(
            [got["scores"][n] for n in NAMES], [want["scores"][n] for n in NAMES], atol=1e-6, rtol=0
        )
        assert [x["label"] for x in got["labels"]] == want["labels"]
    # The controlled model: 'dog' everywhere, above its calibrated threshold 0.6.
    assert all(x["labels"][0]["label"] == "dog" for x in results)
    assert results[0]["labels"][0]["threshold"] == pytest.approx(0.6)
    # The same through base64 JSON, one by one, with a global threshold and top_k.
    doc = {"images": [base64.b64encode(photo_files[0].read_bytes()).decode()], "scores": "all"}
    r = httpx.post(served.url + "/v1/predict", json=doc, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["scores"] == pytest.approx(results[0]["scores"], abs=1e-6)
    r = post(served, [("a.jpg", photo_files[0].read_bytes())], threshold="0.0", top_k="2")
    labels = r.json()["results"][0]["labels"]
    assert len(labels) == 2 and labels[0]["label"] == "dog" and labels[1]["threshold"] == 0.0
    assert "scores" not in r.json()["results"][0]


def test_heatmaps_are_png_overlays(served: Served) -> None:
    jpg = photo_jpeg("chelsea")
    r = post(served, [("cat.jpg", jpg)], heatmaps="true")
    assert r.status_code == 200, r.text
    res = r.json()["results"][0]
    assert set(res["heatmaps"]) == {x["label"] for x in res["labels"]}
    r = post(served, [("cat.jpg", jpg)], heatmaps="all")
    maps = r.json()["results"][0]["heatmaps"]
    assert set(maps) == set(NAMES)
    photo = Image.open(io.BytesIO(jpg))
    for url in maps.values():
        assert url.startswith("data:image/png;base64,")
        img = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
        assert img.format == "PNG" and max(img.size) <= 384
        assert abs(img.size[0] / img.size[1] - photo.size[0] / photo.size[1]) < 0.02
    assert maps["dog"] != maps["cat"]  # each label has its own map


def listening_addresses(port: int) -> set[str]:
    """Local addresses of sockets listening on ``port`` (Linux /proc/net/tcp, tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            addr, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(addr)
    return found


def test_binds_to_loopback_by_default(served: Served) -> None:
    port = int(served.url.rsplit(":", 1)[1])
    addrs = listening_addresses(port)
    if not addrs:
        pytest.skip("no /proc/net/tcp here")
    assert addrs == {"0100007F"}  # 127.0.0.1, little-endian hex; not 0.0.0.0


def test_model_health_docs_and_page(served: Served) -> None:
    info = httpx.get(served.url + "/v1/model").json()
    assert info["labels"] == NAMES and info["thresholds"] == pytest.approx(THRESHOLDS)
    assert info["name"] == "baseline" and info["input_size"] == [3, 64, 64]
    import hashlib

    assert info["sha256"] == hashlib.sha256(served.checkpoint.read_bytes()).hexdigest()
    assert info["mlic_version"] and info["backend"] == "torch"
    assert httpx.get(served.url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(served.url + "/readyz").json()["ready"] is True
    schema = httpx.get(served.url + "/openapi.json").json()
    assert {"/v1/predict", "/v1/model", "/healthz", "/readyz", "/metrics"} <= set(schema["paths"])
    body = schema["paths"]["/v1/predict"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(body)
    assert httpx.get(served.url + "/docs").status_code == 200
    page = httpx.get(served.url + "/").text
    assert "<title>mlic serve</title>" in page
    assert "http" not in page.replace("http-equiv", "")  # no CDN: every asset is local
    assert httpx.get(served.url + "/static/app.js").status_code == 200


def test_dynamic_batching_and_metrics(served: Served) -> None:
    jpg = photo_jpeg("coffee")
    codes: list[int] = []
    sizes: list[int] = []

    def one() -> None:
        r = post(served, [("c.jpg", jpg)])
        codes.append(r.status_code)
        sizes.append(r.json().get("batch_size", 0))

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes == [200] * 8
    assert max(sizes) > 1  # concurrent requests were answered from one model batch
    text = httpx.get(served.url + "/metrics").text
    metrics = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            metrics[key] = float(value)
    assert metrics['mlic_requests_total{code="200"}'] >= 8
    assert metrics["mlic_batch_requests_sum"] > metrics["mlic_batch_requests_count"]
    assert metrics["mlic_request_latency_seconds_count"] >= 8
    assert "mlic_queue_depth" in metrics and "mlic_errors_total" in metrics
    assert any(k.startswith("mlic_batch_images_bucket") for k in metrics)


def test_bad_requests_get_4xx_and_the_server_keeps_serving(served: Served) -> None:
    jpg = photo_jpeg("chelsea")
    cases = {
        "not an image": (post(served, [("notes.txt", b"hello, I am text")]), 415, "not an image"),
        "empty": (post(served, [("empty.jpg", b"")]), 400, "empty upload"),
        "truncated": (post(served, [("half.jpg", jpg[: len(jpg) // 2])]), 400, "truncated"),
        "bomb": (post(served, [("bomb.png", png_bomb())]), 413, "pixels"),
        "too big": (post(served, [("big.jpg", jpg + b"\0" * (2 << 20))]), 413, "upload limit"),
        "wrong field": (post(served, [("a.jpg", jpg)], field="file"), 400, "'file'"),
        "no image": (
            httpx.post(served.url + "/v1/predict", files={"top_k": (None, "1")}),
            400,
            "no image",
        ),
        "100 images": (post(served, [(f"{i}.jpg", jpg) for i in range(100)]), 413, "100 images"),
        "bad option": (post(served, [("a.jpg", jpg)], threshold="2"), 422, "threshold"),
        "bad base64": (
            httpx.post(served.url + "/v1/predict", json={"images": ["%%%"]}),
            422,
            "base64",
        ),
        "no images key": (
            httpx.post(served.url + "/v1/predict", json={"image": "x"}),
            400,
            "'images'",
        ),
        "raw body": (
            httpx.post(
                served.url + "/v1/predict", content=jpg, headers={"content-type": "image/jpeg"}
            ),
            415,
            "content type",
        ),
    }
    for what, (r, status, needle) in cases.items():
        assert r.status_code == status, (what, r.text)
        assert needle in json.dumps(r.json()["detail"]), (what, r.text)
    # A JSON entry that names a path or URL is data, not a path: rejected as base64.
    for bait in ("/etc/passwd", "http://127.0.0.1:1/x.jpg", "file:///etc/hostname"):
        r = httpx.post(served.url + "/v1/predict", json={"images": [bait]})
        assert r.status_code == 422 and "base64" in r.json()["detail"]
    r = post(served, [("ok.jpg", jpg)])
    assert r.status_code == 200 and r.json()["results"][0]["labels"][0]["label"] == "dog"
    metrics = httpx.get(served.url + "/metrics").text
    assert 'mlic_requests_total{code="415"}' in metrics
