"""Typed configs: dataclass schemas, YAML recipes with ``_base_`` inheritance, dotlist overrides.

Defaults < YAML (bases first, the file last) < ``--output-dir``/``--data-root`` < ``key=value``.
Unknown keys and wrong types are :class:`ConfigError`s naming the dotted key.
"""
from .cli import (DATA_ROOT_KEYS, DEBUG_ENV, DEBUG_FLAG, OUTPUT_DIR_KEYS, add_debug_flag, default_argument_parser,
                  parse_and_load, print_config)
from .errors import ConfigError, require
from .loader import (build_config, config_from_dict, config_to_dict, dump_config, field_type,
                     load_config, overrides_to_layers, save_config)
from .reid import ReIDDataConfig, ReIDModelConfig, ReIDTrainConfig, validate_reid_sections
from .schema import (RANDOM_INIT, DataConfig, EvalConfig, ModelConfig, OptimConfig, TrainConfig,
                     validate_train_config)
from .yaml_io import Layer, deep_merge, load_yaml_layers, load_yaml_with_bases

__all__ = [
    "ConfigError",
    "require",
    "DATA_ROOT_KEYS",
    "DEBUG_ENV",
    "DEBUG_FLAG",
    "DataConfig",
    "EvalConfig",
    "Layer",
    "ModelConfig",
    "OUTPUT_DIR_KEYS",
    "OptimConfig",
    "RANDOM_INIT",
    "ReIDDataConfig",
    "ReIDModelConfig",
    "ReIDTrainConfig",
    "TrainConfig",
    "add_debug_flag",
    "build_config",
    "config_from_dict",
    "config_to_dict",
    "deep_merge",
    "default_argument_parser",
    "dump_config",
    "field_type",
    "load_config",
    "load_yaml_layers",
    "load_yaml_with_bases",
    "overrides_to_layers",
    "parse_and_load",
    "print_config",
    "save_config",
    "validate_reid_sections",
    "validate_train_config",
]
