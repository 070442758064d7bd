"""The page of ``mlic serve`` in a real headless Chromium: upload a photograph, see the
expected labels as bars against their thresholds, move the slider, see a heat map; the
status line follows the slider, controls stay hidden until there is something to control,
a tall photo keeps the controls in view, the legend, several images at once (one card
each), the run's example images, and each label's threshold."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from serve_fixtures import NAMES, THRESHOLDS, Served, photo_jpeg, require_serve_extra, start_server

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


# ----------------------------------------------------------------------------- helpers
def open_page(browser, url: str) -> None:
    from selenium.webdriver.common.by import By

    browser.get(url + "/")
    wait_for(lambda: "baseline" in browser.find_element(By.ID, "model-name").text, what="model")


def upload(browser, *paths: Path) -> None:
    """Pick ``paths`` in the file input (several: one multiple-file pick)."""
    from selenium.webdriver.common.by import By

    browser.find_element(By.ID, "file").send_keys("\n".join(str(p) for p in paths))


def set_slider(browser, value: float) -> None:
    from selenium.webdriver.common.by import By

    browser.execute_script(
        "arguments[0].value = arguments[1];arguments[0].dispatchEvent(new Event('input'));",
        browser.find_element(By.ID, "threshold"),
        value,
    )


def shown_labels(browser) -> list[str]:
    """The labels whose bars are drawn as above threshold, most probable first."""
    from selenium.webdriver.common.by import By

    rows = browser.find_elements(By.CSS_SELECTOR, "#labels li.on")
    return [r.get_attribute("data-label") for r in rows]


def status(browser) -> str:
    from selenium.webdriver.common.by import By

    return browser.find_element(By.ID, "status").text


def write_photo(path: Path, name: str = "chelsea") -> Path:
    path.write_bytes(photo_jpeg(name))
    return path


def no_console_errors(browser) -> bool:
    return not any(
        e["level"] == "SEVERE" for e in browser.get_log("browser") if "favicon" not in e["message"]
    )


# ----------------------------------------------------------------------------- the page's parts
def test_status_line_describes_the_labels_at_the_current_slider(
    served: Served, browser, tmp_path: Path
) -> None:
    open_page(browser, served.url)
    upload(browser, write_photo(tmp_path / "chelsea.jpg"))
    wait_for(lambda: shown_labels(browser), what="bars")
    assert status(browser) == "labels: " + ", ".join(shown_labels(browser))
    for value in (0.0, 0.3, 0.55, 0.9, 1.0):
        set_slider(browser, value)
        on = shown_labels(browser)
        expected = "labels: " + ", ".join(on) if on else "no label above its threshold"
        assert status(browser) == expected, value
    assert status(browser) == "no label above its threshold"  # at 1.0
    set_slider(browser, 0.0)
    assert sorted(status(browser).removeprefix("labels: ").split(", ")) == sorted(NAMES)
    from selenium.webdriver.common.by import By

    browser.find_element(By.ID, "calibrated").click()  # back to the per-label thresholds
    assert status(browser) == "labels: " + ", ".join(shown_labels(browser))
    assert shown_labels(browser)[0] == "dog" and "cat" not in shown_labels(browser)


def test_heat_map_controls_hidden_until_an_upload(served: Served, browser, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    open_page(browser, served.url)
    controls = browser.find_element(By.ID, "heat-controls")
    assert not controls.is_displayed()
    assert browser.execute_script("return getComputedStyle(arguments[0]).display", controls) == (
        "none"
    )
    # the same for every element the page hides with the attribute, whatever its CSS says
    hidden = browser.execute_script(
        "return [...document.querySelectorAll('[hidden]')]"
        ".filter(e => getComputedStyle(e).display !== 'none').map(e => e.id)"
    )
    assert hidden == []
    upload(browser, write_photo(tmp_path / "chelsea.jpg"))
    wait_for(controls.is_displayed, what="heat-map controls")
    options = browser.find_elements(By.CSS_SELECTOR, "#heat-label option")
    assert {o.get_attribute("value") for o in options} == set(NAMES)


def test_tall_photo_keeps_the_heat_map_selector_in_view(
    served: Served, browser, tmp_path: Path
) -> None:
    from PIL import Image
    from selenium.webdriver.common.by import By

    tall = tmp_path / "tall.png"
    Image.new("RGB", (300, 1200), (90, 140, 200)).save(tall)
    open_page(browser, served.url)
    upload(browser, tall)
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#heat-label option"), what="maps")
    wait_for(
        lambda: browser.execute_script(
            "const p = document.getElementById('photo'); return p.complete && p.naturalHeight;"
        ),
        what="photo",
    )
    height = browser.execute_script("return window.innerHeight")
    for element in ("heat-label", "heat-show", "photo"):
        rect = browser.execute_script(
            "return arguments[0].getBoundingClientRect()", browser.find_element(By.ID, element)
        )
        assert rect["top"] >= 0 and rect["bottom"] <= height, (element, rect, height)
    assert browser.find_element(By.ID, "heat-label").is_displayed()
    # the photo is fitted, not cropped or stretched: the bounded box keeps the whole image
    fit = browser.execute_script(
        "return getComputedStyle(document.getElementById('photo')).objectFit"
    )
    assert fit == "contain"


def test_legend_names_the_bar_colours_and_the_tick(served: Served, browser) -> None:
    from selenium.webdriver.common.by import By

    open_page(browser, served.url)
    legend = browser.find_element(By.ID, "legend")
    assert legend.is_displayed()
    text = legend.text
    assert "above the label's threshold" in text and "below the label's threshold" in text
    assert "tick" in text and "decision threshold" in text and "stored" in text
    # the swatches have the bars' colours
    colours = browser.execute_script(
        "return ['above', 'below', 'tick'].map(k => getComputedStyle("
        "document.querySelector('#legend .swatch.' + k)).backgroundColor)"
    )
    assert len(set(colours)) == 3


def test_several_images_get_a_card_each(served: Served, browser, tmp_path: Path) -> None:
    """Ten images, one pick: sent in batches within the server's limits (8 per request with
    heat maps), each gets a card; a non-image among them fails its own card only."""
    from selenium.webdriver.common.by import By

    names = ("chelsea", "astronaut", "coffee", "rocket", "camera")
    photos = [write_photo(tmp_path / f"{i}-{n}.jpg", n) for i, n in enumerate(names * 2)]
    bad = tmp_path / "notes.jpg"
    bad.write_bytes(b"this is text, not a photograph")
    open_page(browser, served.url)
    upload(browser, *photos[:3])
    cards = lambda: browser.find_elements(By.CSS_SELECTOR, "#cards li")  # noqa: E731

    def card_texts(n: int) -> list[str] | None:
        """The n cards' label lines, once every one is answered (read in one script: a new
        pick replaces the cards)."""
        texts = browser.execute_script(
            "return [...document.querySelectorAll('#cards .card-labels')].map(e => e.textContent)"
        )
        done = len(texts) == n and not any(t in ("", "predicting…") for t in texts)
        return texts if done else None

    texts = wait_for(lambda: card_texts(3), what="3 cards")
    assert [t.split(", ")[0] for t in texts] == ["dog"] * 3
    assert [c.find_element(By.CLASS_NAME, "card-name").text for c in cards()] == [
        p.name for p in photos[:3]
    ]
    upload(browser, *photos[:5], bad, *photos[5:])  # 11 files: more than one request holds
    texts = wait_for(lambda: card_texts(11), what="11 cards")
    assert texts[5].startswith("error 415") and "not an image" in texts[5]
    assert all(t.split(", ")[0] == "dog" for i, t in enumerate(texts) if i != 5)
    # every card shows its photograph (the non-image: none, no broken-image icon); choosing
    # one shows its bars, status and heat maps
    shown = wait_for(
        lambda: browser.execute_script(
            "const t = [...document.querySelectorAll('#cards .thumb')];"
            "return t.every(i => i.complete) && t.map(i => i.naturalWidth > 0 && !i.hidden);"
        ),
        what="thumbnails",
    )
    assert shown == [i != 5 for i in range(11)]
    assert not cards()[5].find_element(By.CLASS_NAME, "thumb").is_displayed()
    cards()[7].click()
    assert "selected" in cards()[7].get_attribute("class")
    assert status(browser).startswith(f"{photos[6].name} (8 of 11): labels: dog")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#labels li")) == len(NAMES)
    cards()[5].click()
    assert "415" in status(browser) and not browser.find_elements(By.CSS_SELECTOR, "#labels li")
    assert not browser.find_element(By.ID, "heat-controls").is_displayed()


def test_each_label_row_shows_its_threshold(served: Served, browser, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    open_page(browser, served.url)
    upload(browser, write_photo(tmp_path / "coffee.jpg", "coffee"))
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#labels li"), what="bars")

    def thresholds() -> dict[str, str]:
        rows = browser.find_elements(By.CSS_SELECTOR, "#labels li")
        return {
            r.get_attribute("data-label"): r.find_element(By.CLASS_NAME, "thr").text for r in rows
        }

    assert thresholds() == {n: f"{t:.3f}" for n, t in zip(NAMES, THRESHOLDS, strict=True)}
    set_slider(browser, 0.3)
    assert thresholds() == {n: "0.300" for n in NAMES}


# ----------------------------------------------------------------------------- example images
@pytest.fixture(scope="module")
def run_served(tmp_path_factory: pytest.TempPathFactory):
    """A server started from a run folder whose config's val split is on disk."""
    from test_serve import make_run_folder

    run = make_run_folder(tmp_path_factory.mktemp("serve-run"))
    server = start_server(run, "--max-batch-size", "4", "--max-wait-ms", "20")
    yield server
    server.stop()


def test_example_images_of_the_run(run_served: Served, browser) -> None:
    import httpx
    from selenium.webdriver.common.by import By

    listed = httpx.get(run_served.url + "/examples").json()
    assert len(listed) == 6 and all("dog" in x["labels"] for x in listed)
    for bad in ("6", "-1", "x", "..%2F..%2Fconfig.yaml", "%2Fetc%2Fpasswd", "best.safetensors"):
        assert httpx.get(run_served.url + "/examples/" + bad).status_code == 404, bad
    r = httpx.get(run_served.url + "/examples/0")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    open_page(browser, run_served.url)
    box = browser.find_element(By.ID, "examples-box")
    buttons = wait_for(
        lambda: (
            box.is_displayed()
            and len(found := browser.find_elements(By.CSS_SELECTOR, "#examples button")) == 6
            and found
        ),
        what="6 examples",
    )
    assert listed[0]["name"] in buttons[0].get_attribute("title")
    buttons[2].click()
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, "#labels li"), what="bars")
    assert status(browser) == "labels: " + ", ".join(shown_labels(browser))
    assert shown_labels(browser)[0] == "dog"
    card = browser.find_element(By.CSS_SELECTOR, "#cards li")
    assert card.find_element(By.CLASS_NAME, "card-name").text == listed[2]["name"]
    assert no_console_errors(browser)


def test_no_example_box_for_a_bare_checkpoint(served: Served, browser) -> None:
    from selenium.webdriver.common.by import By

    open_page(browser, served.url)
    wait_for(lambda: browser.execute_script("return document.readyState") == "complete")
    assert not browser.find_element(By.ID, "examples-box").is_displayed()
    assert no_console_errors(browser)
