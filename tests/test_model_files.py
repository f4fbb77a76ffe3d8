"""Model files and checkpoints cnnlab did not write: a pickle is never run, a malformed file is one clear error.

A trained run is copied, one file is replaced by a booby-trapped pickle (unpickling it creates a marker
file) or by a malformed safetensors file, and every command that loads a model is pointed at it. Each
must refuse in one line naming the file, create no marker, and change nothing in the run.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import cnnlab
from cnnlab import pipeline
from cnnlab.cli import app
from cnnlab.config import ConfigError, load_config
from cnnlab.inspect.activations import learned_kernel
from cnnlab.runs import layout, records
from cnnlab.runs.checkpoints import load_checkpoint
from cnnlab.runs.weights import load_model
from conftest import tiny_config, weights


class Touch:
    """Unpickling this object creates `marker` (what a real attack would do with os.system)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def payloads(marker: Path) -> dict[str, bytes]:
    """A plain pickle and a torch.save archive, each holding a Touch among real-looking tensors."""
    buffer = io.BytesIO()
    torch.save({"conv1.weight": torch.zeros(4, 1, 3, 3), "hook": Touch(marker)}, buffer)
    return {"pickle": pickle.dumps({"conv1.weight": np.zeros(3), "hook": Touch(marker)}),
            "torch.save": buffer.getvalue()}


def tree_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One tiny one-epoch run (a single checkpoint, no previous one to fall back to)."""
    root = tmp_path_factory.mktemp("trained")
    config = tiny_config("epochs=1", "first_layer_convs=4", "dense_layer_size=16")
    return pipeline.train(config, root, name="good", progress=False).run


@pytest.fixture
def copy_run(trained, tmp_path):
    def copy(name: str = "r") -> Path:
        run = tmp_path / "runs" / name
        shutil.copytree(trained, run)
        return run
    return copy


@pytest.fixture
def picture(tmp_path) -> Path:
    file = tmp_path / "digit.png"
    Image.fromarray(np.pad(np.full((12, 4), 255, np.uint8), 8)).save(file)
    return file


@pytest.mark.unit
def test_the_bait_works(tmp_path):
    """The payloads do run code when unpickled the unsafe way: so their silence below means something."""
    marker = tmp_path / "MARKER"
    pickle.loads(payloads(marker)["pickle"])
    assert marker.exists()
    marker.unlink()
    torch.load(io.BytesIO(payloads(marker)["torch.save"]), weights_only=False)
    assert marker.exists()


# --------------------------------------------------------------------------------- every command
# {run}: the run holding the trap; {image}: a real picture; {out}: a folder outside the run
LOADING = {  # commands that load model.safetensors: each must refuse
    "evaluate": ["evaluate", "{run}"],
    "show kernels": ["show", "kernels", "{run}", "-o", "{out}/k.png"],
    "show features": ["show", "features", "{run}", "{image}", "-o", "{out}/f.png"],
    "show mistakes": ["show", "mistakes", "{run}", "-o", "{out}/m.png"],
    "show saliency": ["show", "saliency", "{run}", "--index", "0", "-o", "{out}/s.png"],
    "report": ["report", "{run}", "-o", "{out}/r.html"],
    "explore": ["explore", "{run}", "-o", "{out}/e.html"],
    "predict": ["predict", "{run}", "{image}"],
    "export onnx": ["export", "{run}", "-o", "{out}/m.onnx"],
    "export torchscript": ["export", "{run}", "--format", "torchscript", "-o", "{out}/m.pt"],
    "convolve": ["convolve", "{image}", "--kernel", "{run}:conv1:0", "-o", "{out}/c.png"],
}
NOT_LOADING = {  # commands that read only the run's small files (or the checkpoint): they may succeed
    "show curves": ["show", "curves", "{run}", "-o", "{out}/curves.png"],
    "runs": ["runs", "--runs-dir", "{root}"],
    "runs compare": ["runs", "compare", "{run}", "{good}"],
}


def plant(run: Path, target: str, payload: bytes) -> None:
    """The trap as `target`, and beside it the names a user might expect a PyTorch model under."""
    (run / target).write_bytes(payload)
    for name in ("model.pt", "model.pth", "checkpoint.pt"):
        (run / name).write_bytes(payload)


def invoke(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(app, args)
    return result.exit_code, result.output


def fill(template: list[str], **places) -> list[str]:
    return [part.format(**places) for part in template]


def flat(text: str) -> str:
    """Output with Rich's box drawing and line wrapping removed (typer's BadParameter panel)."""
    return "".join(ch for ch in text if not ch.isspace() and ch not in "│╭╮╰╯─")


@pytest.mark.parametrize("unsafe_env", [True, False], ids=["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "default"])
@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
def test_no_command_unpickles_a_planted_model(copy_run, trained, picture, tmp_path, monkeypatch, kind, unsafe_env):
    """model.safetensors replaced by a pickle: loaders refuse in one line naming it; the rest ignore it."""
    if unsafe_env:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker, out = tmp_path / "MARKER", tmp_path / "out"
    out.mkdir()
    run = copy_run()
    plant(run, "model.safetensors", payloads(marker)[kind])
    before = tree_hashes(run)
    places = dict(run=run, image=picture, out=out, root=run.parent, good=trained)
    for name, template in LOADING.items():
        code, output = invoke(fill(template, **places))
        assert not marker.exists(), name
        assert code == 2, (name, output)
        assert "Traceback" not in output, name
        if name == "convolve":  # a BadParameter panel (playground.py), wrapped by Rich
            assert flat(f"{run / 'model.safetensors'}: a pickle") in flat(output), output
        else:
            errors = [line for line in output.splitlines() if line.startswith("error:")]
            assert len(errors) == 1, (name, output)
            assert errors[0].startswith(f"error: {run / 'model.safetensors'}: a pickle or torch.save file"), name
    for name, template in NOT_LOADING.items():
        code, output = invoke(fill(template, **places))
        assert not marker.exists(), name
        assert "Traceback" not in output, name
    assert tree_hashes(run) == before
    assert not list(out.glob("m.*")) and not (out / "r.html").exists()  # nothing exported or reported
    # resuming a finished run reads only its checkpoint, re-tests, and rewrites the planted weights from it
    code, output = invoke(["train", "--resume", str(run), "-q"])
    assert code == 0 and not marker.exists()
    assert "model.safetensors was" in output and "rewritten from the checkpoint" in output
    repaired, original = weights(run), weights(trained)
    assert repaired.keys() == original.keys() and all(torch.equal(repaired[k], original[k]) for k in original)


@pytest.mark.parametrize("unsafe_env", [True, False], ids=["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "default"])
@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
def test_resume_refuses_a_planted_checkpoint(copy_run, tmp_path, monkeypatch, kind, unsafe_env):
    if unsafe_env:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "MARKER"
    run = copy_run()
    plant(run, "checkpoint.safetensors", payloads(marker)[kind])
    before = tree_hashes(run)
    code, output = invoke(["train", "--resume", str(run), "-q"])
    assert not marker.exists()
    assert code == 2 and "Traceback" not in output
    error = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(error) == 1
    assert f"{run / 'checkpoint.safetensors'} is unreadable (a pickle or torch.save file" in error[0]
    assert tree_hashes(run) == before
    with pytest.raises(layout.RunError, match="no readable checkpoint"):
        load_checkpoint(run)


def test_pytorch_file_names_given_to_commands(copy_run, picture, tmp_path, monkeypatch):
    """A .pt/.pth pickle handed where a run, an image or a config goes: refused, never unpickled."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker, run = tmp_path / "MARKER", copy_run()
    bait = {suffix: tmp_path / f"model{suffix}" for suffix in (".pt", ".pth")}
    for suffix, file in bait.items():
        file.write_bytes(payloads(marker)["torch.save" if suffix == ".pt" else "pickle"])
    before = tree_hashes(run)
    for file in bait.values():
        for args in (["evaluate", file], ["train", "--resume", file], ["train", "--config", file, "--runs-dir",
                     tmp_path / "new"], ["predict", run, file], ["show", "features", run, file, "-o",
                     tmp_path / "f.png"], ["show", "saliency", run, file, "-o", tmp_path / "s.png"],
                     ["export", file], ["report", file, "-o", tmp_path / "r.html"]):
            code, output = invoke([str(a) for a in args])
            assert code != 0 and "Traceback" not in output and str(file) in output, (args, output)
        with pytest.raises(layout.RunError, match=f"{file}: not a run directory but a file"):
            cnnlab.load_model(file)
        code, output = invoke(["convolve", str(file), "-o", str(tmp_path / "c.png")])
        assert code != 0 and "Traceback" not in output
    assert not marker.exists()
    assert tree_hashes(run) == before
    assert not (tmp_path / "new").exists()


def test_python_api_and_web_app_refuse_a_planted_model(copy_run, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    from cnnlab.use.predict import Predictor
    from cnnlab.use.serve.app import create_app

    marker = tmp_path / "MARKER"
    for kind, payload in payloads(marker).items():
        run = copy_run(kind)
        plant(run, "model.safetensors", payload)
        pattern = "model.safetensors: a pickle or torch.save file"
        with pytest.raises(layout.RunError, match=pattern):
            cnnlab.load_model(run)
        with pytest.raises(layout.RunError, match=pattern):
            Predictor.from_run(run)
        with pytest.raises(layout.RunError, match=pattern):
            create_app([run])
        with pytest.raises(layout.RunError, match=pattern):
            learned_kernel(run, "conv1", 0)
    assert not marker.exists()


@pytest.mark.slow
def test_cli_subprocesses_refuse_a_planted_model_in_one_line(copy_run, picture, tmp_path):
    """The real entry point, with torch told to unpickle freely: one `error:` line on stderr, status 2."""
    marker, out = tmp_path / "MARKER", tmp_path / "out"
    out.mkdir()
    run = copy_run()
    plant(run, "model.safetensors", payloads(marker)["torch.save"])
    before = tree_hashes(run)
    env = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1", "COLUMNS": "1000"}
    places = dict(run=run, image=picture, out=out)
    processes = {name: subprocess.Popen([sys.executable, "-m", "cnnlab", *fill(template, **places)], env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
                 for name, template in LOADING.items() if name != "convolve"}
    for name, process in processes.items():
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 2, (name, stderr)
        assert stderr.splitlines() == [f"error: {run / 'model.safetensors'}: a pickle or torch.save file, not "
                                       f"safetensors; cnnlab never unpickles files (unpickling can run any code)"]
    assert not marker.exists()
    assert tree_hashes(run) == before


# ------------------------------------------------------------------------- malformed safetensors
def header_and_data(file: Path) -> tuple[dict, bytes]:
    data = file.read_bytes()
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + length]), data[8 + length:]


def assemble(header: dict | list, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def resave(file: Path, edit_tensors=None, edit_metadata=None) -> None:
    with safe_open(str(file), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    tensors = load_file(str(file))
    if edit_tensors:
        edit_tensors(tensors)
    if edit_metadata:
        edit_metadata(metadata)
    save_file(tensors, str(file), metadata=metadata)


def first_two(header: dict) -> tuple[str, str]:
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    return names[0], names[1]


def overlapping(file: Path) -> None:
    header, data = header_and_data(file)
    a, b = first_two(header)
    header[b]["data_offsets"] = [header[a]["data_offsets"][0], header[a]["data_offsets"][0]
                                 + header[b]["data_offsets"][1] - header[b]["data_offsets"][0]]
    file.write_bytes(assemble(header, data))


def out_of_range(file: Path) -> None:
    header, data = header_and_data(file)
    a, _ = first_two(header)
    header[a]["data_offsets"][1] = len(data) * 4
    file.write_bytes(assemble(header, data))


MALFORMED_WEIGHTS = {  # case -> (damage(file), what the error must say)
    "huge header length": (lambda f: f.write_bytes(struct.pack("<Q", 2**62) + f.read_bytes()[8:]),
                           "not a valid safetensors file"),
    "truncated": (lambda f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2]), "not a valid safetensors"),
    "empty": (lambda f: f.write_bytes(b""), "not a valid safetensors"),
    "header not an object": (lambda f: f.write_bytes(assemble([1, 2, 3], b"")), "not a valid safetensors"),
    "overlapping offsets": (overlapping, "not a valid safetensors"),
    "offsets out of range": (out_of_range, "not a valid safetensors"),
    "wrong dtype": (lambda f: resave(f, lambda t: t.update({k: v.double() for k, v in t.items()})),
                    "is torch.float64, the model needs torch.float32"),
    "missing tensor": (lambda f: resave(f, lambda t: t.pop("head.classifier.bias")),
                       "'head.classifier.bias' is missing"),
    "extra tensor": (lambda f: resave(f, lambda t: t.update(extra=torch.zeros(3))), "'extra' is not part of"),
    "mis-shaped tensor": (lambda f: resave(f, lambda t: t.update({"head.classifier.bias": torch.zeros(11)})),
                          r"'head.classifier.bias' has shape \(11,\), the model in .*config.yaml needs \(10,\)"),
    "nan tensor": (lambda f: resave(f, lambda t: t["head.classifier.bias"].fill_(float("nan"))),
                   "'head.classifier.bias' holds nan values"),
    "no input_shape": (lambda f: resave(f, edit_metadata=lambda m: m.pop("input_shape")),
                       "its metadata has no 'input_shape'"),
    "no classes": (lambda f: resave(f, edit_metadata=lambda m: m.pop("classes")), "its metadata has no 'classes'"),
    "classes not a list": (lambda f: resave(f, edit_metadata=lambda m: m.update(classes='"0123"')),
                           "metadata 'classes' should be a list"),
    "huge input_shape": (lambda f: resave(f, edit_metadata=lambda m: m.update(input_shape="[60000, 60000, 1]")),
                         "tensor .* has shape"),  # checked on the meta device: nothing huge allocated
    "input_shape not JSON": (lambda f: resave(f, edit_metadata=lambda m: m.update(input_shape="28x28")),
                             "metadata 'input_shape' should be"),
}


@pytest.mark.parametrize("case", MALFORMED_WEIGHTS)
def test_malformed_weights_give_a_clean_error(copy_run, case):
    run = copy_run()
    damage, message = MALFORMED_WEIGHTS[case]
    damage(layout.path(run, "weights"))
    before = tree_hashes(run)
    with pytest.raises(layout.RunError, match=f"model.safetensors: .*{message}") as error:
        load_model(run)
    assert "\n" not in str(error.value)
    assert tree_hashes(run) == before


def test_a_malformed_weights_file_is_one_line_in_the_cli(copy_run):
    run = copy_run()
    MALFORMED_WEIGHTS["mis-shaped tensor"][0](layout.path(run, "weights"))
    code, output = invoke(["evaluate", str(run)])
    assert code == 2 and output.count("\n") == 1 and output.startswith(f"error: {run / 'model.safetensors'}")


BAD_CONFIGS = {  # what is put into config.yaml -> what the error must name
    "unknown layer key": (lambda c: c["model"]["conv"][0].update(filterz=8), r"model\.conv\[0\]\.filterz"),
    "unknown activation": (lambda c: c["model"]["conv"][0].update(activation="sigmoidal"),
                           r"model\.conv\[0\]\.activation"),
    "unknown section": (lambda c: c.update(optimiser={}), "unknown config section 'optimiser'"),
    "huge model": (lambda c: c["model"]["dense"][0].update(units=10**9),  # refused before anything is built
                   r"config.yaml: model.dense\[0\].units: expected an int from 1 to 65,536, found 1000000000"),
    "model that does not fit the weights": (lambda c: c["model"]["dense"][0].update(units=4096),
                                            r"head.fc1.weight. has shape \(16, .*needs \(4096, "),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_a_bad_config_yaml_names_the_file_and_key(copy_run, case):
    import yaml

    run = copy_run()
    config = yaml.safe_load(layout.path(run, "config").read_text())
    edit, message = BAD_CONFIGS[case]
    edit(config)
    layout.path(run, "config").write_text(yaml.safe_dump(config))
    with pytest.raises((ConfigError, layout.RunError), match=message) as error:
        load_model(run)
    assert "config.yaml" in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("text", ['model: !!python/object/apply:os.system ["touch {marker}"]\n',
                                  'model: !!python/object/apply:pathlib.Path.touch ["{marker}"]\n'])
def test_python_tags_in_config_yaml_never_run(copy_run, tmp_path, text):
    run, marker = copy_run(), tmp_path / "MARKER"
    layout.path(run, "config").write_text(text.format(marker=marker))
    for call in (load_model, records.load_config, cnnlab.load_model):
        with pytest.raises(ConfigError, match=r"config.yaml: not valid YAML: could not determine a constructor"):
            call(run)
    code, output = invoke(["train", "--resume", str(run)])
    assert code == 2 and output.count("\n") == 1 and "config.yaml: not valid YAML" in output
    assert not marker.exists()


@pytest.mark.unit
def test_a_pickle_as_config_file_is_a_config_error(tmp_path):
    file = tmp_path / "config.pt"
    file.write_bytes(payloads(tmp_path / "MARKER")["torch.save"])
    with pytest.raises(ConfigError, match="config.pt: not a UTF-8 text config file"):
        load_config("seed", file)


# --------------------------------------------------------------------------------- checkpoints
def edit_checkpoint(run: Path, edit_state=None, edit_tensors=None, metadata=None) -> None:
    file = layout.path(run, "checkpoint")
    with safe_open(str(file), framework="pt") as handle:
        meta = dict(handle.metadata())
    tensors = load_file(str(file))
    state = json.loads(meta["state"])
    if edit_state:
        edit_state(state)
    if edit_tensors:
        edit_tensors(tensors)
    meta["state"] = json.dumps(state)
    save_file(tensors, str(file), metadata=metadata if metadata is not None else meta)


def model_entry(state: dict, name: str) -> list:
    """The [key, value] pair of the model's state_dict for parameter `name` in a flattened trainer state."""
    for key, value in state["__dict__"]:
        if key == "model":
            return next(pair for pair in value["__dict__"] if pair[0] == name)
    raise KeyError(name)


BAD_CHECKPOINTS = {
    "reference to a missing tensor": (dict(edit_state=lambda s: model_entry(s, "head.classifier.bias")[1].update(
        __tensor__="no.such.tensor")), "refers to tensor 'no.such.tensor'"),
    "epoch of the wrong type": (dict(edit_state=lambda s: [p.__setitem__(1, "one") for p in s["__dict__"]
                                                           if p[0] == "epoch"]), "'epoch' should be a count"),
    "no step": (dict(edit_state=lambda s: s.update(__dict__=[p for p in s["__dict__"] if p[0] != "step"])),
                "has no 'step'"),
    "state not a mapping": (dict(edit_state=lambda s: s.update(__dict__=[[1, 2, 3]])), "malformed mapping"),
    "a weights file, not a checkpoint": (dict(metadata={"format": "cnnlab-weights-1"}),
                                         "not a cnnlab checkpoint"),
    "inf in optimizer state": (dict(edit_tensors=lambda t: [v.fill_(float("inf")) for k, v in t.items()
                                                            if k.startswith(".1.") and v.numel() > 1][:1]),
                               "holds inf values"),
}


@pytest.mark.parametrize("case", BAD_CHECKPOINTS)
def test_a_malformed_checkpoint_is_refused_cleanly(copy_run, case):
    run = copy_run()
    edits, message = BAD_CHECKPOINTS[case]
    edit_checkpoint(run, **edits)
    before = tree_hashes(run)
    pattern = f"no readable checkpoint .*checkpoint.safetensors is unreadable \\(.*{message}"
    with pytest.raises(layout.RunError, match=pattern):
        load_checkpoint(run)
    code, output = invoke(["train", "--resume", str(run), "-q"])
    assert code == 2 and "Traceback" not in output and message.replace("\\", "") in output
    assert tree_hashes(run) == before


def test_a_checkpoint_that_does_not_fit_the_model_is_refused_by_restore(copy_run):
    """Shapes are only known once the model is built: load_checkpoint's `restore` rejects a mismatch."""
    from cnnlab.models.cnn import build_model

    run = copy_run()
    key = model_entry_key(run)
    edit_checkpoint(run, edit_tensors=lambda t: t.update({key: torch.zeros(11)}))
    model = build_model(records.load_config(run).model, (28, 28, 1), 10)
    with pytest.raises(layout.RunError, match="no readable checkpoint .*size mismatch for head.classifier.bias"):
        load_checkpoint(run, restore=lambda state: model.load_state_dict(state["model"]))


def model_entry_key(run: Path) -> str:
    with safe_open(str(layout.path(run, "checkpoint")), framework="pt") as handle:
        state = json.loads(handle.metadata()["state"])
    return model_entry(state, "head.classifier.bias")[1]["__tensor__"]


def test_resume_of_a_checkpoint_that_does_not_fit_is_one_line(copy_run):
    run = copy_run()
    key = model_entry_key(run)
    edit_checkpoint(run, edit_tensors=lambda t: t.update({key: torch.zeros(11)}))
    code, output = invoke(["train", "--resume", str(run), "-q"])
    assert code == 2 and "Traceback" not in output and "checkpoint.safetensors" in output


@pytest.mark.unit
def test_a_valid_file_whose_header_length_starts_like_a_pickle_still_loads(tmp_path):
    """A safetensors file starts with its header length: one in 256 begins with byte 0x80, as pickles do."""
    from safetensors.torch import save_file

    from cnnlab.runs.weights import read_safetensors

    for pad in range(300):
        file = tmp_path / "w.safetensors"
        save_file({"x": torch.ones(2)}, str(file), metadata={"pad": "a" * pad})
        if file.read_bytes()[:1] == b"\x80":
            tensors, metadata = read_safetensors(file)
            assert torch.equal(tensors["x"], torch.ones(2)) and metadata["pad"] == "a" * pad
            return
    pytest.fail("no header length starting with 0x80 in the range tried")


def test_a_model_file_that_may_not_be_read_says_so_not_that_it_is_missing(tmp_path, monkeypatch):
    from cnnlab.runs import weights as weights_module
    from use_runs import tiny_run

    run = shutil.copytree(tiny_run("mnist-sample"), tmp_path / "run")
    real_open = open

    def refusing_open(file, *args, **kwargs):
        if str(file).endswith("model.safetensors"):  # as for mode 000 (the suite may run as root)
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(weights_module, "open", refusing_open, raising=False)
    result = CliRunner().invoke(cnnlab.cli.app, ["predict", str(run), "x.png"])
    assert result.exit_code == 2
    assert f"error: {run / 'model.safetensors'}: cannot read it: Permission denied" in result.output
    assert "No such file" not in result.output
