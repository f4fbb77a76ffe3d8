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

import os

from torch import nn

from cnnlab.data.store import cache_root

CACHE_VARIABLE = "TORCHINDUCTOR_CACHE_DIR"  # inductor's own setting; a user's value is kept


def compiled(net: nn.Module) -> nn.Module:
    """`net` compiled lazily (on its first call), its kernels cached in the user cache."""
    os.environ.setdefault(CACHE_VARIABLE, str(cache_root() / "inductor"))  # read when inductor is imported
    import torch
    import torch._inductor.config as inductor

    inductor.fallback_random = True  # random ops draw from torch's generator: resume and eager comparisons hold
    return torch.compile(net)  # type: ignore[return-value]


def failure_line(error: BaseException) -> str:
    """One line on why compiling failed: the error's type and the first line of its message."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"train.compile: compiling failed ({type(error).__name__}: {first[:200]}); training eagerly"
