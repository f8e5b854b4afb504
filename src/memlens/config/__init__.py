"""Typed study configuration: the schema (:mod:`~memlens.config.schema`), reading and writing study files
(:mod:`~memlens.config.loading`) and the wording of their errors (:mod:`~memlens.config.errors`)."""

from memlens.config.audit import AuditConfig, AuditMIAConfig, audit_study, load_audit, read_train_config
from memlens.config.errors import ConfigError, format_validation_error, renamed_fields
from memlens.config.loading import apply_overrides, dump_study, hub_offline, load_study, looks_like_local_path
from memlens.config.recipe import RECIPE_FILE, TRAINER_DEFAULTS, TrainRecipe, find_recipe, read_recipe
from memlens.config.schema import (
    DEFAULT_MIA_ATTACKS,
    DESIGN_FIELDS,
    DESIGNS,
    LEGACY_ATTACK_SETTINGS,
    MATRIX_NAMES,
    RANDOM,
    SPLITS,
    AttackSpec,
    CanaryConfig,
    CanaryFamily,
    CellConfig,
    DataConfig,
    DecodingConfig,
    Design,
    DPConfig,
    ExecutorConfig,
    ExtractionConfig,
    GridConfig,
    LoraConfig,
    MIAConfig,
    ModelConfig,
    StudyConfig,
    TrainConfig,
    stable_hash,
)

__all__ = ["AuditConfig", "AuditMIAConfig", "audit_study", "load_audit", "read_train_config", "renamed_fields",
           "RECIPE_FILE", "TRAINER_DEFAULTS", "TrainRecipe", "find_recipe", "read_recipe",
           "DEFAULT_MIA_ATTACKS", "LEGACY_ATTACK_SETTINGS", "AttackSpec", "CanaryFamily", "DESIGNS", "DESIGN_FIELDS",
           "MATRIX_NAMES", "RANDOM", "SPLITS", "CanaryConfig", "CellConfig", "ConfigError",
           "DPConfig", "DataConfig", "DecodingConfig", "Design", "ExecutorConfig", "ExtractionConfig", "GridConfig",
           "LoraConfig", "MIAConfig", "ModelConfig", "StudyConfig", "TrainConfig", "apply_overrides", "dump_study",
           "format_validation_error", "hub_offline", "load_study", "looks_like_local_path", "stable_hash"]
