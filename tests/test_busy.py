"""A slow run says why: the load average against the cores, read from a fake reading here, never from timing."""
from __future__ import annotations

import os

import pytest

from cnnlab.training import busy
from cnnlab.training.busy import busy_note


@pytest.mark.unit
def test_a_load_above_the_cores_is_named_with_both_numbers():
    note = busy_note(threads=1, load=7.9, cores=2)
    assert note == "this machine is busy: load 7.9 on 2 cores, so training took longer"
    assert busy_note(threads=1, load=2.04, cores=1).startswith("this machine is busy: load 2.0 on 1 core, ")


@pytest.mark.unit
@pytest.mark.parametrize("load, cores", [(1.5, 2), (2.0, 2), (0.0, 16), (3.9, 2)])
def test_a_load_within_the_cores_says_nothing(load, cores):
    assert busy_note(threads=4, load=load, cores=cores) is None


@pytest.mark.unit
def test_the_run_s_own_threads_do_not_make_a_quiet_machine_busy():
    # 2 threads training on 2 cores, and a little else: the load reads 2.1, the others' share is 0.1 of a core
    assert busy_note(threads=2, load=2.1, cores=2) is None
    assert busy_note(threads=1, load=2.5, cores=2) is None  # one other core's worth: half the machine still free
    assert busy_note(threads=1, load=3.0, cores=2) is not None


@pytest.mark.unit
def test_several_threads_on_a_busy_machine_get_the_one_thread_hint():
    note = busy_note(threads=2, load=13.4, cores=2)
    assert note is not None and note.endswith("its 2 threads also wait for each other, and train.threads=1 may be "
                                              "faster")


@pytest.mark.unit
def test_no_load_average_on_this_system_says_nothing(monkeypatch):
    def unavailable():
        raise OSError("no load average")

    monkeypatch.setattr(os, "getloadavg", unavailable)
    assert busy.one_minute_load() is None and busy_note(threads=2, cores=1) is None


@pytest.mark.unit
def test_the_readings_default_to_this_machine(monkeypatch):
    monkeypatch.setattr(busy, "one_minute_load", lambda: 9.5)
    monkeypatch.setattr(busy, "usable_cores", lambda: 3)
    assert busy_note(threads=1) == "this machine is busy: load 9.5 on 3 cores, so training took longer"


def test_train_says_it_once_after_training_and_the_notebook_shows_it(monkeypatch, tmp_path, capsys):
    from cnnlab import pipeline
    from cnnlab.cli.training import print_result

    monkeypatch.setattr(busy, "one_minute_load", lambda: 50.0)
    monkeypatch.setattr(busy, "usable_cores", lambda: 2)
    result = pipeline.train(model="seed", dataset="mnist-sample", epochs=1, first_layer_convs=4, dense_layer_size=8,
                            threads=1, root=tmp_path, progress=False)
    assert result.busy == "this machine is busy: load 50.0 on 2 cores, so training took longer"
    print_result(result)
    lines = capsys.readouterr().out.splitlines()
    trained = next(i for i, line in enumerate(lines) if line.startswith("trained in "))
    assert lines[trained + 1] == f"note: {result.busy}"
    assert sum("busy" in line for line in lines) == 1
    assert result._repr_html_().endswith(f"<p>note: {result.busy}</p>")
