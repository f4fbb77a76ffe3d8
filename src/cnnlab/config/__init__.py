"""Typed configuration: dataclasses for data, model and training (`schema`), the one table of activation
functions (`activations`), and how presets, files and `--set` overrides resolve into them (`resolve`).
No torch.

Config flows one way: preset file -> user file -> overrides -> knobs substituted -> dataclasses ->
builders. The resolved config is saved with every run and the model is rebuilt from it.
"""
from cnnlab.config.activations import ACTIVATION_KINDS, ACTIVATIONS
from cnnlab.config.resolve import (
    config_from_dict,
    dotted_keys,
    list_presets,
    load_config,
    merge,
    parse_override,
    preset_path,
    read_yaml,
    resolve,
)
from cnnlab.config.schema import (
    OPTIMIZERS,
    POOLINGS,
    POOLS,
    SCHEDULES,
    SECTIONS,
    Config,
    ConfigError,
    ConvBlock,
    DataConfig,
    DenseLayer,
    EarlyStopping,
    ModelConfig,
    ResidualStage,
    TrainConfig,
    check_dataset_name,
    peak_lr,
    validate,
)

__all__ = ["config_from_dict", "dotted_keys", "list_presets", "load_config", "merge", "parse_override", "preset_path",
           "read_yaml", "resolve", "ACTIVATION_KINDS", "ACTIVATIONS", "OPTIMIZERS", "POOLINGS", "POOLS", "SCHEDULES",
           "SECTIONS", "Config",
           "ConfigError", "ConvBlock", "ResidualStage", "DataConfig", "DenseLayer", "EarlyStopping", "ModelConfig",
           "TrainConfig", "check_dataset_name", "peak_lr", "validate"]
