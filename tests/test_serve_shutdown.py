"""``mlic serve`` with a bearer token, a small bounded queue, and SIGTERM: a real process."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator

import pytest

from serve_fixtures import Served, make_checkpoint, photo_jpeg, require_serve_extra, start_server

require_serve_extra()
import httpx  # noqa: E402

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A server that needs a token, admits 2 requests at once and lets a batch wait 1.5 s."""
    ckpt = make_checkpoint(tmp_path_factory.mktemp("guarded") / "model.safetensors")
    server = start_server(
        ckpt, "--token", TOKEN, "--max-queue", "2", "--max-batch-size", "8", "--max-wait-ms", "1500"
    )
    yield server
    server.stop()


def predict(server: Served, headers: dict[str, str] | None = AUTH) -> httpx.Response:
    files = [("images", ("cat.jpg", photo_jpeg("chelsea"), "image/jpeg"))]
    return httpx.post(server.url + "/v1/predict", files=files, headers=headers, timeout=60)


def test_token_is_required(guarded: Served) -> None:
    r = predict(guarded, headers=None)
    assert r.status_code == 401 and "token" in r.json()["detail"]
    assert predict(guarded, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(guarded.url + "/v1/model").status_code == 401
    assert httpx.get(guarded.url + "/metrics").status_code == 401
    assert httpx.get(guarded.url + "/v1/model", headers=AUTH).json()["labels"][1] == "dog"
    assert httpx.get(guarded.url + "/healthz").status_code == 200  # probes need no token
    assert predict(guarded).status_code == 200


def test_full_queue_answers_503_with_retry_after(guarded: Served) -> None:
    answers: list[httpx.Response] = []
    threads = [threading.Thread(target=lambda: answers.append(predict(guarded))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(r.status_code for r in answers)
    assert set(codes) == {200, 503} and codes.count(200) <= 2, codes
    full = next(r for r in answers if r.status_code == 503)
    assert full.headers["Retry-After"] == "1" and "queue full" in full.json()["detail"]
    assert predict(guarded).status_code == 200  # and it keeps serving


def test_sigterm_drains_in_flight_requests_and_exits_0(guarded: Served) -> None:
    answers: list[httpx.Response] = []
    started = threading.Event()

    def slow() -> None:
        started.set()
        answers.append(predict(guarded))  # waits ~1.5 s in the batching queue

    t = threading.Thread(target=slow)
    t.start()
    started.wait()
    # Send SIGTERM once the request has been admitted (it shows in the queue depth).
    import time

    for _ in range(500):
        if "mlic_queue_depth 1.0" in httpx.get(guarded.url + "/metrics", headers=AUTH).text:
            break
        time.sleep(0.02)
    guarded.proc.send_signal(signal.SIGTERM)
    t.join()
    assert guarded.proc.wait(60) == 0
    assert answers[0].status_code == 200, answers[0].text
    assert answers[0].json()["results"][0]["labels"][0]["label"] == "dog"
    assert "drained" in guarded.log.read_text()
