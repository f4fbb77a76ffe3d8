"""`cnnlab train --wandb`: W&B logging in offline mode (no account), and no wandb import without it."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cnnlab.cli import app
from conftest import tiny_train_args

# 4 filters and 8 dense units: the 5,546 parameters the summary is checked against
TINY = ["train", *tiny_train_args("--set", "first_layer_convs=4", "--set", "dense_layer_size=8")]


def wandb_records(file: Path) -> list:
    """The records of an offline run's .wandb file (LevelDB-log framing: 32 KiB blocks, 7-byte chunk headers)."""
    from wandb.proto import wandb_internal_pb2

    data = file.read_bytes()
    assert data[:4] == b":W&B"
    block, position, records, pending = 32768, 7, [], b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if length == 0 and kind == 0:
            position += block - position % block
            continue
        if position + 7 + length > len(data):
            raise EOFError("the last chunk is still being written")
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: a record is complete
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def finished_records(file: Path, timeout: float = 30.0) -> list:
    """The records of a run file once wandb's writer process has flushed its exit record.

    wandb-core writes the file from its own process, so right after the run finishes the file can
    still end in a half-written chunk: read again until the run's `exit` record is there.
    """
    from google.protobuf.message import DecodeError

    deadline = time.monotonic() + timeout
    while True:
        try:
            records = wandb_records(file)
            if any(r.WhichOneof("record_type") == "exit" for r in records):
                return records
        except (EOFError, DecodeError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{file} has no complete exit record after {timeout} s")
        time.sleep(0.2)


def history_rows(records) -> list[dict]:
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]


def summary_values(records) -> dict:
    values = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            for item in r.summary.update:
                values[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return values


def test_train_with_wandb_logs_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wb").mkdir()
    result = CliRunner().invoke(app, [*TINY, "--runs-dir", str(tmp_path), "--name", "w", "--wandb",
                                      "--wandb-project", "cnnlab-test"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "W&B: logging offline" in result.output
    [offline] = (tmp_path / "wb" / "wandb").glob("offline-run-*")
    records = finished_records(next(offline.glob("run-*.wandb")))
    epochs = [row for row in history_rows(records) if "train_loss" in row]
    metrics = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in epochs] == [1, 2]
    assert [row["val_accuracy"] for row in epochs] == pytest.approx([m["val_accuracy"] for m in metrics])
    summary = summary_values(records)
    test = json.loads((tmp_path / "w" / "test.json").read_text())
    assert summary["test_accuracy"] == pytest.approx(test["accuracy"])
    assert summary["params"] == 5546
    final = history_rows(records)[-1]
    assert final["test_predictions/count"] == 32 and "confusion_matrix_table/_type" in final
    captions = final["test_predictions/captions"]
    assert captions[0].startswith(("✓ true ", "✗ true ")) and " predicted " in captions[0]
    assert len(list((offline / "files" / "media" / "images").glob("test_predictions_*.png"))) == 32


def test_without_the_flag_wandb_is_never_imported(tmp_path):
    script = f"""
import sys
from typer.testing import CliRunner
from cnnlab.cli import app
result = CliRunner().invoke(app, {[*TINY, "--epochs", "1", "--runs-dir", str(tmp_path), "--name", "n"]!r})
assert result.exit_code == 0, result.output
print("wandb loaded:", "wandb" in sys.modules)
"""
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "wandb loaded: False" in out.stdout
    assert (tmp_path / "n" / "test.json").is_file()
