"""Dynamic batching in `cnnlab serve`: concurrent requests share forward passes and get the answers they would get
one at a time; a full queue answers 503 with Retry-After; a request that waits too long gets 504.

The forward pass is held by an Event (`GatedForward`) wherever a test needs the queue in a known state: tests wait
for a state (a pass entered, N requests queued), never for time, and never assert on how a race fell.
"""
from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

for _module in ("fastapi", "uvicorn", "multipart", "httpx"):
    pytest.importorskip(_module, reason="the web demo's tests need: pip install -e '.[test]'")

import httpx  # noqa: E402

from cnnlab.cli import app  # noqa: E402
from cnnlab.data import load_dataset  # noqa: E402
from cnnlab.use.predict import Predictor, predict_image  # noqa: E402
from cnnlab.use.serve import create_app  # noqa: E402
from cnnlab.use.serve.batching import Batcher, BatchSettings, QueueFull  # noqa: E402
from use_runs import running_server, tiny_run  # noqa: E402

STATE_SECONDS = 30  # the longest a test waits for the server to reach a state (only a failing test waits that long)


def digit_png(index: int) -> bytes:
    """MNIST test digit `index`, dark on white and enlarged, as a learner would upload it."""
    image = load_dataset("mnist-sample", progress=False).test_images[index]
    buffer = io.BytesIO()
    Image.fromarray(255 - image).resize((140, 140), Image.Resampling.BICUBIC).save(buffer, format="PNG")
    return buffer.getvalue()


def post(url: str, data: bytes, **params: str) -> httpx.Response:
    return httpx.post(f"{url}/api/predict", files={"file": ("digit.png", data, "image/png")}, params=params,
                      timeout=STATE_SECONDS)


def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Wait for a state of the server (not for a time); fail after STATE_SECONDS."""
    give_up = time.monotonic() + STATE_SECONDS
    while not condition():
        assert time.monotonic() < give_up, f"the server never reached: {what}"
        time.sleep(0.005)


class GatedForward:
    """Stands in for a predictor's forward pass: records every batch's size, and holds passes until `gate` is set."""

    def __init__(self, predictor: Predictor, gated: bool = True):
        self.real = predictor.probabilities
        self.sizes: list[int] = []
        self.entered = threading.Event()  # set once a pass has started
        self.gate = threading.Event()
        if not gated:
            self.gate.set()
        predictor.probabilities = self  # type: ignore[method-assign]  # the batcher looks it up per pass

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.sizes.append(len(images))
        self.entered.set()
        self.gate.wait(timeout=STATE_SECONDS)  # a test that forgets to open the gate is slow, not stuck
        return self.real(images)


def served(settings: BatchSettings, *datasets: str) -> tuple[list[Predictor], list[GatedForward], object]:
    """Fresh predictors (so no other test sees the gate), their gates, and the app serving them."""
    predictors = [Predictor.from_run(tiny_run(d)) for d in datasets or ("mnist-sample",)]
    gates = [GatedForward(p) for p in predictors]
    return predictors, gates, create_app(predictors, batching=settings)


def same_answer(got: dict, want: dict) -> bool:
    """Identical for a user: the same class, and every probability within 1e-6 (the dense layers' sums round
    differently by batch size, by ~3e-8; see `cnnlab.use.serve.batching`)."""
    return (got["label"] == want["label"] and got["class_name"] == want["class_name"]
            and got["probabilities"].keys() == want["probabilities"].keys()
            and all(abs(got["probabilities"][k] - p) <= 1e-6 for k, p in want["probabilities"].items()))


@pytest.fixture(scope="module")
def expected_by_model() -> dict[str, Callable[[bytes], dict]]:
    """What each model says in this process, one picture at a time: the served answers must be these."""
    models = {name: Predictor.from_run(tiny_run(f"{name}-sample")) for name in ("mnist", "fashion-mnist")}
    return {name: lambda data, _p=model: predict_image(_p, data, "digit.png").to_dict()
            for name, model in models.items()}


# ------------------------------------------------------------------------------ the answers
def test_concurrent_requests_get_the_one_at_a_time_answers(expected_by_model):
    settings = BatchSettings(max_batch=8, max_wait_ms=5)
    _, gates, application = served(settings, "mnist-sample", "fashion-mnist-sample")
    for gate in gates:
        gate.gate.set()
    jobs = [(i, "mnist" if i % 3 else "fashion-mnist") for i in range(96)]  # two models' queues at once
    pictures = {i: digit_png(i) for i, _ in jobs}
    with running_server(application) as url, ThreadPoolExecutor(24) as pool:
        replies = list(pool.map(lambda job: post(url, pictures[job[0]], model=job[1]), jobs))
    wrong = [f"{i} ({model}): {reply.status_code} {reply.text[:200]}" for (i, model), reply in zip(jobs, replies)
             if reply.status_code != 200 or not same_answer(reply.json(), expected_by_model[model](pictures[i]))]
    assert not wrong, "\n".join(wrong)
    for gate, model in zip(gates, ("mnist", "fashion-mnist")):  # every picture computed once, in passes of <= 8
        assert sum(gate.sizes) == sum(1 for _, m in jobs if m == model) and max(gate.sizes) <= 8


def test_details_still_come_with_a_batched_answer(expected_by_model):
    _, [gate], application = served(BatchSettings())
    gate.gate.set()
    with running_server(application) as url:
        body = post(url, digit_png(5), details="true").json()
    assert same_answer(body, expected_by_model["mnist"](digit_png(5)))
    assert body["model"] == "mnist" and body["feature_maps"][0]["layer"] == "conv1"


# ------------------------------------------------------------------------------ batching happens
@pytest.mark.parametrize("max_batch, passes", [(16, [1, 8]), (3, [1, 3, 3, 2]), (1, [1] * 9)])
def test_requests_queued_during_a_pass_share_the_next_passes(expected_by_model, max_batch, passes):
    """1 request holds the worker in its pass; 8 more queue meanwhile, and are answered by ceil(8 / max_batch)
    passes (max_batch 1: a pass each, the one-at-a-time server)."""
    _, [gate], application = served(BatchSettings(max_batch=max_batch, max_wait_ms=0))
    batcher = application.state.batchers["mnist"]
    with running_server(application) as url, ThreadPoolExecutor(9) as pool:
        first = pool.submit(post, url, digit_png(0))
        assert gate.entered.wait(STATE_SECONDS)
        queued = [pool.submit(post, url, digit_png(i)) for i in range(1, 9)]
        wait_until(lambda: batcher.queued == 8, "8 requests queued")
        gate.gate.set()
        replies = [first.result(), *(q.result() for q in queued)]
    assert [r.status_code for r in replies] == [200] * 9
    assert all(same_answer(r.json(), expected_by_model["mnist"](digit_png(i))) for i, r in enumerate(replies))
    assert gate.sizes == passes


# ------------------------------------------------------------------------------ a full queue, a slow pass
def test_a_full_queue_answers_503_with_retry_after_and_only_then():
    _, [gate], application = served(BatchSettings(max_batch=4, queue_size=2))
    batcher = application.state.batchers["mnist"]
    with running_server(application) as url, ThreadPoolExecutor(3) as pool:
        running = pool.submit(post, url, digit_png(0))
        assert gate.entered.wait(STATE_SECONDS)
        waiting = [pool.submit(post, url, digit_png(i)) for i in (1, 2)]  # fill the queue: both are accepted
        wait_until(lambda: batcher.queued == 2, "the queue full")
        refused = post(url, digit_png(3))
        gate.gate.set()
        accepted = [running.result(), *(w.result() for w in waiting)]
        after = post(url, digit_png(3))  # room again: the same request is served
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
    assert refused.json() == {"error": "the server is busy: 2 requests are already waiting for model 'mnist'; "
                                       "retry in 1 s"}
    assert [r.status_code for r in accepted] == [200, 200, 200] and after.status_code == 200
    assert "Retry-After" not in after.headers
    assert gate.sizes == [1, 2, 1]  # the refused request never reached a pass


def test_a_request_that_waits_past_the_timeout_gets_504_and_is_dropped():
    _, [gate], application = served(BatchSettings(max_batch=4, timeout_s=0.2))
    batcher = application.state.batchers["mnist"]
    with running_server(application) as url, ThreadPoolExecutor(2) as pool:
        stuck = pool.submit(post, url, digit_png(0))  # its pass never ends while the gate is shut
        assert gate.entered.wait(STATE_SECONDS)
        behind = pool.submit(post, url, digit_png(1))  # waits in the queue behind it
        timed_out = [stuck.result(), behind.result()]
        assert batcher.queued == 0  # the one behind gave up and left the queue: it holds no slot
        gate.gate.set()
        later = post(url, digit_png(2))
    for reply in timed_out:
        assert reply.status_code == 504 and "Retry-After" not in reply.headers
        assert reply.json() == {"error": "model 'mnist' did not answer within 0.2 s: the server is overloaded; "
                                         "try again later"}
    assert later.status_code == 200
    assert gate.sizes == [1, 1]  # the stuck pass, then the later request's: the abandoned one was never computed


def test_a_lone_request_does_not_wait_for_company():
    """With nothing else on its way, the worker runs at once: a wait of max_wait_ms (here far past the timeout)
    would answer 504."""
    _, [gate], application = served(BatchSettings(max_wait_ms=120_000, timeout_s=STATE_SECONDS / 2))
    gate.gate.set()
    with running_server(application) as url:
        replies = [post(url, digit_png(i)) for i in range(3)]
    assert [r.status_code for r in replies] == [200, 200, 200] and gate.sizes == [1, 1, 1]


# ------------------------------------------------------------------------------ the batcher on its own
@pytest.mark.unit
def test_the_worker_waits_for_announced_images_only():
    sizes: list[int] = []
    batcher = Batcher(lambda images: sizes.append(len(images)) or np.ones((len(images), 2)),
                      BatchSettings(max_batch=8, max_wait_ms=120_000), "m")
    image = np.zeros((2, 2), np.uint8)
    try:
        batcher.announce()
        batcher.announce()
        first = batcher.submit(image)  # two more on their way: the worker waits for them
        second = batcher.submit(image, announced=True)
        batcher.retract()  # the other one's upload was refused: nothing more to wait for
        assert first.result(timeout=STATE_SECONDS).shape == second.result(timeout=STATE_SECONDS).shape == (2,)
        assert sizes == [2] and batcher.announced == 0
    finally:
        batcher.close()


@pytest.mark.unit
def test_a_failing_pass_fails_its_requests_and_the_worker_goes_on():
    calls: list[int] = []

    def forward(images: np.ndarray) -> np.ndarray:
        calls.append(len(images))
        if len(calls) == 1:
            raise RuntimeError("out of memory")
        return np.ones((len(images), 10))

    batcher = Batcher(forward, BatchSettings(max_wait_ms=0), "m")
    try:
        with pytest.raises(RuntimeError, match="out of memory"):
            batcher.submit(np.zeros((28, 28), np.uint8)).result(timeout=STATE_SECONDS)
        assert batcher.submit(np.zeros((28, 28), np.uint8)).result(timeout=STATE_SECONDS).shape == (10,)
    finally:
        batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(np.zeros((28, 28), np.uint8))


@pytest.mark.unit
def test_the_queue_bound_holds_without_a_server():
    release = threading.Event()
    batcher = Batcher(lambda images: release.wait(STATE_SECONDS) and np.ones((len(images), 2)),
                      BatchSettings(max_batch=1, queue_size=3), "m")
    try:
        answers = [batcher.submit(np.zeros((2, 2), np.uint8))]
        wait_until(lambda: batcher.queued == 0, "the first image in its pass")
        answers += [batcher.submit(np.zeros((2, 2), np.uint8)) for _ in range(3)]
        with pytest.raises(QueueFull, match="3 requests are already waiting for model 'm'"):
            batcher.submit(np.zeros((2, 2), np.uint8))
        release.set()
        assert all(a.result(timeout=STATE_SECONDS).shape == (2,) for a in answers)
    finally:
        release.set()
        batcher.close()


@pytest.mark.unit
@pytest.mark.parametrize("settings", [dict(max_batch=0), dict(queue_size=0), dict(max_wait_ms=-1), dict(timeout_s=0)])
def test_impossible_settings_are_refused(settings):
    with pytest.raises(ValueError, match="must be"):
        BatchSettings(**settings)


# ------------------------------------------------------------------------------ the command line
def serve_config(monkeypatch, *options: str):
    """The uvicorn configuration `cnnlab serve ... options` would run (recorded instead of served)."""
    import uvicorn

    import cnnlab.cli.use  # noqa: F401
    from cnnlab.use.serve import server

    calls = []

    class Server:
        def __init__(self, config):
            calls.append(config)

        def run(self, sockets=None):
            pass

    class Socket:  # not bound: port 8000 may be taken where the suite runs
        def __init__(self, host, port):
            pass

        def close(self):
            pass

    monkeypatch.setattr(uvicorn, "Server", Server)
    monkeypatch.setattr(server, "listening_socket", Socket)
    result = CliRunner().invoke(app, ["serve", str(tiny_run("mnist-sample")), *options])
    return result, calls


def test_the_batching_options_reach_the_server(monkeypatch):
    result, [config] = serve_config(monkeypatch, "--max-batch", "1", "--max-wait-ms", "0.5", "--queue-size", "9",
                                    "--timeout", "3")
    assert result.exit_code == 0, result.output
    batcher = config.app.state.batchers["mnist"]
    assert batcher.settings == BatchSettings(max_batch=1, max_wait_ms=0.5, queue_size=9, timeout_s=3.0)
    result, [config] = serve_config(monkeypatch)
    assert config.app.state.batchers["mnist"].settings == BatchSettings()  # the CLI's defaults are the library's


@pytest.mark.parametrize("option, value", [("--max-batch", "0"), ("--queue-size", "-3"), ("--timeout", "0"),
                                           ("--max-wait-ms", "soon")])
def test_bad_batching_options_get_a_clear_error(monkeypatch, option, value):
    result, calls = serve_config(monkeypatch, option, value)
    assert result.exit_code == 2 and calls == []
    assert f"Invalid value for '{option}'" in result.output and "Traceback" not in result.output
