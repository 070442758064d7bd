"""The page of ``mlic serve`` in a real headless Chromium: upload a photograph, see the
expected labels as bars against their thresholds, move the slider, see a heat map."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from serve_fixtures import NAMES, Served, photo_jpeg, require_serve_extra

require_serve_extra()
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None, reason="needs chromium and chromedriver"
)


def wait_for(condition, timeout: float = 30.0, what: str = "condition"):
    """Poll ``condition()`` until it returns something truthy (no timing assertion)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def browser(tmp_path: Path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1200,900",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_page_predicts_a_photograph_and_shows_a_heatmap(
    served: Served, browser, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    photo = tmp_path / "chelsea.jpg"
    photo.write_bytes(photo_jpeg("chelsea"))
    browser.get(served.url + "/")
    wait_for(lambda: "baseline" in browser.find_element(By.ID, "model-name").text, what="model")
    browser.find_element(By.ID, "file").send_keys(str(photo))
    rows = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#labels li"), what="bars")
    assert sorted(r.get_attribute("data-label") for r in rows) == sorted(NAMES)
    on = [
        r.get_attribute("data-label")
        for r in browser.find_elements(By.CSS_SELECTOR, "#labels li.on")
    ]
    assert on[0] == "dog" and "cat" not in on  # the controlled model's answer
    assert "dog" in browser.find_element(By.ID, "status").text
    # the heat map of the chosen label is drawn over the photo: a loaded image of real size
    heat = wait_for(
        lambda: browser.execute_script(
            "const h = document.getElementById('heatmap');"
            "return h.complete && h.naturalWidth > 0 && h.getBoundingClientRect().width > 0"
            " ? [h.naturalWidth, h.naturalHeight, h.src.slice(0, 22)] : null;"
        ),
        what="heat map",
    )
    assert heat[0] > 0 and heat[1] > 0 and heat[2] == "data:image/png;base64,"
    assert browser.find_element(By.ID, "heat-label").get_attribute("value") == "dog"
    # choosing another label swaps the overlay
    before = browser.find_element(By.ID, "heatmap").get_attribute("src")
    browser.find_element(By.CSS_SELECTOR, '#labels li[data-label="cat"]').click()
    assert browser.find_element(By.ID, "heatmap").get_attribute("src") != before
    # the slider at 0 puts every label above threshold; at 1, none
    slider = browser.find_element(By.ID, "threshold")
    for value, expected in ((0, len(NAMES)), (1, 0)):
        browser.execute_script(
            "arguments[0].value = arguments[1];arguments[0].dispatchEvent(new Event('input'));",
            slider,
            value,
        )
        assert len(browser.find_elements(By.CSS_SELECTOR, "#labels li.on")) == expected
    assert not any(
        e["level"] == "SEVERE" for e in browser.get_log("browser") if "favicon" not in e["message"]
    )
