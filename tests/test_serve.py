"""``mlic serve`` over real HTTP: answers equal ``mlic predict``, heat maps, metadata,
health, metrics, dynamic batching, and every kind of bad request answered with a 4xx."""

from __future__ import annotations

import base64
import io
import json
import shutil
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


# ----------------------------------------------------------------------------- example images
def make_run_folder(root: Path, val_images: int = 12) -> Path:
    """A run folder as ``mlic train`` leaves it, for serving: ``config.yaml`` naming a VOC set
    whose val split is on disk (48 px JPEGs), and the controlled ``best.safetensors``."""
    from conftest import make_voc
    from mlic.config import load_config, save_config
    from serve_fixtures import make_checkpoint

    val = [[(NAMES[i % len(NAMES)], 0), ("dog", 0)] for i in range(val_images)]
    voc = make_voc(root / "data", {"train": [[("cat", 0)]] * 2, "val": val}, labels_txt=NAMES)
    run = root / "run"
    run.mkdir(parents=True)
    overrides = ["data.format=voc", f"data.root={voc}", "model.backbone=test_resnet"]
    save_config(load_config(None, overrides), run / "config.yaml")
    make_checkpoint(run / "best.safetensors")
    return run


def test_examples_are_files_of_the_runs_val_split(tmp_path: Path) -> None:
    from mlic.serve.examples import MAX_EXAMPLES, find_examples

    run = make_run_folder(tmp_path)
    voc = tmp_path / "data" / "VOCdevkit" / "VOC2007"
    val_ids = (voc / "ImageSets" / "Main" / "val.txt").read_text().split()
    found = find_examples(str(run), NAMES, 2**20)
    assert len(found) == MAX_EXAMPLES
    assert len({e.path for e in found}) == MAX_EXAMPLES  # spread over the split, no repeats
    for e in found:
        assert e.path.parent == voc / "JPEGImages" and e.path.stem in val_ids
        assert e.media_type == "image/jpeg" and e.name == e.path.name and "dog" in e.labels
    # the checkpoint inside the run folder finds the same; a bare checkpoint, a Hub id: none
    assert find_examples(str(run / "best.safetensors"), NAMES, 2**20) == found
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model.safetensors").write_bytes((run / "best.safetensors").read_bytes())
    assert find_examples(str(bare / "model.safetensors"), NAMES, 2**20) == []
    assert find_examples("hf-hub:someone/model", NAMES, 2**20) == []


def test_examples_skip_files_not_to_offer(tmp_path: Path) -> None:
    """A link out of the data root, a non-image, a file over the upload limit, a missing
    file: not offered; a run whose data is gone, or a demo set not generated yet: none, and
    nothing generated."""
    from mlic.serve.examples import find_examples

    run = make_run_folder(tmp_path, val_images=4)
    images = sorted((tmp_path / "data" / "VOCdevkit" / "VOC2007" / "JPEGImages").glob("*.jpg"))
    val = images[2:]  # make_voc numbers train first
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(val[0].read_bytes())
    val[0].unlink()
    val[0].symlink_to(secret)  # an image, but outside the data root
    val[1].write_bytes(b"not an image at all")
    val[2].unlink()
    assert [e.path for e in find_examples(str(run), NAMES, 2**20)] == [val[3]]
    big = make_run_folder(tmp_path / "big", val_images=2)
    assert find_examples(str(big), NAMES, 100) == []  # every file is over 100 bytes
    shutil.rmtree(tmp_path / "big" / "data")
    assert find_examples(str(big), NAMES, 2**20) == []
    from mlic.config import load_config, save_config

    demo_root = tmp_path / "demo-data"
    overrides = ["data.format=demo", f"data.root={demo_root}", "model.backbone=test_resnet"]
    save_config(load_config(None, overrides), big / "config.yaml")
    assert find_examples(str(big), NAMES, 2**20) == [] and not demo_root.exists()


def test_example_routes_take_an_index_never_a_path(tmp_path: Path) -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from mlic.serve.examples import add_example_routes, find_examples

    run = make_run_folder(tmp_path, val_images=3)
    found = find_examples(str(run), NAMES, 2**20)
    app = FastAPI()
    add_example_routes(app, found, 2**20, [])
    client = TestClient(app)
    listed = client.get("/examples").json()
    assert [x["index"] for x in listed] == [0, 1, 2]
    assert [x["name"] for x in listed] == [e.name for e in found]
    r = client.get("/examples/1")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert r.content == found[1].path.read_bytes()
    assert Image.open(io.BytesIO(r.content)).size == (48, 48)
    for bad in (
        "3",
        "-1",
        "99",
        "1.0",
        "%D9%A1",  # an Arabic-Indic digit one: int() would take it
        "%201",
        "..%2F..%2F..%2Fetc%2Fpasswd",
        "%2Fetc%2Fpasswd",
        found[0].path.name,
        str(found[0].path).replace("/", "%2F"),
    ):
        r = client.get("/examples/" + bad)
        assert r.status_code == 404, (bad, r.status_code)
    # a file changed since start-up into something not offered is not served either
    found[2].path.write_bytes(b"now a text file")
    assert client.get("/examples/2").status_code == 404


def test_no_examples_for_a_bare_checkpoint(served: Served) -> None:
    assert httpx.get(served.url + "/examples").json() == []
    assert httpx.get(served.url + "/examples/0").status_code == 404
    info = httpx.get(served.url + "/v1/model").json()
    assert info["max_images_per_request"] == 8  # the fixture's --max-images: the page's batches
