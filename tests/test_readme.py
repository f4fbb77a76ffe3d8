"""README.md's quick-start commands are the ones CI runs."""
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit  # every test here is in-process and quick

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = ROOT.joinpath("README.md").read_text()
    ci = ROOT.joinpath(".ci", "run").read_text()
    command = ("python3 -m venv .venv && .venv/bin/pip install -c constraints.txt -e '.[test]' "
               "&& .venv/bin/python -m pytest")
    assert command in readme.split("## ")[0]  # in the opening section
    assert command.replace("pip install -c", "pip install -q -c") in ci


def test_readme_opens_with_the_main_job():
    opening = ROOT.joinpath("README.md").read_text().split("## ")[0]
    assert ".venv/bin/cnnlab train && .venv/bin/cnnlab evaluate" in opening


def test_readme_stays_short():
    assert len(ROOT.joinpath("README.md").read_text().splitlines()) <= 150  # the rest lives in docs/
