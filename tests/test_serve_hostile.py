"""``mlic serve`` against hostile clients and signals (issue 29), over real HTTP on 127.0.0.1:
image formats outside the allow-list, stalled and slow clients, big bodies, deep JSON, the
heat-map caps, a process-group SIGTERM, a killed inference worker, and every bad option as
one ``mlic: error:`` line. Every loop here is bounded in time."""

from __future__ import annotations

import io
import os
import select
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_BACKBONE
from mlic.cli import main
from mlic.data.transforms import IMAGE_FORMATS, load_image
from mlic.errors import ConfigError, DataError
from serve_fixtures import Served, make_checkpoint, require_serve_extra, start_server

require_serve_extra()
import httpx  # noqa: E402

from mlic.serve.app import ServeConfig  # noqa: E402
from mlic.serve.validation import (  # noqa: E402
    MAX_HEATMAP_IMAGES,
    MAX_HEATMAP_LABELS,
    ImagePreparer,
    Limits,
    RequestError,
    parse_json_body,
    parse_options,
)

# A tiny hand-made EPS: PIL would hand it to Ghostscript on load() if it were allowed to open it.
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n0 0 moveto 8 8 lineto stroke\nshowpage\n"
LABELS = [f"label{i:02d}" for i in range(12)]  # more labels than MAX_HEATMAP_LABELS
READ_TIMEOUT_S = 3
HEAD = b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"


# ----------------------------------------------------------------------------- helpers
def start_own_group(checkpoint: Path, *args: str, startup_s: float = 180.0) -> Served:
    """``mlic serve`` in a process group of its own (as systemd starts a service), ready."""
    return start_server(checkpoint, *args, startup_s=startup_s, own_group=True)


def stop_group(server: Served) -> None:
    if server.proc.poll() is None:
        os.killpg(server.proc.pid, signal.SIGTERM)
        try:
            server.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait()


def port_of(server: Served) -> int:
    return int(server.url.rsplit(":", 1)[1])


def raw(server: Served, data: bytes) -> socket.socket:
    """A loopback connection that has sent ``data`` and sends nothing more."""
    sock = socket.create_connection(("127.0.0.1", port_of(server)), timeout=10)
    sock.sendall(data)
    return sock


def answer(sock: socket.socket, seconds: float) -> bytes:
    """What the server sends on ``sock`` until it closes it, at most ``seconds`` long."""
    sock.settimeout(seconds)
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return out


def children(pid: int) -> list[tuple[int, bytes]]:
    """(pid, command line) of the processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (d / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            found.append((int(d.name), cmdline))
    return found


def jpeg(size: tuple[int, int] = (96, 72)) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def predict(server: Served, n: int = 1, **params: str) -> httpx.Response:
    files = [("images", (f"{i}.jpg", jpeg(), "image/jpeg")) for i in range(n)]
    return httpx.post(server.url + "/v1/predict", files=files, params=params, timeout=60)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A 12-label server in its own process group, small limits, a 1 s batch wait (so that a
    request is reliably in flight when a test signals the server)."""
    import mlic
    from mlic.engine.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("hostile")
    torch.manual_seed(0)
    model = mlic.create_model("baseline", len(LABELS), backbone=TINY_BACKBONE, pretrained=False)
    ckpt = save_checkpoint(model, root / "model.safetensors", LABELS, input_size=[3, 64, 64])
    limits = {
        "--max-queue": 4,
        "--max-batch-size": 8,
        "--max-wait-ms": 1000,
        "--max-images": 16,
        "--max-upload-mb": 1,
        "--max-request-mb": 2,
        "--read-timeout": READ_TIMEOUT_S,
    }
    server = start_own_group(ckpt, *(str(x) for kv in limits.items() for x in kv))
    yield server
    stop_group(server)


# ----------------------------------------------------------------------------- formats
REFUSED = [  # (case, bytes, words of the 415)
    ("eps", EPS, "PostScript/EPS"),
    ("dos-eps", b"\xc5\xd0\xd3\xc6" + b"\0" * 26 + EPS, "EPS"),
    ("pdf", b"%PDF-1.4\n1 0 obj << >> endobj\ntrailer << >>\n%%EOF\n", "PDF"),
    ("psd", b"8BPS\x00\x01" + b"\0" * 40, "PSD"),
    ("jpeg2000", b"\x00\x00\x00\x0cjP  \r\n\x87\n" + b"\0" * 40, "JPEG 2000"),
    ("unknown", b"\x00\x01\x02 no format at all \xff" * 4, "not an image in an accepted format"),
]


@pytest.mark.parametrize(("case", "data", "words"), REFUSED, ids=[c[0] for c in REFUSED])
def test_other_formats_are_refused_before_any_plugin_runs(
    case: str, data: bytes, words: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    Image.init()
    touched: list[str] = []

    def tripwire(fmt: str) -> tuple[Any, Any]:
        def accept(prefix: bytes) -> bool:
            touched.append(fmt)
            raise AssertionError(f"the {fmt} plugin looked at an upload")

        return accept, accept

    for fmt in list(Image.OPEN):  # every plugin outside the allow-list, EPS included
        if fmt not in IMAGE_FORMATS:
            monkeypatch.setitem(Image.OPEN, fmt, tripwire(fmt))
    with pytest.raises(RequestError) as e:
        ImagePreparer(64, Limits()).prepare(f"x.{case}", data, keep_photo=False)
    assert e.value.status == 415 and words in e.value.message, e.value.message
    with pytest.raises(DataError, match="accepted format"):  # data files: the same list
        load_image(f"x.{case}", data=data)
    assert touched == []


@pytest.mark.parametrize("fmt", IMAGE_FORMATS)
def test_every_allowed_format_still_decodes(fmt: str) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.full((40, 50, 3), 90, np.uint8)).save(buf, fmt)
    image = ImagePreparer(64, Limits()).prepare(f"x.{fmt}", buf.getvalue(), keep_photo=True)
    assert image.pixels.shape == (3, 64, 64) and image.photo is not None


# ----------------------------------------------------------------------------- request bodies
JSON_CASES = [  # (case, body, status, words)
    ("deep-lists", b"[" * 100_000 + b"]" * 100_000, 400, "nested too deeply"),
    ("deep-images", b'{"images": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "nested"),
    ("deep-objects", b'{"a":' * 50_000 + b"1" + b"}" * 50_000, 400, "nested too deeply"),
    ("huge-integer", b'{"images": [], "top_k": ' + b"9" * 5000 + b"}", 400, "not valid JSON"),
    ("not-json", b"{'images': []}", 400, "not valid JSON"),
    ("not-an-object", b'["images"]', 422, "must be an object"),
    ("no-images", b'{"image": "x"}', 400, "'images'"),
]


@pytest.mark.parametrize(
    ("case", "body", "status", "words"), JSON_CASES, ids=[c[0] for c in JSON_CASES]
)
def test_malformed_json_is_a_4xx(case: str, body: bytes, status: int, words: str) -> None:
    with pytest.raises(RequestError) as e:
        parse_json_body(body)
    assert e.value.status == status and words in e.value.message, e.value.message


OPTION_CASES = [  # (options, words of the 422)
    ({"top_k": float("inf")}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"top_k": True}, "top_k"),
    ({"top_k": [[1]]}, "top_k"),
    ({"threshold": float("nan")}, "threshold"),
    ({"threshold": "1e999"}, "threshold"),
    ({"threshold": {"a": 1}}, "threshold"),
]


@pytest.mark.parametrize(("raw", "words"), OPTION_CASES, ids=[str(c[0]) for c in OPTION_CASES])
def test_non_finite_or_odd_options_are_422(raw: dict[str, Any], words: str) -> None:
    with pytest.raises(RequestError) as e:
        parse_options(raw)
    assert e.value.status == 422 and words in e.value.message


def test_hostile_requests_get_4xx_and_the_server_keeps_serving(hostile: Served) -> None:
    url = hostile.url + "/v1/predict"
    json_head = {"content-type": "application/json"}
    cases = {  # case: (response, status, words)
        "eps upload": (httpx.post(url, files=[("images", ("x.eps", EPS))]), 415, "PostScript/EPS"),
        "deep json": (
            httpx.post(url, content=b"[" * 100_000 + b"]" * 100_000, headers=json_head),
            400,
            "nested too deeply",
        ),
        "inf top_k": (
            httpx.post(url, content=b'{"images": ["x"], "top_k": 1e400}', headers=json_head),
            422,
            "top_k",
        ),
        "heat maps for 9 images": (
            predict(hostile, MAX_HEATMAP_IMAGES + 1, heatmaps="all"),
            422,
            f"at most {MAX_HEATMAP_IMAGES}",
        ),
    }
    for what, (r, status, words) in cases.items():
        assert r.status_code == status, (what, r.text)
        assert words in r.json()["detail"] and "Traceback" not in r.text, (what, r.text)
    r = predict(hostile)
    assert r.status_code == 200 and len(r.json()["results"][0]["labels"]) >= 0


def test_heatmaps_are_capped_per_image(hostile: Served) -> None:
    r = predict(hostile, heatmaps="all", scores="all")
    assert r.status_code == 200, r.text
    res = r.json()["results"][0]
    top = sorted(LABELS, key=lambda n: -res["scores"][n])[:MAX_HEATMAP_LABELS]
    assert set(res["heatmaps"]) == set(top)  # the most probable 8 of 12 labels
    r = predict(hostile, heatmaps="true", threshold="0")  # all 12 predicted: 8 maps
    res = r.json()["results"][0]
    assert len(res["labels"]) == len(LABELS) and len(res["heatmaps"]) == MAX_HEATMAP_LABELS
    info = httpx.get(hostile.url + "/v1/model").json()
    assert info["max_heatmaps_per_image"] == MAX_HEATMAP_LABELS
    assert info["max_heatmap_images"] == MAX_HEATMAP_IMAGES


# ----------------------------------------------------------------------------- slow clients
def test_stalled_clients_hold_no_queue_slot_and_get_408(hostile: Served) -> None:
    head = HEAD + b"Content-Length: 5000\r\n\r\n"
    stalled = [raw(hostile, head + b'{"ima') for _ in range(64)]  # 64 > --max-queue 4
    partial_head = raw(hostile, b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-")
    try:
        r = predict(hostile)  # admitted although 64 requests are open
        assert r.status_code == 200, r.text
        metrics = httpx.get(hostile.url + "/metrics").text
        assert "mlic_queue_depth 0.0" in metrics  # the stalled ones never took a slot
        bound = READ_TIMEOUT_S + 30
        answers = [answer(s, bound) for s in stalled]
        assert all(a.startswith(b"HTTP/1.1 408") for a in answers), {a[:40] for a in answers}
        assert b"--read-timeout" in answers[0]
        assert answer(partial_head, bound) == b""  # closed: no head within --read-timeout
    finally:
        for s in [*stalled, partial_head]:
            s.close()


def test_a_trickled_body_meets_one_deadline_not_one_per_byte(hostile: Served) -> None:
    sock = raw(hostile, HEAD + b"Content-Length: 5000\r\n\r\n")
    start, reply = time.monotonic(), b""
    try:
        while time.monotonic() - start < READ_TIMEOUT_S + 30:
            readable, _, _ = select.select([sock], [], [], 0.5)
            if readable:
                reply = answer(sock, 10)
                break
            sock.sendall(b" ")  # one byte every half second, never the whole body
    finally:
        sock.close()
    assert reply.startswith(b"HTTP/1.1 408"), reply[:80]
    assert time.monotonic() - start < READ_TIMEOUT_S + 30


# ----------------------------------------------------------------------------- big bodies
def test_a_declared_300_mb_body_is_refused_before_it_is_sent(hostile: Served) -> None:
    sock = raw(hostile, HEAD + b"Content-Length: 300000000\r\n\r\n")
    try:
        reply = answer(sock, 30)
    finally:
        sock.close()
    assert reply.startswith(b"HTTP/1.1 413") and b"--max-request-mb" in reply, reply[:200]


def test_an_undeclared_300_mb_body_is_cut_off_at_the_limit(hostile: Served) -> None:
    """A chunked body (no Content-Length): the server answers 413 once 2 MB are in and
    closes, long before 300 MB are sent."""
    sock = raw(hostile, HEAD + b"Transfer-Encoding: chunked\r\n\r\n")
    chunk = b"%x\r\n" % 65536 + b"\0" * 65536 + b"\r\n"
    sent, reply, start = 0, b"", time.monotonic()
    try:
        while sent < 300_000_000 and time.monotonic() - start < 60:
            readable, writable, _ = select.select([sock], [sock], [], 1.0)
            if readable:
                reply = answer(sock, 10)
                break
            if writable:
                try:
                    sock.sendall(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    reply = answer(sock, 10)
                    break
                sent += 65536
    finally:
        sock.close()
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert sent < 64_000_000  # the 2 MB limit plus what the socket buffers held


# ----------------------------------------------------------------------------- signals
def test_process_group_sigterm_drains_and_exits_0(hostile: Served) -> None:
    """systemd's stop: SIGTERM to every process of the server. Admitted requests are
    answered, later ones refused, and the server exits 0. (Runs last: it ends ``hostile``.)"""
    answers: list[httpx.Response] = []
    threads = [threading.Thread(target=lambda: answers.append(predict(hostile))) for _ in "abc"]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # until all three wait in the 1 s batch window
        if "mlic_queue_depth 3.0" in httpx.get(hostile.url + "/metrics").text:
            break
        time.sleep(0.02)
    os.killpg(hostile.proc.pid, signal.SIGTERM)
    for t in threads:
        t.join(60)
    assert [r.status_code for r in answers] == [200] * 3, [r.text for r in answers]
    try:
        late = predict(hostile).status_code
    except httpx.HTTPError:
        late = "refused"
    assert late in (503, "refused")
    assert hostile.proc.wait(60) == 0, hostile.log.read_text()
    assert "drained" in hostile.log.read_text()
    deadline = time.monotonic() + 30  # no process of the group is left behind
    while time.monotonic() < deadline:
        try:
            os.killpg(hostile.proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("processes of the stopped server are still running")


def test_a_killed_worker_makes_readyz_fail_and_the_server_exit_1(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    ckpt = make_checkpoint(tmp_path_factory.mktemp("killed") / "model.safetensors")
    server = start_own_group(ckpt)
    try:
        workers = [pid for pid, cmd in children(server.proc.pid) if b"spawn_main" in cmd]
        assert len(workers) == 1, children(server.proc.pid)
        os.kill(workers[0], signal.SIGKILL)
        seen: list[Any] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and server.proc.poll() is None:
            try:
                r = httpx.get(server.url + "/readyz", timeout=5)
                seen.append((r.status_code, r.json().get("reason")))
            except httpx.HTTPError:
                seen.append("refused")
            time.sleep(0.1)
        assert server.proc.wait(60) == 1, server.log.read_text()  # a supervisor sees it
        not_ready = [s for s in seen if s != (200, None)]
        assert not_ready and not_ready[0] in ((503, "an inference worker died"), "refused")
        assert "inference worker died" in server.log.read_text()
        assert (503, "an inference worker died") in seen  # /readyz said so before the exit
    finally:
        stop_group(server)


# ----------------------------------------------------------------------------- options
@pytest.fixture(scope="module")
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield sock.getsockname()[1]


OPTION_ROWS = [  # (case, argv after the target, words of the one error line)
    ("wait-nan", ["--max-wait-ms", "nan"], "--max-wait-ms"),
    ("wait-inf", ["--max-wait-ms", "inf"], "finite"),
    ("wait-negative", ["--max-wait-ms", "-1"], "--max-wait-ms"),
    ("wait-over-timeout", ["--max-wait-ms", "5000", "--timeout", "2"], "--max-wait-ms"),
    ("upload-nan", ["--max-upload-mb", "nan"], "--max-upload-mb"),
    ("upload-zero", ["--max-upload-mb", "0"], "--max-upload-mb"),
    ("upload-negative", ["--max-upload-mb", "-3"], "--max-upload-mb"),
    ("request-inf", ["--max-request-mb", "inf"], "--max-request-mb"),
    ("request-below-upload", ["--max-upload-mb", "8", "--max-request-mb", "2"], "--max-request"),
    ("threads-negative", ["--threads", "-1"], "--threads"),
    ("threads-zero", ["--threads", "0"], "--threads"),
    ("workers-zero", ["--workers", "0"], "--workers"),
    ("batch-negative", ["--max-batch-size", "-4"], "--max-batch-size"),
    ("batch-float", ["--max-batch-size", "2.5"], "--max-batch-size"),
    ("queue-zero", ["--max-queue", "0"], "--max-queue"),
    ("queue-inf", ["--max-queue", "inf"], "--max-queue"),
    ("images-zero", ["--max-images", "0"], "--max-images"),
    ("pixels-negative", ["--max-pixels", "-1"], "--max-pixels"),
    ("timeout-zero", ["--timeout", "0"], "--timeout"),
    ("timeout-nan", ["--timeout", "nan"], "--timeout"),
    ("read-timeout-zero", ["--read-timeout", "0"], "--read-timeout"),
    ("drain-negative", ["--drain-timeout", "-1"], "--drain-timeout"),
    ("port-too-high", ["--port", "70000"], "--port"),
    ("port-privileged", ["--port", "80"], "--port"),
    ("port-not-a-number", ["--port", "http"], "--port"),
    ("port-in-use", ["--port", "{busy}"], "in use"),
    ("device-absent", ["--device", "cuda:7"], "cuda:7"),
    ("device-unknown", ["--device", "tpu"], "tpu"),
    ("token-empty", ["--token", ""], "--token"),
    ("token-newline", ["--token", "abc\ndef"], "--token"),
    ("host-other", ["--host", "10.1.2.3"], "--host"),
]


def _call(argv: list[str]) -> int:
    """``main(argv)`` in a thread: a regression that starts a server fails, never hangs."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["code"] = main(argv)
        except SystemExit as e:  # argparse
            out["code"] = e.code
        except BaseException as e:  # noqa: BLE001 -- handed to the test
            out["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), f"mlic {' '.join(argv)} did not return"
    if "error" in out:
        raise out["error"]
    return out["code"]


@pytest.mark.parametrize(("case", "argv", "words"), OPTION_ROWS, ids=[r[0] for r in OPTION_ROWS])
def test_bad_serve_options_are_one_error_line(
    case: str, argv: list[str], words: str, busy_port: int, tmp_path: Path, capsys: Any
) -> None:
    if case == "device-absent" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    target = str(tmp_path / "never-loaded.safetensors")
    code = _call(["serve", target, *(a.format(busy=busy_port) for a in argv)])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("mlic: error: "), err
    assert words in lines[0], lines[0]


CONFIG_ROWS = [  # ServeConfig used from Python: the same checks as the command line
    ({"max_wait_ms": float("nan")}, "--max-wait-ms"),
    ({"max_upload_mb": float("inf")}, "--max-upload-mb"),
    ({"threads": -1}, "--threads"),
    ({"port": 0}, "--port"),
    ({"workers": True}, "--workers"),
    ({"read_timeout_s": 0.0}, "--read-timeout"),
]


@pytest.mark.parametrize(("change", "words"), CONFIG_ROWS, ids=[str(c[0]) for c in CONFIG_ROWS])
def test_serve_config_checks_every_number(change: dict[str, Any], words: str) -> None:
    config = ServeConfig(target="m.safetensors", **change)
    with pytest.raises(ConfigError, match=words):
        config.check()
    ServeConfig(target="m.safetensors").check()  # the defaults pass
