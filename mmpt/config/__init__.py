"""Typed run configuration: the schema (`schema`, composed with registered modalities' and evals' sections), its
construction from plain data (`build`), the checks a type cannot express (`checks`) and YAML loading with dotted
CLI overrides (`loader`). Imports point one way: schema <- build <- checks <- loader.

    from mmpt.config import load_config
    cfg = load_config("demo", ["train.steps=50", "model.width=64"])
"""
from mmpt.config.build import resolve_augment, source_augment
from mmpt.config.checks import validate
from mmpt.config.loader import (
    CONFIG_DIR,
    config_from_dict,
    import_plugins,
    load_config,
    resolve_path,
    upgrade_old_keys,
    yaml_problem,
)
from mmpt.config.schema import (
    AugmentConfig,
    Config,
    DataConfig,
    DeepSpeedConfig,
    EvalConfig,
    LossConfig,
    ModelConfig,
    MoEConfig,
    OptimConfig,
    SourceConfig,
    TaskTerms,
    TrainConfig,
    augment_class,
    config_class,
    default_config,
    task_view,
)

__all__ = ["AugmentConfig", "CONFIG_DIR", "Config", "DataConfig", "DeepSpeedConfig", "EvalConfig", "LossConfig",
           "ModelConfig", "MoEConfig", "OptimConfig", "SourceConfig", "TaskTerms", "TrainConfig", "augment_class",
           "config_class", "config_from_dict", "default_config", "import_plugins", "load_config",
           "resolve_augment", "resolve_path", "source_augment", "task_view", "upgrade_old_keys", "validate",
           "yaml_problem"]
