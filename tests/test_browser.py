"""End to end: a real browser (Debian's Chromium driven by Playwright) draws a digit on the demo page.

Needs /usr/bin/chromium (CI: apt-get install -y chromium); `playwright install` is never needed.
"""
from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the web demo's tests need: pip install -e '.[test]'")

from cnnlab.use.serve import create_app  # noqa: E402
from use_runs import running_server, tiny_run  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium: apt-get install -y chromium"),
]


@pytest.fixture(scope="module")
def page():
    """A browser page on the demo serving a digits model and a clothing model."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs: pip install playwright")
    application = create_app([tiny_run("mnist-sample"), tiny_run("fashion-mnist-sample")])
    with running_server(application) as url, sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            tab = browser.new_page(viewport={"width": 1000, "height": 900})
            tab.goto(url)
            tab.wait_for_function("document.querySelector('#model-info').textContent.includes('parameters')")
            yield tab
        finally:
            browser.close()


def draw(page, strokes: list[list[tuple[float, float]]]) -> None:
    """Draw with the mouse; points are fractions of the canvas (0..1), each stroke one press-drag-release."""
    box = page.locator("#canvas").bounding_box()
    for stroke in strokes:
        x, y = stroke[0]
        page.mouse.move(box["x"] + x * box["width"], box["y"] + y * box["height"])
        page.mouse.down()
        for x, y in stroke[1:]:
            page.mouse.move(box["x"] + x * box["width"], box["y"] + y * box["height"], steps=8)
        page.mouse.up()


def test_drawing_a_digit_shows_a_prediction(page, tmp_path):
    page.locator("#clear").click()
    # a "7": the bar, then the long diagonal; a second stroke crosses it
    draw(page, [[(0.3, 0.2), (0.72, 0.2), (0.45, 0.85)], [(0.4, 0.5), (0.65, 0.5)]])
    page.wait_for_function("document.querySelectorAll('#bars li').length >= 3 && "
                           "!document.body.classList.contains('busy')")  # the answer to the last stroke
    prediction = page.locator("#prediction").inner_text()
    assert prediction.split(" ")[0] in [str(d) for d in range(10)] and "%" in prediction
    assert page.locator("#input-image").is_visible()
    assert "centred by mass, light on dark" in page.locator("#seen-caption").inner_text()
    assert page.locator("#feature-maps img").count() == 4  # conv1's four filters
    assert page.locator("#error").is_hidden()
    page.screenshot(path=str(tmp_path / "serve-drawing.png"), full_page=True)
    assert (tmp_path / "serve-drawing.png").stat().st_size > 10_000


def test_uploading_a_picture_and_switching_models(page, tmp_path):
    from PIL import Image, ImageDraw

    shoe = Image.new("RGB", (400, 300), "white")
    ImageDraw.Draw(shoe).polygon([(60, 200), (140, 100), (200, 110), (230, 160), (340, 180), (345, 220), (60, 220)],
                                 fill=(70, 50, 40))
    shoe.save(tmp_path / "shoe.jpg")
    page.locator("#model").select_option("fashion-mnist")
    page.locator("#upload").set_input_files(str(tmp_path / "shoe.jpg"))
    page.wait_for_function("document.querySelector('#bars').textContent.match(/Sneaker|Sandal|Ankle boot|Bag|"
                           "T-shirt|Trouser|Pullover|Dress|Coat|Shirt/) && !document.body.classList.contains('busy')")
    assert "fashion-mnist-sample" in page.locator("#model-info").inner_text()
    assert "trimmed to the object" in page.locator("#seen-caption").inner_text()  # the recipe's own steps
    assert "light on dark" not in page.evaluate("SEEN.photos")  # a colour photo is never inverted
    page.screenshot(path=str(tmp_path / "serve-upload.png"), full_page=True)


def test_a_bad_upload_shows_the_servers_message(page, tmp_path):
    (tmp_path / "notes.png").write_text("not a picture")
    page.locator("#upload").set_input_files(str(tmp_path / "notes.png"))
    page.wait_for_function("!document.querySelector('#error').hidden")
    assert "not a readable image" in page.locator("#error").inner_text()
