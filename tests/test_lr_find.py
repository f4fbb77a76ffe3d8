"""The learning-rate finder: the model handed in is left exactly as it was, every call gives the same
sweep, a diverging loss ends it, the rules read the curve as documented, and `lr: auto` trains at it."""
from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from cnnlab import pipeline
from cnnlab.config import load_config
from cnnlab.data.sources import load_data
from cnnlab.models.cnn import build_model
from cnnlab.runs.checkpoints import load_checkpoint
from cnnlab.training.engine import TrainData
from cnnlab.training.lr_find import FinderFailed, centred_average, find_lr, rule_for, suggest
from conftest import tiny_config


@pytest.fixture(scope="module")
def setup():
    config = tiny_config()
    data = load_data(config, progress=False)
    return config, TrainData(data.train, data.val), data


def fresh(config):
    return build_model(config.model, (28, 28, 1), 10, seed=config.train.seed)


@pytest.mark.unit
def test_the_model_and_the_global_random_state_are_left_exactly_as_they_were(setup):
    config, data, _ = setup
    model = fresh(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    finding = find_lr(model, data, config.train, steps=30)
    assert len(finding.lrs) > 8
    assert all(torch.equal(before[k], model.state_dict()[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(rng, torch.get_rng_state())


@pytest.mark.unit
def test_every_call_gives_the_same_sweep_and_suggestion(setup):
    config, data, _ = setup
    a, b = (find_lr(fresh(config), data, config.train, steps=30) for _ in range(2))
    assert a.losses == b.losses and a.suggestion == b.suggestion


@pytest.mark.unit
def test_a_diverging_loss_ends_the_sweep_and_leaves_no_bad_points(setup):
    config, data, _ = setup
    sgd = tiny_config("train.optimizer=sgd", "train.momentum=0.9").train
    finding = find_lr(fresh(config), data, sgd, steps=40, start=1e-4, end=1e8)
    assert finding.lrs[-1] < 1e8 and ("non-finite" in finding.ended or "exploded" in finding.ended)
    assert all(math.isfinite(x) for x in finding.losses)
    assert finding.suggestion < finding.lrs[-1]


@pytest.mark.unit
def test_steepest_reads_the_fastest_fall_before_the_lowest_point():
    lrs = [10 ** (-6 + i * 0.25) for i in range(25)]  # 1e-6 .. 1
    # flat, a fall that is fastest around point 10 (from 1.7 to 0.7 between its neighbours), the lowest at 16
    losses = [2.0] * 8 + [1.9, 1.7, 1.2, 0.7, 0.5, 0.45, 0.42, 0.41, 0.40, 0.6, 1.0, 2.0, 3, 4, 5, 6, 7]
    lr, why = suggest(lrs, losses, "steepest")
    assert lr == lrs[10] and "steepest" in why
    lr, why = suggest(lrs, losses, "minimum")
    assert lr == pytest.approx(lrs[16] / 10) and "lowest" in why
    lr, why = suggest(lrs, losses, "peak")
    assert lr == lrs[16] and "one-cycle" in why


@pytest.mark.unit
def test_auto_picks_the_peak_for_one_cycle_and_the_steepest_fall_otherwise():
    assert rule_for(load_config("fast").train) == "peak"  # fast trains one-cycle
    assert rule_for(load_config("seed").train) == "steepest"
    assert rule_for(load_config("fast").train, "minimum") == "minimum"


@pytest.mark.unit
def test_a_loss_that_never_falls_has_no_suggestion():
    lrs = [10 ** (-6 + i * 0.5) for i in range(12)]
    with pytest.raises(FinderFailed, match="never fell"):
        suggest(lrs, [1.0 + 0.1 * i for i in range(12)], "steepest")
    with pytest.raises(FinderFailed, match="exploded after 3 steps"):
        suggest(lrs[:3], [1.0, 5.0, 50.0], "steepest")


@pytest.mark.unit
def test_the_centred_average_has_no_lag():
    assert centred_average([0, 0, 0, 7, 0, 0, 0], window=7)[3] == 1.0
    step = centred_average([1.0] * 10 + [0.0] * 10, window=3)
    assert step[9] == pytest.approx(2 / 3) and step[10] == pytest.approx(1 / 3)


def test_lr_auto_trains_at_the_suggestion_exactly_as_if_it_had_been_given(tmp_path):
    auto = pipeline.train(tiny_config("epochs=1", "train.lr=auto"), tmp_path,
                          name="auto", progress=False)
    found = json.loads((auto.run / "lr_find.json").read_text())
    lr = yaml.safe_load((auto.run / "config.yaml").read_text())["train"]["lr"]
    assert lr == float(f"{found['suggestion']:.2g}") and (auto.run / "lr_find.png").stat().st_size > 5000
    given = pipeline.train(tiny_config("epochs=1", f"train.lr={lr}"), tmp_path,
                           name="given", progress=False)
    a, b = load_checkpoint(auto.run)[0]["model"], load_checkpoint(given.run)[0]["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # the sweep left no trace: same weights, same draws


def test_one_cycle_takes_the_suggestion_as_its_peak(tmp_path):
    result = pipeline.train(load_config("fast", overrides=["train.lr=auto", "train.threads=1", "data.val_size=500"]),
                            tmp_path, name="fast", progress=False)
    lr = yaml.safe_load((result.run / "config.yaml").read_text())["train"]["lr"]
    peaks = [group["max_lr"] for group in load_checkpoint(result.run)[0]["optimizer"]["param_groups"]]
    assert lr == float(f"{result.lr_finding.suggestion:.2g}") and peaks == [lr]


@pytest.mark.unit
def test_bad_rules_and_ranges_are_refused(setup):
    config, data, _ = setup
    with pytest.raises(FinderFailed, match="rule"):
        find_lr(fresh(config), data, config.train, rule="valley")
    with pytest.raises(FinderFailed, match="start < end"):
        find_lr(fresh(config), data, config.train, start=1.0, end=0.1)
