"""Architecture-independent names for the matrices LoRA adapts.

`q, k, v, o, gate, up, down` are mapped to each architecture's module names. Fused projections
(GPT-2 `c_attn`, GPT-NeoX `query_key_value`, Phi-3 `qkv_proj`/`gate_up_proj`) hold several matrices in
one layer. PEFT can only adapt a whole module, so adapting "q alone" on GPT-2 would also change k and v.
We therefore give each slice of a fused layer its own child module (:class:`FusedSplit`): the fused
matmul still computes the base output exactly, and each child is a zero-output ``nn.Linear`` stand-in
that PEFT wraps like any linear layer, so its LoRA update lands only on that slice of the fused output.
Adapters, multi-adapter switching and ``disable_adapter()`` then all work through PEFT unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from memlens.config import MATRIX_NAMES, ConfigError

# Separate projections: abstract name -> module-name suffixes (matched on a `.`-boundary).
_SEPARATE: dict[str, tuple[str, ...]] = {
    "q": ("q_proj",),
    "k": ("k_proj",),
    "v": ("v_proj",),
    "o": ("o_proj", "out_proj", "attention.dense", "attn.c_proj", "self_attn.dense"),
    "gate": ("gate_proj",),
    "up": ("up_proj", "fc1", "mlp.c_fc", "mlp.dense_h_to_4h"),
    "down": ("down_proj", "fc2", "mlp.c_proj", "mlp.dense_4h_to_h"),
}


@dataclass(frozen=True)
class FusedLayout:
    """How the output features of a fused module are divided among matrices."""

    suffix: str
    parts: tuple[str, ...]
    model_types: tuple[str, ...] | None  # None: any model type

    def indices(self, module: nn.Module, config) -> dict[str, torch.Tensor]:
        out_features = _out_features(module)
        if self.suffix == "query_key_value":  # GPT-NeoX: per head [q | k | v], heads concatenated
            heads = config.num_attention_heads
            head_dim = out_features // (3 * heads)
            base = torch.arange(heads).unsqueeze(1) * 3 * head_dim
            return {p: (base + i * head_dim + torch.arange(head_dim)).reshape(-1) for i, p in enumerate(self.parts)}
        if self.suffix == "qkv_proj":  # Phi-3: [q (heads) | k (kv heads) | v (kv heads)]
            head_dim = config.hidden_size // config.num_attention_heads
            q = config.num_attention_heads * head_dim
            kv = (out_features - q) // 2
            bounds = [0, q, q + kv, q + 2 * kv]
        else:  # equal contiguous blocks (GPT-2 c_attn, gate_up_proj)
            step = out_features // len(self.parts)
            bounds = [i * step for i in range(len(self.parts) + 1)]
        return {p: torch.arange(bounds[i], bounds[i + 1]) for i, p in enumerate(self.parts)}


_FUSED: tuple[FusedLayout, ...] = (
    FusedLayout("attn.c_attn", ("q", "k", "v"), ("gpt2",)),
    FusedLayout("query_key_value", ("q", "k", "v"), ("gpt_neox",)),
    FusedLayout("qkv_proj", ("q", "k", "v"), ("phi3",)),
    FusedLayout("gate_up_proj", ("gate", "up"), ("phi3",)),
)


def _out_features(module: nn.Module) -> int:
    return module.nf if isinstance(module, Conv1D) else module.out_features


def _in_features(module: nn.Module) -> int:
    return module.weight.shape[0] if isinstance(module, Conv1D) else module.in_features


def _matches(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def _is_leaf_projection(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D)) or type(module).__name__.startswith("Linear8bit")


class _SliceStandIn(nn.Linear):
    """A slice of a fused projection as PEFT sees it: a linear layer of the slice's shape whose own output
    is zero (the fused matmul already computed it); PEFT's LoRA wrapper adds the update on top."""

    def __init__(self, in_features: int, out_features: int, like: torch.Tensor):
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        # A stride-0 placeholder: right shape, dtype and device for PEFT, no memory. Merging an adapter
        # into it fails loudly (in-place add on overlapping memory) instead of silently doing nothing.
        self.weight = nn.Parameter(like.new_zeros(()).expand(out_features, in_features), requires_grad=False)
        self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


class FusedSplit(nn.Module):
    """Wraps a fused projection and exposes each slice (`q`, `k`, `v`...) as its own child module."""

    def __init__(self, fused: nn.Module, indices: dict[str, torch.Tensor]):
        super().__init__()
        self.fused = fused
        self.parts = tuple(indices)
        weight = fused.weight
        for part, idx in indices.items():
            self.add_module(part, _SliceStandIn(_in_features(fused), len(idx), weight))
            self.register_buffer(f"_idx_{part}", idx.to(weight.device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fused(x)
        for part in self.parts:
            child = getattr(self, part)
            if isinstance(child, _SliceStandIn):  # not adapted: contributes exactly nothing
                continue
            out = out.index_add(-1, getattr(self, f"_idx_{part}"), child(x).to(out.dtype))
        return out


@dataclass
class TargetPlan:
    """Module names to adapt, and the fused modules that must be split first."""

    module_names: list[str]
    fused_suffixes: list[str] = field(default_factory=list)
    per_name: dict[str, list[str]] = field(default_factory=dict)  # requested name -> modules


def _layouts_for(model: nn.Module) -> list[FusedLayout]:
    model_type = getattr(model.config, "model_type", "")
    names = [n for n, _ in model.named_modules()]
    return [
        lay for lay in _FUSED
        if (lay.model_types is None or model_type in lay.model_types) and any(_matches(n, lay.suffix) for n in names)
    ]


def available_matrices(model: nn.Module) -> dict[str, list[str]]:
    """Abstract name -> module names (fused slices as `<fused>.<part>`) for this model."""
    found: dict[str, list[str]] = {}
    modules = dict(model.named_modules())
    for name, module in modules.items():
        if isinstance(module, FusedSplit):
            for part in module.parts:
                found.setdefault(part, []).append(f"{name}.{part}")
            continue
        if not _is_leaf_projection(module) or ".fused" in name:
            continue
        for abstract, suffixes in _SEPARATE.items():
            if any(_matches(name, s) for s in suffixes):
                found.setdefault(abstract, []).append(name)
    for layout in _layouts_for(model):
        for name, module in modules.items():
            if _matches(name, layout.suffix) and not isinstance(module, FusedSplit) and ".fused" not in name:
                for part in layout.parts:
                    found.setdefault(part, []).append(f"{name}.{part}")
    return {k: sorted(v, key=_natural) for k, v in found.items() if k in MATRIX_NAMES}


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _raw_names(model: nn.Module) -> list[str]:
    leaves = {
        n.rsplit(".", 1)[-1] for n, m in model.named_modules()
        if _is_leaf_projection(m) and not isinstance(m, _SliceStandIn)
        and not any(tag in n for tag in (".fused", "base_layer", "lora_"))
    }
    return sorted(leaves - {"lm_head"})


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, not counting the zero-memory stand-ins of fused slices."""
    trainable = total = 0
    standins = {id(m.weight) for m in model.modules() if isinstance(m, _SliceStandIn)}
    seen: set[int] = set()
    for param in model.parameters():
        if id(param) in standins or id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return trainable, total


def plan_targets(model: nn.Module, names: list[str]) -> TargetPlan:
    """Resolve abstract (`q`...) or raw (`c_attn`) names to module names; error naming what exists."""
    matrices = available_matrices(model)
    layouts = _layouts_for(model)
    plan = TargetPlan(module_names=[])
    for requested in names:
        if requested in MATRIX_NAMES:
            modules = matrices.get(requested)
            if not modules:
                raise ConfigError(
                    f"grid.target_modules: {type(model).__name__} ({model.config.model_type}) has no {requested!r} "
                    f"matrix; it has: {[m for m in MATRIX_NAMES if m in matrices]} "
                    f"(raw module names: {_raw_names(model)})"
                )
            for layout in layouts:
                if requested in layout.parts and any(m.endswith(f"{layout.suffix}.{requested}") for m in modules):
                    if layout.suffix not in plan.fused_suffixes:
                        plan.fused_suffixes.append(layout.suffix)
        else:
            modules = [n for n, m in model.named_modules()
                       if _matches(n, requested) and (_is_leaf_projection(m) or isinstance(m, FusedSplit))]
            modules = [n + ".fused" if isinstance(model.get_submodule(n), FusedSplit) else n for n in modules]
            if not modules:
                raise ConfigError(
                    f"grid.target_modules: {requested!r} is neither a matrix name {list(MATRIX_NAMES)} nor a "
                    f"linear module of {type(model).__name__}; it has: {[m for m in MATRIX_NAMES if m in matrices]} "
                    f"(raw module names: {_raw_names(model)})"
                )
        plan.per_name[requested] = modules
        plan.module_names.extend(m for m in modules if m not in plan.module_names)
    return plan


def split_fused_modules(model: nn.Module, suffixes: list[str]) -> int:
    """Replace each fused module matching `suffixes` by a :class:`FusedSplit` (idempotent).
    Returns how many modules were split."""
    layouts = {lay.suffix: lay for lay in _layouts_for(model)}
    count = 0
    for suffix in suffixes:
        if suffix not in layouts:
            raise ConfigError(f"cannot split {suffix!r}: {type(model).__name__} has no fused module of that kind")
        layout = layouts[suffix]
        for name, module in list(model.named_modules()):
            if _matches(name, suffix) and not isinstance(module, FusedSplit) and _is_leaf_projection(module):
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, child, FusedSplit(module, layout.indices(module, model.config)))
                count += 1
    return count
