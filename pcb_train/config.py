"""A run's configuration: the schema (`pcb_train.config_schema`) and its YAML I/O (`pcb_train.config_io`).

One import point for every module that needs a config:

    load_config(path, overrides) -> TrainConfig     strict YAML + dotted key=value overrides, resolved
    save_config(cfg, path)                          YAML that `load_config` reads back
    TrainConfig(model: ModelConfig, data: DataConfig, solver: SolverConfig, name, seed, device, ...)
    model_config_from_dict(d, source)               a checkpoint's stored model section
    to_dict(cfg)                                    plain nested dicts (tuples -> lists)

Commands that only need a model (`dump-logits`, `calibrate`) read the same files and use `.model`.
Conventions and the loading rules: docs/training.md §1.
"""

from __future__ import annotations

from pcb_train.config_io import (
    BASE_KEY,
    MAX_BASE_DEPTH,
    apply_overrides,
    config_to_yaml,
    from_dict,
    load_config,
    model_config_from_dict,
    save_config,
    to_dict,
)
from pcb_train.config_schema import (
    ARCH_DEFAULTS,
    STRUCTURAL_FIELDS,
    DataConfig,
    ModelConfig,
    SolverConfig,
    TrainConfig,
)

__all__ = [
    "ARCH_DEFAULTS",
    "BASE_KEY",
    "MAX_BASE_DEPTH",
    "STRUCTURAL_FIELDS",
    "DataConfig",
    "ModelConfig",
    "SolverConfig",
    "TrainConfig",
    "apply_overrides",
    "config_to_yaml",
    "from_dict",
    "load_config",
    "model_config_from_dict",
    "save_config",
    "to_dict",
]
