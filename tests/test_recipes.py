"""Training recipes, each a config key whose default changes nothing: random erasing, weight averaging (EMA),
test-time shifts, weight decay that skips norms and biases, lookahead."""
from __future__ import annotations

import pytest
import torch

from cnnlab import pipeline
from cnnlab.config import load_config
from cnnlab.runs.checkpoints import load_checkpoint
from cnnlab.runs.weights import load_model
from cnnlab.training.augment import augment, random_erase
from cnnlab.training.evaluate import shifted, views
from cnnlab.training.lookahead import EVERY, PEAK_DECAY, Lookahead, decay_at
from cnnlab.training.optim import make_optimizer, make_scheduler
from conftest import StopAt, tiny_config, whole_and_resumed


def quick(*overrides: str):
    return tiny_config(*overrides)


# ---------------------------------------------------------------------------------- random erasing
@pytest.mark.unit
def test_erasing_replaces_one_rectangle_per_chosen_image():
    images = torch.full((64, 1, 28, 28), 7, dtype=torch.uint8)
    torch.manual_seed(0)
    erased = random_erase(images, 1.0)
    changed = erased != images  # noise can equal 7 by chance: a pixel or two, never a shape
    assert erased.dtype == torch.uint8 and erased.shape == images.shape
    for mask in changed[:, 0]:
        rows, cols = mask.any(dim=1).nonzero(), mask.any(dim=0).nonzero()
        height, width = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        area = height * width / (28 * 28)
        assert 0.01 <= area <= 0.4 and mask.sum() >= 0.9 * height * width  # one filled rectangle
    assert torch.equal(random_erase(images, 0.0), images)


@pytest.mark.unit
def test_erasing_is_drawn_from_the_seeded_generator():
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    torch.manual_seed(3)
    first = augment(images, 2, True, 0.5)
    torch.manual_seed(3)
    assert torch.equal(first, augment(images, 2, True, 0.5))


# ---------------------------------------------------------------------------------- test-time views
@pytest.mark.unit
def test_shifted_moves_the_image_and_fills_with_zeros():
    x = torch.arange(16.0).reshape(1, 1, 4, 4) + 1
    down = shifted(x, 1, 0)
    assert torch.equal(down[0, 0, 1:], x[0, 0, :3]) and (down[0, 0, 0] == 0).all()
    left = shifted(x, 0, -1)
    assert torch.equal(left[0, 0, :, :3], x[0, 0, :, 1:]) and (left[0, 0, :, 3] == 0).all()


@pytest.mark.unit
def test_views_are_the_image_its_mirror_and_their_shifts():
    x = torch.rand(2, 1, 8, 8)
    assert len(views(x, False, 0)) == 1 and len(views(x, True, 0)) == 2
    assert len(views(x, False, 1)) == 5 and len(views(x, True, 2)) == 10


# ---------------------------------------------------------------------------------- weight decay groups
@pytest.mark.unit
def test_weight_decay_can_skip_biases_and_norm_scales():
    config = load_config("fast", overrides=["train.weight_decay=0.01", "train.decay_norms_and_biases=false"])
    from cnnlab.models.cnn import build_model

    model = build_model(config.model)
    decayed, skipped = make_optimizer(model, config.train).param_groups
    assert decayed["weight_decay"] == 0.01 and skipped["weight_decay"] == 0.0
    assert all(p.dim() > 1 for p in decayed["params"]) and all(p.dim() == 1 for p in skipped["params"])
    assert len(make_optimizer(model, load_config("fast", overrides=["train.weight_decay=0.01"]).train)
               .param_groups) == 1  # the default: everything decays, as before


@pytest.mark.unit
def test_batch_norm_biases_can_learn_faster_through_the_whole_schedule():
    from torch import nn

    from cnnlab.models.cnn import build_model
    from cnnlab.training.optim import make_scheduler

    config = load_config("fast", overrides=["train.norm_bias_lr_scale=8", "train.weight_decay=0.01",
                                            "train.decay_norms_and_biases=false"])
    model = build_model(config.model)
    optimizer = make_optimizer(model, config.train)
    norm_biases = {id(m.bias) for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    fast_groups = [g for g in optimizer.param_groups if g["lr_scale"] == 8]
    assert len(fast_groups) == 1 and {id(p) for p in fast_groups[0]["params"]} == norm_biases
    assert fast_groups[0]["weight_decay"] == 0.0  # still a 1-D tensor, so still not decayed
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    scheduler = make_scheduler(optimizer, config.train, total_steps=20)
    for _ in range(10):  # warm-up and into the annealing: the ratio holds at every step
        rates = {g["lr_scale"]: g["lr"] for g in optimizer.param_groups}
        assert rates[8] == pytest.approx(8 * rates[1.0])
        optimizer.step()
        scheduler.step()
    assert max(g["lr"] for g in optimizer.param_groups) <= 8 * config.train.lr


@pytest.mark.unit
def test_the_default_learning_rate_scale_changes_nothing():
    from cnnlab.models.cnn import build_model

    config = load_config("fast")
    groups = make_optimizer(build_model(config.model), config.train).param_groups
    assert len(groups) == 1 and groups[0]["lr"] == config.train.lr


# ---------------------------------------------------------------------------------- weight averaging
def test_the_averaged_weights_are_what_is_tested_and_saved(tmp_path):
    result = pipeline.train(quick("train.ema=0.9"), tmp_path, name="ema", progress=False)
    saved = load_model(result.run)[0].state_dict()
    checkpoint, _ = load_checkpoint(result.run)
    averaged, raw = checkpoint["ema"]["model"], checkpoint["model"]
    assert all(torch.equal(saved[k], averaged[k]) for k in saved)
    assert not all(torch.equal(averaged[k], raw[k]) for k in raw if raw[k].is_floating_point())
    assert checkpoint["ema"]["updates"] == 2 * -(-3500 // 64)  # one update per step


def test_an_ema_run_resumes_bitwise_equal(tmp_path):
    config = quick("train.ema=0.95", "dropout=0.2", "train.augment_erase=0.5", "train.augment_shift=1")
    reference, resumed = whole_and_resumed(config, tmp_path, StopAt(epoch=2, step=17))
    a, b = load_checkpoint(reference)[0], load_checkpoint(resumed)[0]
    for key in ("model",):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    assert all(torch.equal(a["ema"]["model"][k], b["ema"]["model"][k]) for k in a["ema"]["model"])
    assert (reference / "test.json").read_text() == (resumed / "test.json").read_text()


# ---------------------------------------------------------------------------------- lookahead
@pytest.mark.unit
def test_the_lookahead_pull_grows_over_the_run():
    total = 100
    decays = [decay_at(step, total) for step in range(0, total + 1, EVERY)]
    assert decays[0] == 0.0 and decays[-1] == PEAK_DECAY
    assert all(a < b for a, b in zip(decays, decays[1:]))


@pytest.mark.unit
def test_lookahead_pulls_every_few_steps_and_at_the_last_one():
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    total = 2 * EVERY + 2  # not a multiple of EVERY: the last two steps are pulled in too
    lookahead = Lookahead(model, total_steps=total)
    slow = 0.0
    for step in range(1, total + 1):
        with torch.no_grad():
            model.weight += 1.0  # what an optimiser step would do
        before = model.weight.item()
        lookahead.after_step(model, step)
        if step % EVERY and step < total:
            assert model.weight.item() == before  # between pulls the weights move freely
        else:
            slow += (1 - decay_at(step, total)) * (before - slow)
            assert model.weight.item() == pytest.approx(slow) == lookahead.slow["weight"].item()
    assert EVERY < model.weight.item() < total  # it ends on the slow weights, which took in every step


def test_a_run_too_short_for_lookahead_trains_as_without_it(tmp_path):
    # 3,500 training images in batches of 1,024: 4 steps, fewer than two pulls' worth
    short = ["epochs=1", "batch_size=1024"]
    plain = pipeline.train(quick(*short), tmp_path, name="plain", progress=False)
    pulled = pipeline.train(quick(*short, "train.lookahead=true"), tmp_path, name="la", progress=False)
    a, b = load_model(plain.run)[0].state_dict(), load_model(pulled.run)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "lookahead" not in load_checkpoint(pulled.run)[0]


def test_a_lookahead_run_saves_its_slow_weights(tmp_path):
    result = pipeline.train(quick("epochs=1", "train.lookahead=true"), tmp_path, name="la", progress=False)
    saved = load_model(result.run)[0].state_dict()
    checkpoint, _ = load_checkpoint(result.run)
    assert all(torch.equal(saved[k], checkpoint["lookahead"][k]) for k in checkpoint["lookahead"])


@pytest.mark.parametrize("override", ["train.augment_erase=0.5", "train.ema=0.99", "train.tta_shift=1",
                                      "train.tta=true", "train.decay_norms_and_biases=false",
                                      "train.weight_decay=0.0005", "train.lookahead=true",
                                      "train.augment_rotate=10"])
def test_every_recipe_key_trains_on_a_shipped_sample(tmp_path, override):
    result = pipeline.train(quick("epochs=1", override), tmp_path, name="r", progress=False)
    assert result.test is not None and 0.0 <= result.test.accuracy <= 1.0
    assert torch.isfinite(torch.tensor(result.history[-1]["train_loss"]))


def test_faster_batch_norm_biases_train_a_batch_norm_network_on_a_shipped_sample(tmp_path):
    config = tiny_config("epochs=1", "model.conv.0.filters=8", "dense_layer_size=32", "train.norm_bias_lr_scale=8",
                         model="deep", shrink_model=False)
    result = pipeline.train(config, tmp_path, name="r", progress=False)
    assert result.test is not None and torch.isfinite(torch.tensor(result.history[-1]["train_loss"]))
    checkpoint, _ = load_checkpoint(result.run)
    assert sorted(g["lr_scale"] for g in checkpoint["optimizer"]["param_groups"]) == [1.0, 8.0]


@pytest.mark.unit
@pytest.mark.parametrize("total_steps", range(1, 9))
def test_one_cycle_works_for_runs_of_a_few_steps(total_steps):
    """torch's OneCycleLR divides by its warm-up length minus one: 4 steps at a 25% warm-up crashed."""
    config = load_config("fast").train
    model = torch.nn.Linear(2, 2)
    optimizer = make_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config, total_steps)
    rates = []
    for _ in range(total_steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert all(0 < rate <= config.lr for rate in rates)
    if total_steps >= 3:  # a cycle: up to the peak, then down
        peak = max(rates)
        assert rates[0] < peak and rates[-1] < peak and peak > 0.5 * config.lr
