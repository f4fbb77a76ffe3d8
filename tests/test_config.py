import pytest
import yaml

from cnnlab.config import Config, ConfigError, config_from_dict, list_presets, load_config

pytestmark = pytest.mark.unit  # every test here is in-process and quick


def test_every_preset_resolves():
    assert {"perceptron", "mlp", "seed", "seed-dropout", "deep"} <= set(list_presets())
    for name in list_presets():
        assert isinstance(load_config(name), Config)


def test_seed_defaults_are_the_lessons():
    config = load_config("seed")
    block = config.model.conv[0]
    assert (block.filters, block.kernel_size, block.activation, block.pool, block.pool_size) == \
        (32, [3, 3], "relu", "max", 2)
    assert [d.units for d in config.model.dense] == [128]
    assert (config.train.optimizer, config.train.batch_size, config.train.epochs) == ("adam", 32, 4)


def test_the_dropout_knob_shapes_every_dense_layer():
    config = load_config("seed", overrides=["dropout=0.4"])
    assert config.model.dense[0].dropout == 0.4 and config.model.classifier_dropout == 0.4
    assert load_config("seed", overrides=["dropout=0.4"]).model == load_config("seed-dropout").model.__class__(
        **{**load_config("seed-dropout").model.__dict__, "name": "seed"})


def test_lesson_knobs_for_kernel_width_and_height():
    config = load_config("seed", overrides=["first_layer_conv_width=5", "first_layer_conv_height=2",
                                            "first_layer_convs=8"])
    assert config.model.conv[0].kernel_size == [2, 5] and config.model.conv[0].filters == 8


def test_paths_and_bare_section_keys():
    config = load_config("seed", overrides=["train.lr=3e-4", "epochs=2", "model.conv.0.filters=16",
                                            "data.dataset=fashion-mnist-sample"])
    assert config.train.lr == pytest.approx(3e-4) and config.train.epochs == 2
    assert config.model.conv[0].filters == 16 and config.data.dataset == "fashion-mnist-sample"


def test_yaml_file_over_preset_then_overrides(tmp_path):
    file = tmp_path / "mine.yaml"
    file.write_text("knobs: {dropout: 0.25}\ntrain: {epochs: 7, lr: 0.01}\n")
    config = load_config("seed", file, ["train.lr=0.02"])
    assert config.model.dense[0].dropout == 0.25 and config.train.epochs == 7 and config.train.lr == 0.02


@pytest.mark.parametrize("override, message", [
    ("dropotu=0.4", "unknown config key 'dropotu'; did you mean 'dropout'"),
    ("train.lrr=0.1", "unknown config key 'train.lrr'; did you mean 'train.lr'"),
    ("modle.name=x", "unknown config section 'modle'; did you mean 'model'"),
    ("knobs.filter=3", "unknown knob 'filter'"),
    ("dropout=1.5", "dropout: expected a fraction in [0, 1), found 1.5"),
    ("train.epochs=two", "train.epochs: expected an int, found 'two'"),
    ("train.compile=1", "train.compile: expected true or false, found 1"),
    ("train.sync_every=true", "train.sync_every: expected an int or null, found true"),
    ("train.optimizer=adma", "train.optimizer: expected one of adam, adamw, sgd, found 'adma'; did you mean 'adam'"),
    ("model.conv.3.filters=1", "expected an index 0..0"),
    ("model.conv.0.pool=maxx", "did you mean 'max'"),
    ("noequals", "expected KEY=VALUE"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_config("seed", overrides=[override])
    assert message in str(info.value)


def test_a_user_knob_no_layer_reads_is_an_error(tmp_path):
    """The lesson's sweep tuned keys its script ignored; cnnlab refuses them."""
    file = tmp_path / "sweep.yaml"
    file.write_text("knobs: {learning_rate_decay: 0.5}\n")
    with pytest.raises(ConfigError, match="'learning_rate_decay' is read by nothing"):
        load_config("seed", file)


def test_unknown_preset_suggests_the_nearest():
    with pytest.raises(ConfigError, match="unknown model preset 'seeds'; did you mean 'seed'"):
        load_config("seeds")


def test_bad_yaml_file_is_named(tmp_path):
    file = tmp_path / "broken.yaml"
    file.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config("seed", file)
    file.write_text("- a list\n")
    with pytest.raises(ConfigError, match="broken.yaml: expected a mapping"):
        load_config("seed", file)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config("seed", tmp_path / "missing.yaml")


def test_saved_config_round_trips():
    config = load_config("deep", overrides=["dropout=0.2"])
    assert config_from_dict(yaml.safe_load(config.to_yaml())) == config


def test_saved_config_with_an_unknown_key_is_refused():
    data = load_config("seed").to_dict()
    data["train"]["lr_decay"] = 0.1
    with pytest.raises(ConfigError, match="config.yaml: unknown config key 'train.lr_decay'"):
        config_from_dict(data, source="config.yaml")


def test_a_datasets_block_tunes_one_dataset_under_the_users_settings(tmp_path):
    file = tmp_path / "tuned.yaml"
    file.write_text("train: {epochs: 2}\n"
                    "datasets:\n  fashion-mnist: {train: {epochs: 5, augment_flip: true}}\n")
    assert load_config(None, file).train.epochs == 2
    fashion = load_config(None, file, data={"dataset": "fashion-mnist"})
    assert fashion.train.epochs == 5 and fashion.train.augment_flip
    assert load_config(None, file, ["data.dataset=fashion-mnist-sample"]).train.epochs == 5
    assert load_config(None, file, ["data.dataset=fashion-mnist", "epochs=7"]).train.epochs == 7
