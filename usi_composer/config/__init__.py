"""The recipe's typed configuration: YAML + ``key=value`` overrides -> a validated :class:`Config`.

- ``fields.py``: how a field declares its role (``math``, ``free``, ``teacher_input``) and constraint,
  and the queries on roles;
- ``schema.py``: the keys, their types, ranges, checks and roles;
- ``rules.py``: the named rules that span keys;
- ``loading.py``: the yaml, the overrides, the merge, the one-line errors.

Nothing heavy (models, data, processes) is built here; what is derived from the config and the
environment is the run plan's (``usi_composer/plan.py``).
"""

from usi_composer.config.fields import FREE, MATH, ROLES, TEACHER_INPUT, leaf_fields, value_at
from usi_composer.config.loading import config_to_dict, dump_config, find_yaml, load_config, packaged_yamls
from usi_composer.config.rules import RULES, validate
from usi_composer.config.schema import (
    AlgorithmsConfig,
    Config,
    DataConfig,
    DistillationConfig,
    EMAConfig,
    LoggersConfig,
    MixUpCutMixConfig,
    ModelConfig,
    OptimizerConfig,
    SchedulerConfig,
    StreamingConfig,
    TeacherConfig,
    TrainerConfig,
    WandBConfig,
)
from usi_composer.errors import ConfigError

__all__ = [
    "FREE",
    "MATH",
    "ROLES",
    "RULES",
    "TEACHER_INPUT",
    "AlgorithmsConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DistillationConfig",
    "EMAConfig",
    "LoggersConfig",
    "MixUpCutMixConfig",
    "ModelConfig",
    "OptimizerConfig",
    "SchedulerConfig",
    "StreamingConfig",
    "TeacherConfig",
    "TrainerConfig",
    "WandBConfig",
    "config_to_dict",
    "dump_config",
    "find_yaml",
    "leaf_fields",
    "load_config",
    "packaged_yamls",
    "validate",
    "value_at",
]
