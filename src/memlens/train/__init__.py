"""The training layer: one fine-tune per grid cell."""

from memlens.train.finetune import (
    check_training_records,
    finetune_cell,
    merge_audit_canaries,
    read_members,
    read_train_info,
    tokenize_records,
)

__all__ = ["check_training_records", "finetune_cell", "merge_audit_canaries", "read_members", "read_train_info",
           "tokenize_records"]
