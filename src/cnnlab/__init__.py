"""cnnlab: learn, build, train, inspect and use CNNs for image classification.

    import cnnlab
    run = cnnlab.train(model="seed", dataset="mnist-sample", epochs=4, dropout=0.4)
    run.evaluate(); run.summary(); run.show.mistakes()    # tables and pictures, inline in a notebook
    run = cnnlab.open_run("runs/mnist-sample-seed-...")   # a run trained before

    config = cnnlab.load_config("seed", overrides=["dropout=0.4"], data={"dataset": "fashion-mnist"})
    result = cnnlab.train(config)             # a run directory, the history, the test evaluation
    model, classes, config = cnnlab.load_model(result.run)

Names are imported on first use, so `import cnnlab.playground.conv` (the NumPy playground) never loads torch.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Config": "cnnlab.config", "ConfigError": "cnnlab.config", "load_config": "cnnlab.config",
    "list_presets": "cnnlab.config",
    "DATASETS": "cnnlab.data", "get_dataset": "cnnlab.data", "load_dataset": "cnnlab.data",
    "read_idx": "cnnlab.data", "write_idx": "cnnlab.data",
    "CNN": "cnnlab.models.cnn", "build_model": "cnnlab.models.cnn", "summarize": "cnnlab.models.summary",
    "train": "cnnlab.pipeline", "resume": "cnnlab.pipeline", "evaluate_run": "cnnlab.pipeline",
    "RunResult": "cnnlab.pipeline", "Run": "cnnlab.inspect.notebook", "open_run": "cnnlab.inspect.notebook",
    "Evaluation": "cnnlab.training.evaluate",
    "load_model": "cnnlab.runs.weights",
    "Trainer": "cnnlab.training.engine", "Callback": "cnnlab.training.callbacks",
    "UserError": "cnnlab.errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cnnlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
