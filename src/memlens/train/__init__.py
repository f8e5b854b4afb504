"""The training layer: one fine-tune per grid cell."""

from memlens.train.finetune import (
    finetune_cell,
    merge_audit_canaries,
    read_members,
    read_train_info,
    tokenize_records,
)

__all__ = ["finetune_cell", "merge_audit_canaries", "read_members", "read_train_info", "tokenize_records"]
