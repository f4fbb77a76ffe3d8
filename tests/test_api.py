import subprocess
import sys

import cnnlab


def test_public_api_names_resolve():
    for name in cnnlab.__all__:
        assert getattr(cnnlab, name) is not None


def test_importing_the_package_does_not_load_torch():
    code = "import cnnlab, cnnlab.config, sys; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_python_api_trains_and_reloads(tmp_path):
    config = cnnlab.load_config("perceptron", overrides=["epochs=1"], data={"dataset": "mnist-sample"})
    result = cnnlab.train(config, tmp_path, progress=False)
    model, classes, saved = cnnlab.load_model(result.run)
    assert saved == config and classes[3] == "3" and result.test.accuracy > 0.5
