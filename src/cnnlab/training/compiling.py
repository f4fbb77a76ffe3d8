"""`train.compile`: the training step's forward and backward pass through `torch.compile` (inductor).

Off by default, and in no preset: on the project's 2-core CPU the compiled step measured 9-24% slower than
eager for `seed`, `fast` and `best`, on top of 10-17 s of compiling (BENCHMARKS.md, "Compiling the training
step"). It is there for whoever measures that it pays on their machine (a GPU, a larger model).

What stays the same with it on:
- the arithmetic's randomness: dropout and the other random ops draw from torch's own generator, as in eager
  (inductor's `fallback_random`), so a compiled run resumes bitwise and matches an eager run to float tolerance;
- the optimizer: fused Adam/AdamW/SGD is already one kernel per step, so it is not compiled, and a learning-rate
  schedule never triggers a recompile;
- validation, testing and everything saved: they use the eager module, whose parameters the compiled one shares.

The compiled kernels are cached in the user cache ($XDG_CACHE_HOME/cnnlab/inductor), so only the first run of
a model on a machine pays the whole compile. When compiling the forward pass fails (no C++ compiler, an
unsupported operation), training goes on eagerly after one line saying why; a failure to compile the backward
pass (inductor compiles it at the first backward) stops the run with its error, and so does running out of memory.

Both settings are the process's: inductor's `fallback_random` stays on for anything compiled later in it, and
TORCHINDUCTOR_CACHE_DIR is set in its environment (so child processes share the cache).
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator

import torch
from torch import nn

from cnnlab.data.store import cache_root
from cnnlab.errors import interrupted

CACHE_VARIABLE = "TORCHINDUCTOR_CACHE_DIR"  # inductor's own setting; a user's value is kept


def compiled(net: nn.Module) -> nn.Module:
    """`net` compiled lazily (on its first call), its kernels cached in the user cache."""
    os.environ.setdefault(CACHE_VARIABLE, str(cache_root() / "inductor"))  # read when inductor is imported
    import torch._inductor.config as inductor

    inductor.fallback_random = True  # random ops draw from torch's generator: resume and eager comparisons hold
    return torch.compile(net)  # type: ignore[return-value]


def failure_line(error: BaseException) -> str:
    """One line on why compiling failed: the error's type and the first line of its message."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"train.compile: compiling failed ({type(error).__name__}: {first[:200]}); training eagerly"


class TrainingForward:
    """The training step's forward pass: `eager` itself, or (`compile`) compiled, with the compiling steps'
    time kept apart from training time and an eager fallback when the compiler fails.

    Validation, testing and saving use the eager module, whose parameters the compiled one shares.
    """

    def __init__(self, eager: nn.Module, compile: bool, who: str = ""):
        self.eager = eager
        self.net = compiled(eager) if compile else eager  # what a step calls; eager again after a failed compile
        self.who = who  # "rank N: " in a data-parallel job, for the failure line
        self.shapes: set[tuple[int, ...]] = set()  # the input shapes the compiled forward has met
        self.compiling = False  # whether the current step compiles (the first of its input shape)
        self.epoch_seconds = 0.0  # this epoch's steps that compiled
        self.total_seconds = 0.0  # every compiling step's seconds in this process

    @contextlib.contextmanager
    def step(self, shape: tuple[int, ...]) -> Iterator[None]:
        """Around a whole training step (forward and backward: inductor compiles both on a new shape):
        a step that compiled adds its seconds to the compile time. A step that raises adds nothing."""
        self.compiling = self.net is not self.eager and shape not in self.shapes
        started = time.perf_counter()
        yield
        if self.compiling:
            self.shapes.add(shape)
            self.epoch_seconds += time.perf_counter() - started
            self.total_seconds += time.perf_counter() - started

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits of the network; a step that compiles and fails goes on eagerly, for the rest of the run."""
        if not self.compiling:
            return self.net(inputs)
        try:
            return self.net(inputs)
        except torch.OutOfMemoryError:
            raise  # the step's size, not the compiler: eager would not fit either
        except Exception as error:  # noqa: BLE001  (whatever the compiler raised: eager may still work)
            if interrupted(error):  # a Ctrl-C met while compiling, reported as the compiler's own error
                raise KeyboardInterrupt from None
            print(self.who + failure_line(error), file=sys.stderr)
            self.net = self.eager
            return self.net(inputs)
