"""The models layer: load base models, name their matrices, attach and swap adapters."""

from memlens.models.adapters import AdapterBank, check_adapter_fits, read_peft_config, save_adapter
from memlens.models.loading import (
    check_max_length,
    check_quantized,
    load_base_model,
    load_model_config,
    load_tokenizer,
    local_model_folder,
    model_context_length,
    quiet_bitsandbytes_import,
    resolve_device,
    resolve_dtype,
)
from memlens.models.targets import (
    TargetPlan,
    available_matrices,
    count_parameters,
    plan_targets,
    split_fused_modules,
)

__all__ = [
    "AdapterBank",
    "check_max_length",
    "check_quantized",
    "count_parameters",
    "save_adapter",
    "check_adapter_fits",
    "read_peft_config",
    "TargetPlan",
    "available_matrices",
    "load_base_model",
    "load_model_config",
    "load_tokenizer",
    "local_model_folder",
    "model_context_length",
    "quiet_bitsandbytes_import",
    "plan_targets",
    "resolve_device",
    "resolve_dtype",
    "split_fused_modules",
]
