"""The configuration of a tread_scale run: typed schema, yaml loader and cross-field validation.

* :mod:`~tread_scale.config.schema`: the dataclasses (:class:`RunConfig` and one class per section);
* :mod:`~tread_scale.config.loader`: yaml files with ``base:`` inheritance, ``key=value`` overrides, dumps;
* :mod:`~tread_scale.config.validate`: cross-field checks and the resolution of the backend's section;
* :mod:`~tread_scale.config.typed`: the generic, schema-agnostic dataclass ↔ mapping machinery.

Everything public is re-exported here, so ``from tread_scale.config import X`` is the one import to use.
"""

from tread_scale.config.loader import config_from_dict, dump_config, load_config, load_config_dict
from tread_scale.config.schema import (
    DataConfig,
    DeepSpeedConfig,
    EMAConfig,
    EvaluationConfig,
    FSDPConfig,
    LoggingConfig,
    ModelConfig,
    ObjectiveConfig,
    OptimizerConfig,
    ParallelismConfig,
    RoutingConfig,
    RunConfig,
    SamplingConfig,
    TextConfig,
    TrainConfig,
    WandbConfig,
)
from tread_scale.config.typed import apply_override, from_dict, nearest_key, parse_override, to_dict
from tread_scale.config.validate import resolve_backend_sections, validate, validate_parallelism

__all__ = [
    "RunConfig", "ModelConfig", "RoutingConfig", "ObjectiveConfig", "OptimizerConfig", "EMAConfig", "DataConfig",
    "FSDPConfig", "DeepSpeedConfig", "ParallelismConfig", "TrainConfig", "SamplingConfig", "TextConfig", "EvaluationConfig",
    "WandbConfig", "LoggingConfig",
    "load_config", "load_config_dict", "config_from_dict", "dump_config",
    "validate", "validate_parallelism", "resolve_backend_sections",
    "from_dict", "to_dict", "apply_override", "parse_override", "nearest_key",
]
