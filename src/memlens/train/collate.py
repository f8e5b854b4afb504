"""Batch collation for causal-LM fine-tuning: padded batches, or packed rows with per-record isolation.

Packing puts several records side by side in one row so no compute is spent on padding. Isolation
is what keeps packing from changing what the model learns:

- position ids restart at 0 for every record, and no 2-D attention mask is passed, so transformers'
  masking utilities (``masking_utils.find_packed_sequence_indices``, transformers >= 4.53) detect the
  packed format from the position ids and build a block-diagonal causal mask for eager and SDPA, and
  flash-attention takes its variable-length path. ``use_cache=False`` because a cache disables that
  detection. (tests/test_packing.py checks per-record losses and gradients against records run alone.)
- the first token of each record gets label -100, so it is never predicted from the previous record:
  the predicted tokens are exactly those of a padded batch, and the mean loss over them is the same.
"""

from __future__ import annotations

import torch


class CausalLMCollator:
    """Right-pads records to the longest in the batch; padding is masked out of attention and loss."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), longest), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(features), longest), dtype=torch.long)
        for row, f in enumerate(features):
            ids = torch.as_tensor(f["input_ids"], dtype=torch.long)
            input_ids[row, : len(ids)] = ids
            attention[row, : len(ids)] = 1
        labels = input_ids.masked_fill(attention == 0, -100)
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def pack_rows(lengths: list[int], pack_tokens: int) -> list[list[int]]:
    """Assign records (by index) to rows of at most `pack_tokens` tokens: as few rows as the total needs,
    balanced (each record, longest first, goes to the least-filled row it fits in), because rows are
    padded to the longest one. A record longer than `pack_tokens` gets a row of its own."""
    n_rows = max(1, -(-sum(min(n, pack_tokens) for n in lengths) // pack_tokens))
    rows: list[list[int]] = [[] for _ in range(n_rows)]
    filled = [0] * n_rows
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        fits = [r for r in range(len(rows)) if filled[r] + lengths[index] <= pack_tokens or not rows[r]]
        if fits:
            r = min(fits, key=lambda r: filled[r])
        else:
            rows.append([])
            filled.append(0)
            r = len(rows) - 1
        rows[r].append(index)
        filled[r] += lengths[index]
    return [row for row in rows if row]


class PackedCollator:
    """Packs a batch's records into rows of <= `pack_tokens` tokens where each record sees only itself.

    Returns `input_ids`, `position_ids` (restarting per record), `labels` (-100 on each record's first
    token and on row padding) and `use_cache=False`; no `attention_mask` (see the module docstring).
    Rows shorter than the longest are padded with a run of pad tokens whose positions also restart, so
    the padding is a segment of its own that no record attends to.
    """

    def __init__(self, pad_token_id: int, pack_tokens: int):
        self.pad_token_id = pad_token_id
        self.pack_tokens = pack_tokens

    def __call__(self, features: list[dict]) -> dict:
        records = [list(f["input_ids"]) for f in features]
        rows = pack_rows([len(r) for r in records], self.pack_tokens)
        width = max(sum(len(records[i]) for i in row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for r, row in enumerate(rows):
            start = 0
            for index in row:
                ids = torch.as_tensor(records[index], dtype=torch.long)
                end = start + len(ids)
                input_ids[r, start:end] = ids
                position_ids[r, start:end] = torch.arange(len(ids))
                labels[r, start + 1:end] = ids[1:]  # first token: never predicted across the boundary
                start = end
            position_ids[r, start:] = torch.arange(width - start)
        return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels, "use_cache": False}
