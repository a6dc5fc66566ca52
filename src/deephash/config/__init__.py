"""Experiment configuration: a typed TOML schema with defaults, validation and ``--set`` overrides.

A config is a tree of dataclasses (:mod:`~deephash.config.schema`); an unknown key or a value of
the wrong type is a one-line :class:`~deephash.errors.ConfigError` naming the key and the file
(:mod:`~deephash.config.parse`). ``dump_config`` writes the resolved config (every default filled
in) back to TOML, which is what a run directory keeps as ``config.toml``; configs shipped in the
package are found by name (:mod:`~deephash.config.files`).
"""

from deephash.config.files import (
    config_description,
    config_to_dict,
    dump_config,
    load_config,
    resolve_config_path,
    shipped_config,
    shipped_config_names,
    shipped_configs,
)
from deephash.config.parse import config_from_dict, parse_override
from deephash.config.schema import (
    Config,
    DataConfig,
    EvalConfig,
    LossConfig,
    MemoryConfig,
    ModelConfig,
    ModelSpec,
    NearDuplicateConfig,
    PseudoLabelConfig,
    OptimizerConfig,
    SamplerConfig,
    ScheduleConfig,
    SchedulerConfig,
    SelectorConfig,
    TrainConfig,
)

__all__ = [
    "Config",
    "DataConfig",
    "ModelSpec",
    "NearDuplicateConfig",
    "PseudoLabelConfig",
    "EvalConfig",
    "LossConfig",
    "MemoryConfig",
    "ModelConfig",
    "OptimizerConfig",
    "SamplerConfig",
    "ScheduleConfig",
    "SchedulerConfig",
    "SelectorConfig",
    "TrainConfig",
    "config_description",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "load_config",
    "parse_override",
    "resolve_config_path",
    "shipped_config",
    "shipped_config_names",
    "shipped_configs",
]
