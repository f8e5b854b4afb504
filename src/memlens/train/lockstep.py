"""Train the adapters of a group in lockstep: each keeps its own HF Trainer, all share one forward and backward.

Every adapter of a group keeps the whole Trainer of a one-at-a-time run: its dataloader (seeded sampler, its
collation), its number of steps, its AdamW and learning-rate schedule, the loss normalised by the token count of
its accumulation window, gradient clipping of its own gradients, its logging and its callbacks. Only the forward
and the backward are shared. Each Trainer runs `train()` on a thread of its own; its `training_step` hands its
micro-batch to :class:`Lockstep` and waits; when every adapter still training has handed one in, the caller's
thread runs one stacked pass (:mod:`memlens.models.stacked_lora`: the micro-batches end to end on one token axis,
the frozen weights once, each adapter's update on its own tokens), sums the adapters' losses, runs one backward,
and every thread goes on with its own optimizer step. An adapter with fewer steps leaves the group when
its Trainer ends; the others go on without it.

The threads take turns: whichever thread runs holds one lock (the baton) and lets go of it only while waiting
(for a pass, or for micro-batches), so two Trainers never run at once (no contention for the cores, no race on the
Trainer's or accelerate's shared state) and the order of work is that of a loop over the adapters. Written by hand
because the Trainer's loop is one method (`_inner_training_loop`) with no hook between the backward and the optimizer
step; driving N copies of it step by step would mean copying it, threads let each copy run unchanged.

Random streams: `set_seed(seed)` in a Trainer's constructor gives its adapter its stream (:class:`RandomStream`).
Whenever a thread holds the baton its adapter's stream is the process's, so what the Trainer draws (the
DataLoader draws a seed per epoch) comes from the adapter's stream; inside a stacked pass each LoRA dropout mask is
drawn from its adapter's stream, for a tensor of its micro-batch's shape. Without other dropout in the model
(Llama, Mistral, Qwen2) an adapter trained in a group is the adapter trained alone, to float rounding, dropout
included. A base model's own dropout (GPT-2's, 0.1) draws from a stream of the group: such adapters are trained
comparably, not identically.
"""

from __future__ import annotations

import contextlib
import random
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from memlens.models.loading import quiet_bitsandbytes_import
from memlens.models.stacked_lora import AdapterSpan, StackPlan

with quiet_bitsandbytes_import():
    from transformers import Trainer

IGNORE = -100


# ------------------------------------------------------------------------------------- random streams
def _torch_state() -> tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_torch_state(state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


class RandomStream:
    """A random state of its own (what `transformers.set_seed` seeds: torch CPU and CUDA, Python, NumPy), made the
    process's while entered. Created right after the seeding, it starts where a run alone would start."""

    def __init__(self):
        self.state = (_torch_state(), random.getstate(), np.random.get_state())
        self._outer: tuple | None = None

    def enter(self) -> None:
        self._outer = (_torch_state(), random.getstate(), np.random.get_state())
        self._set(self.state)

    def leave(self) -> None:
        self.state = (_torch_state(), random.getstate(), np.random.get_state())
        self._set(self._outer)

    @staticmethod
    def _set(state: tuple) -> None:
        _set_torch_state(state[0])
        random.setstate(state[1])
        np.random.set_state(state[2])

    @contextlib.contextmanager
    def active(self) -> Iterator[RandomStream]:
        self.enter()
        try:
            yield self
        finally:
            self.leave()

    @contextlib.contextmanager
    def torch_active(self) -> Iterator[RandomStream]:
        """The stream's torch generators only (what a dropout mask draws from), for the duration of a draw."""
        outer = _torch_state()
        _set_torch_state(self.state[0])
        try:
            yield self
        finally:
            self.state = (_torch_state(), *self.state[1:])
            _set_torch_state(outer)

    @contextlib.contextmanager
    def torch_replay(self, state: tuple) -> Iterator[None]:
        """`state` as the process's torch generators for the block; the stream does not advance (a recomputed
        layer draws its first pass's mask again)."""
        outer = _torch_state()
        _set_torch_state(state)
        try:
            yield
        finally:
            _set_torch_state(outer)

    def snapshot(self) -> tuple:
        """Within torch_active: the live torch state."""
        return _torch_state()


# ------------------------------------------------------------------------------------- stacking
def _row_positions(batch: dict) -> torch.Tensor:
    """(rows, width) position ids of a micro-batch: a packed one's own; a right-padded one's rows numbered from 0,
    each row one segment (its trailing padding comes after its tokens, which causal attention never sees)."""
    if "position_ids" in batch:
        return batch["position_ids"]
    input_ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    if mask is not None:
        lengths = mask.sum(dim=1, keepdim=True)
        if not torch.equal(mask.bool(), torch.arange(mask.shape[1], device=mask.device)[None, :] < lengths):
            raise ValueError("stacked training needs right-padded micro-batches (ones, then zeros, in every row)")
    return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)


def stack_micro_batches(batches: Sequence[dict]) -> tuple[dict, list[int], list[torch.Tensor]]:
    """The micro-batches end to end as one row of segments for variable-length attention: the model's inputs,
    each micro-batch's token count, and each micro-batch's labels shifted within its own rows (what its logits
    predict; -100 where nothing is)."""
    ids, positions, shifted, sizes = [], [], [], []
    for batch in batches:
        input_ids, labels = batch["input_ids"], batch["labels"]
        ids.append(input_ids.reshape(-1))
        positions.append(_row_positions(batch).reshape(-1))
        shifted.append(F.pad(labels, (0, 1), value=IGNORE)[:, 1:].reshape(1, -1))
        sizes.append(input_ids.numel())
    inputs = {"input_ids": torch.cat(ids)[None], "position_ids": torch.cat(positions)[None], "use_cache": False}
    return inputs, sizes, shifted


# ------------------------------------------------------------------------------------- the lockstep
class GroupFailed(RuntimeError):
    """Another adapter of the group failed; this one stopped with it."""


@dataclass
class _Request:
    trainer: Trainer
    inputs: dict
    num_items: torch.Tensor | int | None


class AdapterTrainer(Trainer):
    """The Trainer of one adapter of a group; its `model` holds that adapter's parameters only (its optimizer,
    clipping and `zero_grad` see nothing else) and its training_step is the group's stacked pass."""

    def __init__(self, *args, lockstep: Lockstep, adapter: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.lockstep, self.adapter = lockstep, adapter

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        return self.lockstep.step(self.adapter, self, self._prepare_inputs(inputs), num_items_in_batch)


class Lockstep:
    """Runs the Trainers of a group's adapters (see the module docstring).

    `model`: the PEFT model holding every adapter (its LoRA layers patched by `stacked_adapters`, whose `plan` is
    given); `streams`: each adapter's random stream; `on_done(adapter)`: called on the adapter's thread when its
    Trainer has finished (saving its files), while the others may still train; `group_seed`: the seed of the stream
    the base model's own dropout draws from in a stacked pass."""

    def __init__(self, model: torch.nn.Module, plan: StackPlan, streams: dict[str, RandomStream],
                 on_done: Callable[[str], None], group_seed: int = 0):
        self.model, self.plan, self.streams, self.on_done = model, plan, streams, on_done
        self.trainers: dict[str, AdapterTrainer] = {}
        self._group_stream = _seeded_stream(group_seed)
        self._cv = threading.Condition()
        self._active: set[str] = set()
        self._requests: dict[str, _Request] = {}
        self._losses: dict[str, torch.Tensor] = {}
        self._errors: list[tuple[str, BaseException]] = []

    # --------------------------------------------------------------------------- called on the adapters' threads
    def step(self, adapter: str, trainer: AdapterTrainer, inputs: dict, num_items) -> torch.Tensor:
        """Hand in the adapter's micro-batch and wait for the pass that computes its loss (returned, detached,
        as Trainer.training_step returns it); its gradients are then in its parameters' `.grad`."""
        # accelerate's GradientState is one per process: every Trainer sets its sync flag before a step and its
        # optimizer reads it after; the other Trainers run in between.
        sync = trainer.accelerator.gradient_state.sync_gradients
        self._requests[adapter] = _Request(trainer, inputs, num_items)
        self.streams[adapter].leave()
        try:
            self._cv.notify_all()  # the pass may be ready
            while adapter not in self._losses:
                if self._errors:
                    raise GroupFailed(f"adapter {adapter} stopped: {self._errors[0][0]} failed")
                self._cv.wait()
        finally:
            self.streams[adapter].enter()
            trainer.accelerator.gradient_state._set_sync_gradients(sync)
        return self._losses.pop(adapter)

    def _worker(self, adapter: str) -> None:
        with self._cv:
            stream = self.streams[adapter]
            stream.enter()
            try:
                self.trainers[adapter].train()
                self.on_done(adapter)
            except BaseException as exc:  # recorded; run() raises the first
                self._errors.append((adapter, exc))
            finally:
                stream.leave()
                self._active.discard(adapter)
                self._cv.notify_all()

    # --------------------------------------------------------------------------- on the caller's thread
    def _ready(self) -> bool:
        """Every adapter still training has handed in a micro-batch (or an adapter failed, or all are done)."""
        return bool(self._errors) or not self._active or bool(self._requests) and self._active <= set(self._requests)

    def _serve(self) -> None:
        """Run the passes, on this thread, until every adapter is done. The passes' large tensors are allocated by one
        thread only: glibc keeps an arena per thread, and passes run by whichever adapter thread came last
        grew every thread's arena and page-faulted fresh memory at each pass (8 llama-small adapters: RSS from 1.9
        to 10.7 GB in 12 passes, each pass 1.5-3x slower)."""
        while True:
            while not self._ready():
                self._cv.wait(0.5)
            if self._errors or not self._active:
                return
            requests = [(name, self._requests.pop(name)) for name in self.trainers if name in self._requests]
            self._losses.update(self._stacked_pass(requests))
            self._cv.notify_all()

    def _stacked_pass(self, requests: list[tuple[str, _Request]]) -> dict[str, torch.Tensor]:
        """One forward over every request's micro-batch, each adapter's loss as its Trainer computes it
        (compute_loss, training_step), one backward of their sum (accelerate's backward of each, loss scaling
        included); returns each adapter's detached loss."""
        inputs, sizes, shifted = stack_micro_batches([r.inputs for _, r in requests])
        spans, start = [], 0
        for (name, _), size in zip(requests, sizes):
            spans.append(AdapterSpan(name, start, size, rng=self.streams[name]))
            start += size
        first = requests[0][1].trainer
        causal_lm = self.model.get_base_model()
        head, vocab = causal_lm.get_output_embeddings(), causal_lm.config.vocab_size
        self.model.train()
        losses, terms = {}, []
        with self._group_stream.active():
            with first.accelerator.autocast():
                self.plan.start_pass(spans)
                hidden = causal_lm.get_decoder()(**inputs).last_hidden_state
                # The causal LM's head and loss per adapter, on its own tokens: the logits of the whole stack in one
                # tensor would leave the cache (and a slice's backward zero-fills a gradient of all of them).
                for (name, request), part, labels in zip(requests, torch.split(hidden, sizes, dim=1), shifted):
                    trainer = request.trainer
                    num_items = request.num_items if trainer.model_accepts_loss_kwargs else None
                    loss = causal_lm.loss_function(logits=head(part), labels=None, shift_labels=labels,
                                                   vocab_size=vocab, num_items_in_batch=num_items)
                    if not _scaled_for_accumulation(trainer, num_items):
                        loss = loss / trainer.current_gradient_accumulation_steps
                    losses[name] = loss.detach()
                    accelerator = trainer.accelerator
                    term = loss / accelerator.gradient_accumulation_steps
                    terms.append(accelerator.scaler.scale(term) if accelerator.scaler is not None else term)
            del hidden
            torch.stack(terms).sum().backward()
        return losses

    def run(self, trainers: dict[str, AdapterTrainer]) -> None:
        """Train every adapter (each Trainer's `train()` on a thread of its own, the passes on this one); raises the
        first failure once every thread has stopped."""
        self.trainers = dict(trainers)
        self._active = set(trainers)
        outer = RandomStream()
        threads = [threading.Thread(target=self._worker, args=(name,), name=f"memlens-adapter-{i}", daemon=True)
                   for i, name in enumerate(trainers)]
        try:
            with self._cv:
                for thread in threads:
                    thread.start()
                try:
                    self._serve()
                except BaseException as exc:  # a failed pass, or Ctrl-C: the adapters stop at their next step
                    self._errors.append(("the stacked pass", exc))
                    self._cv.notify_all()
                    raise
        finally:
            for thread in threads:
                thread.join()
            RandomStream._set(outer.state)
        causes = [e for e in self._errors if not isinstance(e[1], GroupFailed)] or self._errors
        if causes:
            raise causes[0][1]


def _scaled_for_accumulation(trainer: Trainer, num_items) -> bool:
    """Trainer.training_step's rule: is the loss already normalised over the accumulation window?"""
    if trainer.loss_is_scaled_for_ga is not None:
        return trainer.loss_is_scaled_for_ga
    return (trainer.model_accepts_loss_kwargs and num_items is not None) or trainer.compute_loss_func is not None


def _seeded_stream(seed: int) -> RandomStream:
    """A stream seeded with `seed`, created without touching the process's."""
    outer = RandomStream()
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    stream = RandomStream()
    RandomStream._set(outer.state)
    return stream


__all__ = ["AdapterTrainer", "GroupFailed", "Lockstep", "RandomStream", "stack_micro_batches"]
