"""Several LoRA adapters of one PEFT model in one forward pass, each applied to its own tokens.

Multi-adapter training (mLoRA, LoRAFusion; the batched-adapter inference of Punica / S-LoRA): the micro-batches
of N adapters are laid end to end along one token axis, the frozen weights run once over all of them, and each
LoRA layer adds adapter a's low-rank update only to adapter a's tokens. Records never mix (packed rows and
variable-length attention keep every record to itself), so adapter a's loss and gradients are those of a pass
over its micro-batch alone, to float rounding.

PEFT keeps the adapters (``lora_A[name]``, ``lora_B[name]``, the scaling and the dropout of each, their
initialisation and their saved files); :func:`stacked_adapters` only replaces the forward of every LoRA layer for
the duration of a block. Each adapter's update runs through its own two matrices on its own rows (grouped: no
rank or token padding; `benchmarks/multi_adapter_throughput.py` measures the padded alternative). PEFT's
``adapter_names`` mixed-batch forward does the same for inference only, and not in training mode.

Dropout: adapter a's dropout mask is drawn for a tensor of its own micro-batch's shape, from its own random
stream (:attr:`AdapterSpan.rng`, entered around the draw), as the same dropout module would draw it in a pass
over that micro-batch alone. Under activation checkpointing a recomputed layer gets the mask of its first
pass (the stream state before each draw is remembered for the pass).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ContextManager, Protocol

import torch

from memlens.models.loading import quiet_bitsandbytes_import

with quiet_bitsandbytes_import():
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.lora.layer import LoraLayer


class DropoutStream(Protocol):
    """An adapter's own random stream, as its dropout masks draw from it."""

    def torch_active(self) -> ContextManager:
        """Make the stream the process's torch generators for the block (the draw advances it)."""

    def torch_replay(self, state: object) -> ContextManager:
        """Make `state` the process's torch generators for the block (the stream does not advance)."""

    def snapshot(self) -> object:
        """Within `torch_active`: the live state (to replay the next draw)."""


@dataclass
class AdapterSpan:
    """Adapter `name` owns tokens `start .. start + tokens` of the stacked batch (flattened over its leading axes)."""

    name: str
    start: int
    tokens: int
    rng: DropoutStream | None = None  # the adapter's random stream (dropout); None: the process's

    @property
    def stop(self) -> int:
        return self.start + self.tokens


@dataclass
class StackPlan:
    """The spans of the current pass; set before each forward (the patched layers read it)."""

    spans: list[AdapterSpan] = field(default_factory=list)
    # (layer id, adapter) -> stream state before the layer's dropout draw, for recomputation (checkpointing)
    replay: dict[tuple[int, str], object] = field(default_factory=dict)

    def start_pass(self, spans: list[AdapterSpan]) -> None:
        """The spans of the next forward: end to end from token 0, in order."""
        if [s.start for s in spans] != [sum(s.tokens for s in spans[:i]) for i in range(len(spans))]:
            raise ValueError("stacked LoRA: the spans must lie end to end from token 0, in order")
        self.spans = spans
        self.replay = {}

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.spans)


def lora_layers(model: torch.nn.Module) -> list[LoraLayer]:
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def unsupported_layers(model: torch.nn.Module) -> list[str]:
    """LoRA layers this module cannot stack (other layer types, LoRA variants such as DoRA); empty when all can."""
    bad = []
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if not (isinstance(module, LoraLinear) or type(module).__name__ == "Linear8bitLt") or module.lora_variant:
            bad.append(f"{name} ({type(module).__name__})")
    return bad


def _dropped(module: LoraLayer, span: AdapterSpan, x: torch.Tensor, plan: StackPlan) -> torch.Tensor:
    """`x` (the span's tokens) through the adapter's dropout, drawn from the adapter's own stream."""
    dropout = module.lora_dropout[span.name]
    if isinstance(dropout, torch.nn.Identity) or not dropout.training or span.rng is None:
        return dropout(x)
    key = (id(module), span.name)
    if key in plan.replay:  # a recomputed layer (activation checkpointing): the first pass's mask again
        with span.rng.torch_replay(plan.replay[key]):
            return dropout(x)
    with span.rng.torch_active():
        plan.replay[key] = span.rng.snapshot()
        return dropout(x)


def _stacked_forward(module: LoraLayer, plan: StackPlan, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT's LoRA forward (`peft.tuners.lora.layer.Linear.forward`, and its 8-bit twin) with each adapter's
    update applied to its own span of tokens. x: (..., in) whose leading axes flatten to the stacked tokens."""
    result = module.base_layer(x, *args, **kwargs)
    result_dtype = result.dtype
    eight_bit = not isinstance(module, LoraLinear)
    convert = not eight_bit or not torch.is_autocast_enabled()
    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] != plan.tokens:
        raise RuntimeError(f"stacked LoRA: the spans cover {plan.tokens} tokens, the batch has {flat.shape[0]}")
    updates = []
    # split, not a slice per span: the backward of one split is one concatenation, that of a slice a zero-filled
    # tensor of the whole batch per span
    for span, xa in zip(plan.spans, torch.split(flat, [span.tokens for span in plan.spans])):
        lora_A, lora_B = module.lora_A[span.name], module.lora_B[span.name]
        if convert:
            xa = module._cast_input_dtype(xa, lora_A.weight.dtype)
        update = lora_B(lora_A(_dropped(module, span, xa, plan))) * module.scaling[span.name]
        updates.append(update.to(result_dtype) if eight_bit and convert else update)
    stacked = torch.cat(updates) if len(updates) > 1 else updates[0]
    result = result + stacked.reshape(*result.shape[:-1], -1)
    return result if eight_bit else result.to(result_dtype)


@contextlib.contextmanager
def stacked_adapters(model: torch.nn.Module) -> Iterator[StackPlan]:
    """Within the block every LoRA layer of `model` applies adapter a's update to the tokens of a's span of the
    yielded plan (set its spans with :meth:`StackPlan.start_pass` before each forward)."""
    bad = unsupported_layers(model)
    if bad:
        raise ValueError(f"stacked LoRA supports plain LoRA on linear layers; not {bad[:3]}")
    plan = StackPlan()
    layers = lora_layers(model)
    for layer in layers:
        layer.forward = lambda x, *a, _layer=layer, **k: _stacked_forward(_layer, plan, x, *a, **k)
    try:
        yield plan
    finally:
        for layer in layers:
            del layer.forward  # the class's forward again


__all__ = ["AdapterSpan", "DropoutStream", "StackPlan", "lora_layers", "stacked_adapters", "unsupported_layers"]
