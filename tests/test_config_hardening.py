"""Config files and values from users: refused with one line naming the file or key, before anything is made."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from cnnlab.cli import app
from cnnlab.config import ConfigError, load_config

runner = CliRunner()


def one_line_error(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


# ------------------------------------------------------------------------------------ YAML files
@pytest.mark.unit
def test_a_key_given_twice_is_refused_not_silently_overwritten(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  lr: 0.1\n  epochs: 2\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match=r"c.yaml: key 'lr' appears twice in one mapping \(line 4"):
        load_config("seed", tmp_path / "c.yaml")


@pytest.mark.unit
def test_an_alias_bomb_is_refused_quickly(tmp_path):
    """Nine levels of ten aliases each would expand to 10**9 values ("billion laughs")."""
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    (tmp_path / "bomb.yaml").write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=r"bomb.yaml: expands to more than 100,000 values once its aliases"):
        load_config("seed", tmp_path / "bomb.yaml")


@pytest.mark.unit
def test_anchors_and_aliases_that_share_a_block_still_work(tmp_path):
    (tmp_path / "c.yaml").write_text("model:\n  dense:\n    - &layer {units: 64, dropout: 0.1}\n    - *layer\n")
    assert [d.units for d in load_config("seed", tmp_path / "c.yaml").model.dense] == [64, 64]


@pytest.mark.unit
@pytest.mark.parametrize("depth", [40, 5000])
def test_nesting_too_deep_is_refused(tmp_path, depth):
    (tmp_path / "deep.yaml").write_text("train: " + "[" * depth + "]" * depth + "\n")
    with pytest.raises(ConfigError, match="deep.yaml: nested deeper than a config can be"):
        load_config("seed", tmp_path / "deep.yaml")


@pytest.mark.unit
@pytest.mark.parametrize("kind, content, message", [
    ("list", "- 1\n- 2\n", "expected a mapping of sections"),
    ("binary", b"\x80\x81\x82", "not a UTF-8 text config file"),
    ("huge", "# " + "x" * (1 << 20) + "\n", "more than a config file may hold"),
    ("python tag", "model: !!python/object/apply:os.system ['true']\n", "not valid YAML"),
])
def test_bad_config_files_are_one_line_errors(tmp_path, kind, content, message):
    path = tmp_path / "c.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    line = one_line_error(runner.invoke(app, ["train", "--config", str(path), "--runs-dir", str(tmp_path / "r")]))
    assert message in line and str(path) in line
    assert not (tmp_path / "r").exists()


def test_a_fifo_as_config_file_is_refused_without_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / "c.yaml"
    os.mkfifo(fifo)
    # in a child process: were the FIFO opened for reading, it would block until someone writes
    done = subprocess.run([sys.executable, "-m", "cnnlab", "summary", "--config", str(fifo)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "a FIFO (named pipe), not a regular file" in done.stderr, done.stderr


# ------------------------------------------------------------------------------------ values
@pytest.mark.unit
@pytest.mark.parametrize("override, message", [
    ("lr=nan", "train.lr: expected a learning rate, a finite number > 0, found nan"),
    ("lr=.inf", "train.lr: expected a learning rate, a finite number > 0, found inf"),
    ("lr=-0.1", "train.lr: expected a learning rate"),
    ("train.weight_decay=-0.01", "train.weight_decay: expected a weight decay, a finite number in [0, 1]"),
    ("train.norm_bias_lr_scale=0", "train.norm_bias_lr_scale: expected a multiple of the learning rate, a finite "
                                   "number in (0, 1000]"),
    ("train.norm_bias_lr_scale=nan", "train.norm_bias_lr_scale: expected a multiple of the learning rate"),
    ("train.momentum=1.5", "train.momentum: expected a momentum, a finite number in [0, 1)"),
    ("seed=-1", "train.seed: expected an int from 0 to 4,294,967,295"),
    ("seed=18446744073709551616", "train.seed: expected an int from 0 to 4,294,967,295"),
    ("epochs=0", "train.epochs: expected an int from 1 to 10,000"),
    ("batch_size=1000000000", "train.batch_size: expected an int from 1 to 65,536"),
    ("dropout=.nan", "expected a fraction in [0, 1)"),
    ("model.conv.0.filters=1000000", "model.conv[0].filters: expected an int from 1 to 4,096"),
    ("model.conv.0.kernel_size=1000", "model.conv[0].kernel_size: expected an int from 1 to 64"),
    ("dense_layer_size=100000000", "model.dense[0].units: expected an int from 1 to 65,536"),
    ("data.image_size=100000", "data.image_size: expected an int from 1 to 1,024 pixels"),
    ("data.workers=1000", "data.workers: expected an int from 0 to 64"),
    ("train.augment_shift=1000", "train.augment_shift: expected an int from 0 to 64 pixels"),
    ("train.threads=0", "train.threads: expected an int from 1 to 256"),
])
def test_out_of_range_values_fail_before_the_run_directory_exists(tmp_path, override, message):
    line = one_line_error(runner.invoke(app, ["train", "--set", override, "--runs-dir", str(tmp_path / "runs")]))
    assert message in line
    assert not (tmp_path / "runs").exists()


def test_an_override_nested_too_deep_is_just_a_string_that_fails_its_type_check(tmp_path):
    line = one_line_error(runner.invoke(app, ["summary", "--set", "train.momentum=" + "[" * 5000 + "]" * 5000]))
    assert "train.momentum: expected a number" in line
    line = one_line_error(runner.invoke(app, ["summary", "--set", "train.lr=" + "[" * 5000 + "]" * 5000]))
    assert "train.lr: expected a learning rate (a number > 0) or auto" in line


@pytest.mark.unit
@pytest.mark.parametrize("args", [["train", "--dataset", ""], ["summary", "--dataset", ""],
                                  ["train", "--set", "data.dataset="], ["train", "--dataset", " "]],
                         ids=["train", "summary", "set", "blank"])
def test_an_empty_dataset_name_is_one_line_not_the_default(args, tmp_path):
    """`--dataset ""` was dropped on the way and the run trained on mnist-sample."""
    done = CliRunner().invoke(app, [*args, "--runs-dir", str(tmp_path / "runs")] if args[0] == "train" else args)
    assert done.exit_code == 2 and "data.dataset: expected a dataset name" in done.output, done.output
    assert len(done.output.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()


@pytest.mark.unit
@pytest.mark.parametrize("keywords, message", [
    (dict(dataset=123), "dataset: expected a dataset name or an image folder's path (text), found int 123"),
    (dict(dataset=""), "dataset: expected a dataset name or an image folder's path, found ''"),
    (dict(name=5), "name=5: expected a run name or None, found int"),
    (dict(model=["seed"]), "model=['seed']: expected a model preset's name, found list"),
    (dict(progress="no"), "progress='no': expected True or False, found str"),
    (dict(epochs="yes"), "train.epochs: expected an int"),
], ids=["dataset-int", "dataset-empty", "name", "model", "progress", "setting"])
def test_the_notebook_api_names_a_keyword_of_the_wrong_type(keywords, message, tmp_path):
    """`train(dataset=123)` was an AttributeError deep inside; a keyword's text was read again as YAML."""
    from cnnlab import pipeline
    with pytest.raises(ConfigError) as caught:
        pipeline.train(root=tmp_path / "runs", **keywords)
    assert message in str(caught.value) and not (tmp_path / "runs").exists()
