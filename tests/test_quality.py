"""The checks CI holds the code and the docs to, run as tests so the README's one command runs them:
ruff (lint and import order), mypy (types), and the docs site built strictly (a broken link fails)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{name} is not installed beside this Python: pip install -e '.[test]'")
    return str(path)


def run(*command: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1", "NO_COLOR": "1"})


def test_ruff_finds_nothing():
    done = run(tool("ruff"), "check", "src", "tests", "bench", "scripts", "docs")
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
def test_mypy_finds_nothing():
    done = run(tool("mypy"), timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
def test_the_docs_site_builds_strictly(tmp_path):
    """Every page, link and anchor resolves; the CLI and config references are generated from the code."""
    done = run(tool("mkdocs"), "build", "--strict", "--site-dir", str(tmp_path / "site"))
    assert done.returncode == 0, done.stdout + done.stderr
    cli = (tmp_path / "site" / "reference" / "cli" / "index.html").read_text()
    config = (tmp_path / "site" / "reference" / "config" / "index.html").read_text()
    assert "cnnlab train" in cli and "--allow-checksum-mismatch" in cli and "cnnlab sweep run" in cli
    assert "eval_batch_size" in config and "label_smoothing" in config
    shutil.rmtree(tmp_path / "site")
