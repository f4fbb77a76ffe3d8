"""One preparation of a drawing everywhere: the same 7, drawn with a real mouse in Chromium on the explorer's pad
and on the web demo's, gets the class and the probabilities `cnnlab predict` gives for the drawing as a PNG.

The explorer prepares a drawing in its own JavaScript (recipes.js, a port of cnnlab.use.recipes); the demo sends
the PNG to the server, which uses predict's Python. Both pads take black ink on white paper.
"""
from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

pytest.importorskip("fastapi", reason="the web demo's tests need: pip install -e '.[test]'")

from cnnlab.cli import app  # noqa: E402
from cnnlab.use.predict import Predictor  # noqa: E402
from cnnlab.use.serve import create_app  # noqa: E402
from use_runs import running_server, tiny_run  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# a 7: the bar, then the long diagonal; a second stroke crosses it (fractions of the pad)
SEVEN = [[(0.3, 0.2), (0.72, 0.2), (0.45, 0.85)], [(0.4, 0.5), (0.65, 0.5)]]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium: apt-get install -y chromium"),
]
runner = CliRunner()


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs: pip install playwright")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


def draw(tab, selector: str, strokes: list[list[tuple[float, float]]]) -> None:
    """Draw with the mouse; points are fractions of the canvas (0..1), each stroke one press-drag-release."""
    box = tab.locator(selector).bounding_box()
    for stroke in strokes:
        x, y = stroke[0]
        tab.mouse.move(box["x"] + x * box["width"], box["y"] + y * box["height"])
        tab.mouse.down()
        for x, y in stroke[1:]:
            tab.mouse.move(box["x"] + x * box["width"], box["y"] + y * box["height"], steps=8)
        tab.mouse.up()


def canvas_png(tab, selector: str, path: Path) -> Path:
    """The pad's pixels as the PNG a learner would save and give to `cnnlab predict`."""
    url = tab.evaluate(f"document.querySelector('{selector}').toDataURL('image/png')")
    path.write_bytes(base64.b64decode(url.split(",", 1)[1]))
    return path


def predicted(run: Path, png: Path) -> dict[str, float]:
    """`cnnlab predict --json`'s probabilities for a PNG."""
    result = runner.invoke(app, ["predict", str(run), str(png), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.splitlines()[0])["probabilities"]  # stderr says which backend ran it


def test_a_seven_gets_predicts_answer_on_the_explorers_pad_and_on_the_web_demo(browser, tmp_path):
    run = tiny_run("mnist-sample")
    page = tmp_path / "explore.html"
    result = runner.invoke(app, ["explore", str(run), "-o", str(page), "--images", "4"])
    assert result.exit_code == 0, result.output

    explorer = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    explorer.on("pageerror", lambda error: errors.append(str(error)))
    explorer.route(re.compile(r"^(?!file:).*"), lambda route: (errors.append(route.request.url), route.abort()))
    explorer.goto(page.as_uri())
    explorer.wait_for_function("document.body.dataset.ready === 'yes'")
    draw(explorer, "#draw", SEVEN)
    explorer.wait_for_function("document.querySelector('#prediction').textContent.includes('your drawing')")
    explorer_png = canvas_png(explorer, "#draw", tmp_path / "explorer-seven.png")
    paper = np.asarray(Image.open(explorer_png).convert("L"))
    assert paper[0, 0] == 255 and paper.min() == 0  # black ink on white paper
    expected = predicted(run, explorer_png)
    classes = list(expected)
    # the pixels the page's model saw are the ones predict prepares from the PNG, exactly
    seen = np.array(explorer.evaluate("Array.from(outs[0])")).reshape(28, 28)
    assert np.array_equal(np.round(seen * 255).astype(np.uint8), Predictor.from_run(run).prepare(explorer_png))
    probabilities = explorer.evaluate("Array.from(outs[outs.length - 1])")
    assert np.allclose(probabilities, [expected[c] for c in classes], atol=1e-4)
    best = classes[int(np.argmax(probabilities))]
    assert explorer.locator("#prediction").inner_text().startswith(f"{best} (")
    explorer.locator("#draw").scroll_into_view_if_needed()
    explorer.screenshot(path=str(tmp_path / "explorer-seven-page.png"))
    assert errors == []
    explorer.close()

    with running_server(create_app([run])) as url:
        demo = browser.new_page(viewport={"width": 1000, "height": 900})
        demo.goto(url)
        demo.wait_for_function("document.querySelector('#model-info').textContent.includes('parameters')")
        with demo.expect_response(lambda r: "/api/predict" in r.url):
            draw(demo, "#canvas", SEVEN[:1])
        with demo.expect_response(lambda r: "/api/predict" in r.url) as last:
            draw(demo, "#canvas", SEVEN[1:])
        answer = last.value.json()  # the answer to the whole 7, the one the page shows
        top = answer["class_name"]
        demo.wait_for_function(f"document.querySelector('#prediction').textContent === "
                               f"'{top} ({100 * answer['probabilities'][top]:.1f}%)'")
        demo_png = canvas_png(demo, "#canvas", tmp_path / "demo-seven.png")
        drawn = np.asarray(Image.open(demo_png).convert("L")).astype(int)
        assert np.abs(drawn - paper).mean() < 1.0  # the same strokes make the same drawing on both pads
        demo_expected = predicted(run, demo_png)
        assert np.allclose([answer["probabilities"][c] for c in classes], [demo_expected[c] for c in classes],
                           atol=1e-5)
        bars = dict(re.findall(r"(\S+)\s+([\d.]+)%", demo.locator("#bars").inner_text()))
        assert len(bars) >= 3 and all(abs(float(v) / 100 - demo_expected[k]) < 0.0006 for k, v in bars.items())
        assert top == best and np.allclose([demo_expected[c] for c in classes], probabilities, atol=0.02)
        demo.screenshot(path=str(tmp_path / "demo-seven-page.png"), full_page=True)
        demo.close()


def pictures() -> dict[str, tuple[Image.Image, str, int]]:
    """Pictures as a pad could hold them (280x280, opaque) for each recipe: (picture, recipe, input side)."""
    from PIL import ImageDraw

    seven, thin = Image.new("RGB", (280, 280), "white"), Image.new("RGB", (280, 280), "white")
    for picture, width in ((seven, 20), (thin, 3)):  # a 3 px pen: thickened before fitting into 20x20
        ImageDraw.Draw(picture).line([(84, 56), (202, 56), (126, 238)], fill="black", width=width, joint="curve")
    shoe = Image.new("RGB", (280, 280), (250, 248, 240))
    ImageDraw.Draw(shoe).polygon([(30, 200), (100, 100), (150, 110), (170, 160), (250, 170), (255, 210), (30, 210)],
                                 fill=(70, 50, 40))
    noise = np.random.default_rng(0).integers(0, 256, (28, 28, 3), dtype=np.uint8)
    photo = Image.fromarray(noise).resize((280, 280), Image.Resampling.BILINEAR)
    return {"digit": (seven, "digits", 28), "thin digit": (thin, "digits", 28), "clothing": (shoe, "objects", 28),
            "photo": (photo, "photos", 32), "grey photo": (photo, "photos-grey", 32)}


@pytest.mark.parametrize("name", list(pictures()))
def test_the_pages_preparation_gives_predicts_pixels_for_every_recipe(name, browser):
    from cnnlab.inspect.explore import page as explore_page
    from cnnlab.use.recipes import prepare

    picture, recipe, side = pictures()[name]
    channels = 3 if recipe == "photos" else 1
    tab = browser.new_page()
    tab.set_content(f"<script>{(Path(explore_page.__file__).parent / 'recipes.js').read_text()}</script>")
    rgba = np.asarray(picture.convert("RGBA"))
    pixels = tab.evaluate("([data, recipe, side, channels]) => Array.from(preparePicture(recipe, "
                          "{height: 280, width: 280, data: Uint8ClampedArray.from(data)}, "
                          "{height: side, width: side, channels}))", [rgba.ravel().tolist(), recipe, side, channels])
    expected = prepare(picture, recipe, side)
    expected = expected.transpose(2, 0, 1) if expected.ndim == 3 else expected[None]
    assert np.array_equal(np.array(pixels, dtype=np.uint8).reshape(channels, side, side), expected)
    tab.close()
