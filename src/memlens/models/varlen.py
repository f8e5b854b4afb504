"""Variable-length attention for packed rows: each record attends only to itself, at the cost of its own length.

A packed row holds several records side by side; position ids restart at 0 on each record. Transformers'
SDPA/eager path isolates them with a block-diagonal mask over the whole row, which pays row x row attention
(dense, and on CPU the masked kernel is the slow one). The varlen path here instead gathers each record's
queries, keys and values into a batch of its own length (records of similar length share one
`scaled_dot_product_attention` call with `is_causal=True`, which takes the fast flash kernel on CPU and GPU)
and scatters the result back. Nothing crosses a record boundary by construction.

Written by hand because transformers' varlen path needs the flash-attn package (CUDA only) and PyTorch's
nested-tensor SDPA has no CPU kernel for causal jagged batches. Registered with transformers'
AttentionInterface under `memlens_varlen`; since that name has no mask function, transformers builds no
mask at all for it, and segments come from the `position_ids` every supported architecture forwards.

Use it only through `varlen_attention(model)`, which switches the model for the duration of packed training
or scoring: it ignores attention masks (there is none in packed rows) and has no KV cache.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

NAME = "memlens_varlen"

# Architectures whose attention layers receive `position_ids` in the attention-function kwargs and use plain
# causal attention (no sliding window, soft-capping or ALiBi bias): tests/test_packing.py checks each against
# records run one at a time. Others train packed through the block-diagonal mask instead.
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "gpt2"})

# Records whose lengths are within this factor share one attention call (padded to the longest of them).
_GROUP_LENGTH_RATIO = 1.25


@dataclass
class _Group:
    index: torch.Tensor  # (n_records, width) flat token index of each record's tokens (clamped past its end)
    valid: torch.Tensor  # (n_records, width) True on real tokens
    targets: torch.Tensor  # flat token index of every valid entry, in `index[valid]` order


@dataclass
class _Plan:
    position_ids: torch.Tensor  # kept alive so that the identity check below cannot see a recycled tensor
    groups: list[_Group]
    index: torch.Tensor  # every group's `index`, flattened end to end: one gather for all groups
    targets: torch.Tensor  # every group's `targets`, end to end: one scatter back


_last_plan: _Plan | None = None


def segment_lengths(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """(flat start, length) of every record in a batch of packed rows: a record starts at each row start and
    wherever the position does not continue the previous one (it restarts)."""
    pos = position_ids.reshape(position_ids.shape[0], -1)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    flat_starts = torch.nonzero(starts.reshape(-1)).squeeze(-1).tolist()
    ends = flat_starts[1:] + [pos.numel()]
    return [(s, e - s) for s, e in zip(flat_starts, ends)]


def _plan(position_ids: torch.Tensor, batch: int) -> _Plan:
    """Group the records by length; computed once per forward pass (every layer gets the same tensor)."""
    global _last_plan
    if _last_plan is not None and _last_plan.position_ids is position_ids:
        return _last_plan
    pos = position_ids.expand(batch, -1) if position_ids.shape[0] != batch else position_ids
    segments = sorted(segment_lengths(pos), key=lambda s: s[1])
    groups, i = [], 0
    device = position_ids.device
    while i < len(segments):
        j = i + 1
        while j < len(segments) and segments[j][1] <= _GROUP_LENGTH_RATIO * segments[i][1]:
            j += 1
        chunk = segments[i:j]
        width = chunk[-1][1]
        starts = torch.tensor([s for s, _ in chunk], device=device)
        lengths = torch.tensor([n for _, n in chunk], device=device)
        offsets = torch.arange(width, device=device)
        valid = offsets[None, :] < lengths[:, None]
        # Past a record's end the index repeats its last token: those rows are computed and thrown away, and
        # no real query ever sees them (causal attention only looks back).
        index = starts[:, None] + torch.minimum(offsets[None, :], lengths[:, None] - 1)
        groups.append(_Group(index=index, valid=valid, targets=index[valid]))
        i = j
    _last_plan = _Plan(position_ids=position_ids, groups=groups, index=torch.cat([g.index.reshape(-1) for g in groups]),
                       targets=torch.cat([g.targets for g in groups]))
    return _last_plan


def varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """Attention over packed rows (query/key/value: batch x heads x tokens x head_dim), per record."""
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        raise RuntimeError(f"{NAME} attention needs position_ids (packed rows); {type(module).__name__} did not "
                           "pass them: use the block-diagonal SDPA path for this architecture")
    if kwargs.get("sliding_window") or kwargs.get("softcap"):
        raise RuntimeError(f"{NAME} attention supports plain causal attention only (got sliding window/softcap)")
    batch, heads, tokens, head_dim = query.shape
    kv_heads = key.shape[1]
    plan = _plan(position_ids, batch)
    # Token-major layout (flat tokens x heads x head_dim) so that a record is a run of rows.
    q = query.transpose(1, 2).reshape(batch * tokens, heads, head_dim)
    k = key.transpose(1, 2).reshape(batch * tokens, kv_heads, head_dim)
    v = value.transpose(1, 2).reshape(batch * tokens, kv_heads, head_dim)
    # One gather for every group and one scatter back: a gather or scatter per group would cost, in the backward, a
    # zero-filled gradient of the whole batch per group (many groups when many records of many lengths are packed).
    sizes = [g.index.numel() for g in plan.groups]
    gathered = [t[plan.index].split(sizes) for t in (q, k, v)]
    outs = []
    for group, qs, ks, vs in zip(plan.groups, *gathered):
        # (records, heads, width, head_dim)
        qg, kg, vg = (t.view(*group.index.shape, *t.shape[1:]).transpose(1, 2) for t in (qs, ks, vs))
        og = F.scaled_dot_product_attention(qg, kg, vg, dropout_p=dropout, scale=scaling, is_causal=True,
                                            enable_gqa=kv_heads != heads)
        outs.append(og.transpose(1, 2)[group.valid])
    out = q.new_empty(batch * tokens, heads, value.shape[-1]).index_copy(0, plan.targets, torch.cat(outs))
    return out.reshape(batch, tokens, heads, -1), None


def register() -> None:
    """Make `memlens_varlen` a valid transformers attention implementation (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, varlen_attention_forward)


def supports_varlen(model: torch.nn.Module) -> bool:
    """True when `model` (or the model a PEFT wrapper holds) can use the varlen path."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    return getattr(config, "model_type", None) in SUPPORTED_MODEL_TYPES and hasattr(base, "set_attn_implementation") \
        and not getattr(config, "sliding_window", None) and not getattr(config, "use_sliding_window", False)


@contextmanager
def varlen_attention(model: torch.nn.Module):
    """Within the block, `model` attends per record of packed rows (see the module docstring). A model
    that cannot (`supports_varlen` false) is left as it is: its SDPA/eager path isolates records through
    transformers' block-diagonal mask, correct but slower."""
    global _last_plan
    if not supports_varlen(model):
        yield False
        return
    register()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    previous = base.config._attn_implementation
    base.set_attn_implementation(NAME)
    try:
        yield True
    finally:
        base.set_attn_implementation(previous)
        _last_plan = None
