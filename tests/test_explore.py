"""`cnnlab explore`: the page's stages compute what the network does, the numbers it embeds give torch's
activations, bad input is one line, and in a real browser (Debian's Chromium driven by Playwright) a
clicked pixel shows torch's value, for a grey, a colour and a residual model."""
from __future__ import annotations

import base64
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cnnlab import pipeline
from cnnlab.cli import app
from cnnlab.config import list_presets, load_config
from cnnlab.data.pixels import image_input
from cnnlab.inspect.explore import explore_data, explore_stages, replay
from cnnlab.inspect.explore import page as explore_page
from cnnlab.inspect.show import LoadedRun
from cnnlab.models.cnn import build_model
from use_runs import tiny_run

runner = CliRunner()
CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
in_browser = pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium: apt-get install -y chromium")


def shuffled_norms(model: torch.nn.Module, seed: int = 0) -> None:
    """Batch-norm statistics and scales far from their initial 0/1 (negative scales too), so that a stage
    applied in the wrong order or skipped changes the numbers."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) * 3 - 1.5)
            module.bias.data.copy_(torch.rand(n, generator=generator) - 0.5)


ODD_LAYERS = ["model.conv.0.pool_first=true", "model.conv.0.batch_norm=true", "model.conv.0.pool=max",
              "model.conv.0.activation=gelu"]


@pytest.mark.unit
@pytest.mark.parametrize("name", [*list_presets(), "pool-first", "fast-fashion"])
def test_the_stages_compute_what_the_network_computes(name):
    config = (load_config("seed", overrides=ODD_LAYERS) if name == "pool-first" else
              load_config("fast", overrides=["data.dataset=fashion-mnist"]) if name == "fast-fashion"  # whitening
              else load_config(name))
    shape = (32, 32, 3) if name == "deep-color" else (28, 28, 1)
    model = build_model(config.model, shape, 10, seed=0).eval()
    shuffled_norms(model)
    x = torch.rand(2, shape[2], shape[0], shape[1], generator=torch.Generator().manual_seed(1))
    stages = explore_stages(model)
    outputs = replay(model, stages, x)
    with torch.no_grad():
        logits = model(x)
    assert stages[-1].kind == "softmax" and stages[-2].name == "classifier"
    assert torch.allclose(outputs[-2], logits, atol=1e-5)
    assert torch.allclose(outputs[-1], torch.softmax(logits, dim=1), atol=1e-6)
    # where a conv stage applies what `feature_maps` draws after it (not when a pool comes first), the same maps
    drawn = {row: tuple(f"features.{n}" for n in (row, *then)) for row, then, _ in model.display_stages()}
    conv_rows = {row.name: row.maps for row in model.feature_maps(x)}
    compared = 0
    for stage, output in zip(stages, outputs):
        assert tuple(output.shape[1:]) == stage.shape, stage.name
        if stage.kind == "conv" and drawn.get(stage.name) == stage.modules:
            assert torch.allclose(output, conv_rows[stage.name], atol=1e-5), stage.name
            compared += 1
    assert compared or all(block.pool and block.pool_first for block in config.model.conv)
    if config.model.stages:  # every residual block ends in an add of its branch and its (projected) input
        adds = [s for s in stages if s.kind == "add"]
        assert len(adds) == sum(stage.blocks for stage in config.model.stages)
        for add in adds:
            i = stages.index(add)
            assert torch.allclose(outputs[i], torch.relu(outputs[add.inputs[0]] + outputs[add.inputs[1]]), atol=1e-6)


# ------------------------------------------------------------------------------- runs to explore
def write_colour_folder(root: Path, per_class: int = 20) -> Path:
    """Three classes of noisy 14x14 pictures, each dominated by one colour; one class name holds HTML's
    special characters (the page must show them as text)."""
    rng = np.random.default_rng(0)
    for channel, name in enumerate(("red", "green", "<b>blue & co")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 90, (14, 14, 3), dtype=np.uint8)
            pixels[..., channel] += 150
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def colour_runs(tmp_path_factory):
    """A sequential colour run (conv + batch norm + max pool, 12x12x3) and a residual one, one epoch each."""
    root = tmp_path_factory.mktemp("explore")
    folder = write_colour_folder(root / "colours")
    data = {"dataset": str(folder), "image_size": 12, "workers": 0}
    train = {"epochs": 1, "batch_size": 12, "threads": 1}
    sequential = load_config("seed", overrides=["first_layer_convs=4", "dense_layer_size=8",
                                                "model.conv.0.batch_norm=true"], data=data, train=train)
    residual = load_config("resnet", overrides=["filters=4", "blocks=1", "model.stages.0.filters=4",
                                                "model.stages.1.filters=4", "model.stages.2.filters=6"],
                           data=data, train={**train, "augment_shift": 0})
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(root / "cache"))
        runs = {name: pipeline.train(config, root / "runs", name=name, progress=False).run
                for name, config in (("colour", sequential), ("residual", residual))}
    torch.set_num_threads(threads)
    return runs


def floats(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4").astype(np.float64)


def torch_outputs(run: Path, image: int = 0) -> tuple[LoadedRun, dict, list[torch.Tensor]]:
    """The page's data for a run, and every stage's output for its first shipped image, computed by torch."""
    loaded = LoadedRun(run)
    data = explore_data(loaded, 6)
    x = image_input(loaded.test_pixels(data["images"][image]["index"]))
    return loaded, data, replay(loaded.model, explore_stages(loaded.model), x)


def page_arithmetic(stage: dict, source: np.ndarray, f: int, y: int, x: int) -> tuple[np.ndarray, float]:
    """What the detail view writes for conv pixel (f, y, x), from the page's own numbers: (products per
    channel (C, kh, kw), sum + bias); `source` is the layer's input (C, H, W)."""
    filters, channels, kh, kw = stage["weight_shape"]
    weight = floats(stage["weight"]).reshape(filters, channels, kh, kw)
    top, left = y * stage["stride"] - stage["padding"][0], x * stage["stride"] - stage["padding"][1]
    padded = np.pad(source, ((0, 0), (kh, kh), (kw, kw)))  # zeros where the window leaves the input
    patch = padded[:, top + kh:top + 2 * kh, left + kw:left + 2 * kw]
    products = patch * weight[f]
    bias = floats(stage["bias"])[f] if stage["bias"] else 0.0
    return products, float(products.sum() + bias)


def after_conv(stage: dict, c: int, z: float) -> float:
    """Batch norm then activation, as the page writes them out."""
    if "norm" in stage:
        n = stage["norm"]
        z = (z - floats(n["mean"])[c]) / np.sqrt(floats(n["var"])[c] + n["eps"]) * floats(n["gamma"])[c] \
            + floats(n["beta"])[c]
    return max(z, 0.0) if stage["activation"] == "relu" else z


@pytest.mark.parametrize("which", ["grey", "colour", "residual"])
def test_the_numbers_in_the_page_give_torchs_activation_at_every_conv_pixel_probed(which, colour_runs):
    run = tiny_run("mnist-sample") if which == "grey" else colour_runs[which]
    loaded, data, outputs = torch_outputs(run)
    image = data["images"][0]
    c, h, w = data["stages"][0]["shape"]
    shipped = np.frombuffer(base64.b64decode(image["pixels"]), dtype=np.uint8).reshape(c, h, w)
    assert np.array_equal(shipped, loaded.test_set[0][image["index"]].numpy())
    with torch.no_grad():
        assert np.allclose(image["logits"], loaded.model(image_input(loaded.test_pixels(image["index"])))[0], atol=1e-5)
    convs = [(i, s) for i, s in enumerate(data["stages"]) if s["kind"] == "conv"]
    assert convs
    rng = np.random.default_rng(0)
    for i, stage in convs:
        source = outputs[stage["inputs"][0]][0].numpy().astype(np.float64)
        conv = loaded.model.get_submodule(explore_stages(loaded.model)[i].modules[0])
        with torch.no_grad():
            z_torch = conv(outputs[stage["inputs"][0]])[0]  # the conv's own output, before batch norm
        last = [n - 1 for n in stage["shape"]]
        for f, y, x in [(0, 0, 0), last, [int(rng.integers(n)) for n in stage["shape"]]]:
            products, z = page_arithmetic(stage, source, f, y, x)
            assert products.shape == tuple(stage["weight_shape"][1:])
            assert z == pytest.approx(float(z_torch[f, y, x]), abs=1e-4)
            assert after_conv(stage, f, z) == pytest.approx(float(outputs[i][0, f, y, x]), abs=1e-4)


def test_the_shipped_images_take_the_classes_in_turn():
    loaded = LoadedRun(tiny_run("mnist-sample"))
    images = explore_data(loaded, 12)["images"]
    assert [im["label"] for im in images] == [*range(10), 0, 1]
    assert len({im["index"] for im in images}) == 12


# -------------------------------------------------------------------------------------- the command
def test_explore_writes_one_self_contained_page(tmp_path):
    out = tmp_path / "page.html"
    result = runner.invoke(app, ["explore", str(tiny_run("mnist-sample")), "--output", str(out), "--images", "5"])
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert "wrote" in result.output and "no network" in result.output
    assert not re.search(r"https?://|<link|src=\"(?!data:)", page)  # nothing is fetched from anywhere
    blob = re.search(r'<script type="application/json" id="model-data">(.*?)</script>', page, re.S)
    assert blob is not None
    data = json.loads(blob.group(1))
    assert len(data["images"]) == 5 and data["classes"][0] == "0"
    assert [s["kind"] for s in data["stages"]] == ["input", "conv", "pool", "flatten", "dense", "dense", "softmax"]


def test_explore_writes_into_the_run_unless_told_where(tmp_path, monkeypatch):
    run = shutil.copytree(tiny_run("mnist-sample"), tmp_path / "runs" / "mnist")
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["explore", "runs/mnist", "--images", "2"])
    assert result.exit_code == 0, result.output
    assert "wrote runs/mnist/explore.html" in result.output  # where report.html and run.explore() go too
    assert (run / "explore.html").is_file() and not (tmp_path / "explore.html").exists()
    result = runner.invoke(app, ["explore", "runs/nothing"])
    assert result.exit_code == 2 and "runs/nothing" in result.output and len(result.output.splitlines()) == 1


@pytest.mark.unit
def test_a_class_name_cannot_close_the_script_it_sits_in():
    page = explore_page.render({"classes": ["</script><script>alert(1)</script>"], "stages": [], "images": []})
    assert page.count("</script>") == 3  # the recipes', the data's and the code's own


@pytest.mark.parametrize("case", ["missing", "not a run", "no images", "too many", "too big", "not html", "a fifo",
                                  "pickled weights"])
def test_bad_input_is_one_line_and_writes_nothing(case, tmp_path, monkeypatch):
    run, out, images = str(tiny_run("mnist-sample")), tmp_path / "page.html", "4"
    expected = {"missing": "no such run directory", "not a run": "not a complete run: config.yaml is missing",
                "no images": "--images must be 1..64", "too many": "--images must be 1..64",
                "too big": "MiB in the page, more than the", "not html": "expected a file name ending in .html",
                "a fifo": "cnnlab only replaces regular files", "pickled weights": "a pickle or torch.save file"}[case]
    if case == "missing":
        run = str(tmp_path / "nowhere")
    elif case == "not a run":
        (tmp_path / "folder").mkdir()
        run = str(tmp_path / "folder")
    elif case == "no images":
        images = "0"
    elif case == "too many":
        images = "65"
    elif case == "too big":
        monkeypatch.setattr(explore_page, "MAX_WEIGHT_BYTES", 1000)
    elif case == "not html":
        out = tmp_path / "page.png"
    elif case == "a fifo":
        os.mkfifo(out)
    else:  # a pickle where the safetensors belong: refused, never unpickled
        shutil.copytree(run, tmp_path / "run")
        (tmp_path / "run" / "model.safetensors").write_bytes(pickle.dumps({"weights": [1.0]}))
        run = str(tmp_path / "run")
    result = runner.invoke(app, ["explore", run, "-o", str(out), "--images", images])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.output
    assert (out.is_fifo() if case == "a fifo" else not out.exists()) and list(tmp_path.glob(".*tmp*")) == []


# -------------------------------------------------------------------------------------- the browser
@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs: pip install playwright")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


def open_page(browser, run: Path, tmp_path: Path):
    out = tmp_path / f"{run.name}.html"
    result = runner.invoke(app, ["explore", str(run), "-o", str(out), "--images", "6"])
    assert result.exit_code == 0, result.output
    tab = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    tab.on("pageerror", lambda error: errors.append(str(error)))
    tab.route(re.compile(r"^(?!file:).*"), lambda route: (errors.append(route.request.url), route.abort()))
    tab.goto(out.as_uri())
    tab.wait_for_function("document.body.dataset.ready === 'yes'")
    return tab, errors


def click_pixel(tab, stage: int, c: int, y: int, x: int) -> None:
    """A real mouse click in the middle of pixel (y, x) of map c of a stage."""
    canvas = tab.locator(f"#map-{stage}-{c}")
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    _, h, w = tab.evaluate(f"STAGES[{stage}].shape")
    canvas.click(position={"x": (x + 0.5) * box["width"] / w, "y": (y + 0.5) * box["height"] / h})


def shown(tab, element: str) -> float:
    return float(tab.locator(f"#detail-{element}").inner_text())


def explore_in_browser(browser, run: Path, tmp_path: Path, pixel: tuple[int, int, int]) -> None:
    """Click a conv pixel, a pooled pixel (if any), a classifier bar and a softmax bar; each shows torch's number."""
    tab, errors = open_page(browser, run, tmp_path)
    loaded, data, outputs = torch_outputs(run)
    kinds = [s["kind"] for s in data["stages"]]
    assert float(tab.locator("#check").get_attribute("data-gap")) < 1e-4  # the page's own forward pass, image 0
    conv = kinds.index("conv")
    stages = explore_stages(loaded.model)
    with torch.no_grad():
        z_torch = loaded.model.get_submodule(stages[conv].modules[0])(outputs[stages[conv].inputs[0]])[0]
    f, y, x = pixel
    click_pixel(tab, conv, f, y, x)
    assert shown(tab, "z") == pytest.approx(float(z_torch[f, y, x]), abs=1e-4)  # Σ products + bias
    assert shown(tab, "value") == pytest.approx(float(outputs[conv][0, f, y, x]), abs=1e-4)  # after BN and act
    channels = data["stages"][stages[conv].inputs[0]]["shape"][0]
    assert tab.locator("#detail-body .channel-sum").count() == channels  # one row per input channel
    tab.keyboard.press("ArrowRight")  # the kernel moves one pixel on
    assert shown(tab, "value") == pytest.approx(float(outputs[conv][0, f, y, x + 1]), abs=1e-4)
    if "pool" in kinds:
        pool = kinds.index("pool")
        click_pixel(tab, pool, 1, 2, 3)
        assert shown(tab, "value") == pytest.approx(float(outputs[pool][0, 1, 2, 3]), abs=1e-4)
    classifier = len(kinds) - 2
    probabilities = outputs[-1][0]
    top = int(probabilities.argmax())
    tab.locator(f"#class-{classifier}-{top}").click()
    assert shown(tab, "z") == pytest.approx(float(outputs[classifier][0, top]), abs=1e-4)
    tab.locator(f"#class-{classifier + 1}-{top}").click()
    assert shown(tab, "value") == pytest.approx(float(probabilities[top]), abs=1e-4)
    assert all(name in tab.locator("#detail-body").inner_text() for name in loaded.classes)  # as text, never markup
    tab.screenshot(path=str(tmp_path / f"{run.name}.png"))
    assert errors == []
    tab.close()


@pytest.mark.slow
@in_browser
@pytest.mark.parametrize("which", ["grey", "colour"])
def test_a_clicked_pixel_shows_torchs_value_in_the_browser(which, browser, colour_runs, tmp_path):
    run = tiny_run("mnist-sample") if which == "grey" else colour_runs["colour"]
    explore_in_browser(browser, run, tmp_path, (2, 10, 12) if which == "grey" else (3, 5, 4))


@pytest.mark.slow
@in_browser
def test_a_residual_model_shows_every_map_and_its_adds(browser, colour_runs, tmp_path):
    run = colour_runs["residual"]
    tab, errors = open_page(browser, run, tmp_path)
    loaded, data, outputs = torch_outputs(run)
    maps = sum(s["shape"][0] for s in data["stages"] if len(s["shape"]) == 3)
    assert tab.locator("canvas[id^='map-']").count() == maps
    adds = [i for i, s in enumerate(data["stages"]) if s["kind"] == "add"]
    assert len(adds) == 3
    for i in adds:
        click_pixel(tab, i, 0, 1, 1)
        body, skip = data["stages"][i]["inputs"]
        assert shown(tab, "z") == pytest.approx(float(outputs[body][0, 0, 1, 1] + outputs[skip][0, 0, 1, 1]), abs=1e-4)
        assert shown(tab, "value") == pytest.approx(float(outputs[i][0, 0, 1, 1]), abs=1e-4)
    assert errors == []


@pytest.mark.slow
@in_browser
def test_a_drawing_is_run_through_the_network_in_the_page(browser, tmp_path):
    run = tiny_run("mnist-sample")
    tab, errors = open_page(browser, run, tmp_path)
    box = tab.locator("#draw").bounding_box()
    tab.mouse.move(box["x"] + 0.5 * box["width"], box["y"] + 0.15 * box["height"])
    tab.mouse.down()
    tab.mouse.move(box["x"] + 0.5 * box["width"], box["y"] + 0.85 * box["height"], steps=10)
    tab.mouse.up()
    tab.wait_for_function("document.querySelector('#prediction').textContent.includes('your drawing')")
    drawn = np.array(tab.evaluate("Array.from(drawnInput())")).reshape(28, 28)
    # black ink on white paper, prepared as MNIST's digits are: a light stroke on black, 20 px tall, centred (by
    # its mass: where the rounding puts it differs by a pixel between Chromium builds, whose strokes differ)
    rows, columns = np.flatnonzero(drawn.max(axis=1) > 0.5), np.flatnonzero(drawn.max(axis=0) > 0.5)
    assert 19 <= len(rows) <= 21 and rows[-1] - rows[0] == len(rows) - 1  # one unbroken stroke, 20 px tall
    assert abs(rows.mean() - 13.5) <= 1 and abs(columns.mean() - 13.5) <= 1 and len(columns) <= 6
    assert drawn[:3].max() == 0 and drawn[-3:].max() == 0 and drawn[:, :5].max() == 0 and drawn[:, -5:].max() == 0
    logits = tab.evaluate(f"Array.from(outs[{len(explore_stages(LoadedRun(run).model)) - 2}])")
    with torch.no_grad():
        expected = LoadedRun(run).model(torch.from_numpy(drawn).float()[None, None])[0]
    assert np.allclose(logits, expected.numpy(), atol=1e-4)
    assert "your drawing" in tab.locator("#prediction").inner_text()
    assert errors == []
