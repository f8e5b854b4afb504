"""The training layer: one fine-tune per grid cell."""

from memlens.train.finetune import finetune_cell, read_members, read_train_info, tokenize_records

__all__ = ["finetune_cell", "read_members", "read_train_info", "tokenize_records"]
