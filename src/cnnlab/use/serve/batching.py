"""Dynamic batching for `cnnlab serve`: concurrent requests for one model share one forward pass.

A request's prepared image joins its model's queue; one worker thread per model takes what is waiting (up to
`max_batch` images) and runs a single forward pass for them all. While other requests for the model are still being
decoded (`announce`), the worker waits for them, at most `max_wait_ms` after the oldest waiting image arrived; with
none on the way it runs at once, so a lone client pays no wait. The queue holds at most `queue_size` images: one
more is refused at once (`QueueFull`, HTTP 503), so memory stays bounded however many clients push; a request that
gives up (timeout) leaves the queue. `max_batch=1` is the one-pass-per-request server of before.

Results match one-at-a-time prediction to float rounding, not bit for bit: oneDNN's convolutions (in models
with several of them) and MKL's matrix products pick kernels, and so summation orders, by batch size, which moves
a probability by a few float32 steps (at most 3e-7 measured on the presets and the test runs; the step near 1 is
6e-8). Running each image on its own is the only way to get the same bits, and that is `max_batch=1`. The served
answer is the same class with the same probabilities to 1e-6, as `cnnlab predict`, which batches 256 files at a
time, always gave.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

Forward = Callable[[np.ndarray], np.ndarray]  # prepared uint8 images (N, H, W[, C]) -> probabilities (N, classes)


@dataclass(frozen=True)
class BatchSettings:
    """How `cnnlab serve` gathers requests into forward passes (the CLI's --max-batch, --max-wait-ms, ...)."""

    max_batch: int = 32  # images per forward pass; 1 = a pass per request (no batching)
    max_wait_ms: float = 2.0  # how long the oldest waiting image may wait for others to join its pass
    queue_size: int = 256  # images waiting for a pass, per model; one more gets 503 (Retry-After)
    timeout_s: float = 10.0  # seconds a request may wait for its pass, queue included; then 504

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.queue_size < 1:
            raise ValueError(f"max_batch and queue_size must be at least 1, not {self.max_batch} and {self.queue_size}")
        if self.max_wait_ms < 0 or self.timeout_s <= 0:
            raise ValueError(f"max_wait_ms must be >= 0 and timeout_s > 0, not {self.max_wait_ms} and {self.timeout_s}")


class QueueFull(Exception):
    """The model's queue already holds `queue_size` images: the request is refused, not queued."""


@dataclass
class Waiting:
    """One request in the queue: its prepared image, when it arrived, and where its answer goes."""

    image: np.ndarray  # uint8 (H, W) or (H, W, C)
    arrived: float  # time.monotonic()
    answer: Future[np.ndarray]  # (classes,) probabilities


class Batcher:
    """One model's queue and the worker thread that empties it a batch at a time (started on first use)."""

    def __init__(self, forward: Forward, settings: BatchSettings, name: str = "model"):
        self.forward, self.settings, self.name = forward, settings, name
        self.queue: deque[Waiting] = deque()
        self.changed = threading.Condition()  # guards queue, closed and worker
        self.closed = False
        self.worker: threading.Thread | None = None
        self.passes = 0  # forward passes run so far (the benchmark reports images per pass)
        self.announced = 0  # requests being prepared that will submit an image: worth waiting for

    @property
    def queued(self) -> int:
        """Images waiting for a pass (not counting the pass running now)."""
        return len(self.queue)

    def has_room(self) -> bool:
        return len(self.queue) < self.settings.queue_size

    def announce(self) -> None:
        """One more request is preparing an image for this model: the worker may wait for it (up to max_wait_ms).

        Every announcement ends with `submit(image, announced=True)` or `retract()`.
        """
        with self.changed:
            self.announced += 1

    def retract(self) -> None:
        """An announced request will not submit (its upload was refused): the worker stops waiting for it."""
        with self.changed:
            self.announced -= 1
            self.changed.notify()

    def submit(self, image: np.ndarray, announced: bool = False) -> Future[np.ndarray]:
        """Queue one prepared image; its probabilities arrive in the returned future. QueueFull when full."""
        answer: Future[np.ndarray] = Future()
        with self.changed:
            self.announced -= announced  # queued or refused, it is no longer on its way
            if self.closed:
                raise RuntimeError(f"{self.name}: the batcher is closed")
            if not self.has_room():
                raise QueueFull(f"{self.settings.queue_size} requests are already waiting for model {self.name!r}")
            self.queue.append(Waiting(image, time.monotonic(), answer))
            if self.worker is None:
                self.worker = threading.Thread(target=self.run, name=f"cnnlab-batch-{self.name}", daemon=True)
                self.worker.start()
            self.changed.notify()
        return answer

    def withdraw(self, answer: Future[np.ndarray]) -> None:
        """A request gave up (timeout): drop it from the queue, so it neither holds a slot nor gets computed."""
        answer.cancel()
        with self.changed:
            for waiting in self.queue:
                if waiting.answer is answer:
                    self.queue.remove(waiting)
                    break

    def close(self) -> None:
        """Stop the worker once the queue is empty; later submits raise."""
        with self.changed:
            self.closed = True
            self.changed.notify_all()
        if self.worker is not None and self.worker is not threading.current_thread():
            self.worker.join(timeout=10)

    # ------------------------------------------------------------------------------- the worker
    def run(self) -> None:
        while (batch := self.next_batch()) is not None:
            self.run_pass(batch)

    def next_batch(self) -> list[Waiting] | None:
        """Wait for work; then, while more images are announced, for up to max_batch of them or until the oldest
        has waited max_wait_ms."""
        with self.changed:
            while not self.queue and not self.closed:
                self.changed.wait()
            if not self.queue:
                return None  # closed and drained
            # the wait counts from the oldest image's arrival: one that queued during the last pass goes at once
            deadline = self.queue[0].arrived + self.settings.max_wait_ms / 1000
            while len(self.queue) < self.settings.max_batch and self.announced > 0 and not self.closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.changed.wait(left)
            taken = [self.queue.popleft() for _ in range(min(self.settings.max_batch, len(self.queue)))]
        # requests that timed out meanwhile were cancelled: they are dropped, not computed
        return [w for w in taken if w.answer.set_running_or_notify_cancel()]

    def run_pass(self, batch: list[Waiting]) -> None:
        """One forward pass for the whole batch; each request gets its own row (or the pass's error)."""
        if not batch:
            return
        try:
            probabilities = self.forward(np.stack([w.image for w in batch]))  # (N, classes)
        except Exception as exc:  # noqa: BLE001  every request in the pass hears of it; the worker lives on
            for waiting in batch:
                waiting.answer.set_exception(exc)
            return
        finally:
            self.passes += 1
        for waiting, row in zip(batch, probabilities):
            waiting.answer.set_result(row)
