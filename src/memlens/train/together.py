"""Fine-tune several LoRA cells together (`train.together: N`): one base model, one stacked pass per step.

A group is up to N cells of one study (grid cells, or a recipe's reference adapters) that share the base model and
the adapted matrices; their ranks, seeds, canary copies and records may differ. Each cell becomes one adapter of
one PEFT model, initialised from its own seed exactly as alone (`set_seed(seed)` before its adapter is added); each
keeps its own Trainer (:mod:`memlens.train.lockstep`); each is written, as soon as its Trainer ends, to its run
folder with the files, run id, checksums and records of a run trained alone (train.json adds `together`: the
group's size and the run ids trained with it). A killed group leaves the finished runs complete and no trace of
the others (atomic folders), which the next run trains again.

Cells that cannot share a pass train one at a time, and the stage says so in the log (:func:`training_groups`):
full fine-tuning (the whole model is the adapter), DP-SGD (per-sample gradients of one model), LoRA biases (the
base model's biases would be shared), and base models without variable-length attention.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from rich.progress import Progress

from memlens.config import CellConfig, StudyConfig, stable_hash
from memlens.data import StudyData
from memlens.models import (
    check_quantized,
    count_parameters,
    load_base_model,
    load_model_config,
    load_tokenizer,
    plan_targets,
    quiet_bitsandbytes_import,
    resolve_device,
    save_adapter,
    split_fused_modules,
)
from memlens.models.adapters import ADAPTER_DIR, quiet_peft_wrap
from memlens.models.stacked_lora import stacked_adapters, unsupported_layers
from memlens.models.varlen import SUPPORTED_MODEL_TYPES, supports_varlen, varlen_attention
from memlens.store import StudyLayout, atomic_dir
from memlens.train.finetune import (
    cell_training,
    finetune_cell,
    frozen_heap,
    lora_config,
    make_trainer,
    precision_flags,
    run_info,
    step_shape,
    train_summary,
    training_arguments,
    training_collator,
    use_checkpointing,
    write_run,
)
from memlens.train.lockstep import AdapterTrainer, Lockstep, RandomStream
from memlens.train.progress import RichProgressCallback, progress_or_own

with quiet_bitsandbytes_import():
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, set_seed

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------- who trains together
def _cell_reason(study: StudyConfig, cell: CellConfig) -> str | None:
    """Why `cell` trains one at a time whatever `train.together` (None: it can join a group)."""
    if cell.method != "lora":
        return "full fine-tuning"
    if cell.noise_multiplier is not None:
        return "DP-SGD (per-sample gradients of one model)"
    if study.lora.bias != "none":
        return f"lora.bias {study.lora.bias} (the base model's biases would be shared by the group)"
    if study.train.packed_attention == "block_mask":
        return "train.packed_attention block_mask (a group's pass needs variable-length attention)"
    return None


def _model_reason(study: StudyConfig) -> str | None:
    """The architectures a stacked pass is written for: decoder, then the head's logits (no softcapping or scaling),
    and variable-length attention (memlens', or flash-attn's when the model is loaded with it)."""
    config = load_model_config(study.model)
    model_type = getattr(config, "model_type", None)
    windowed = getattr(config, "sliding_window", None) or getattr(config, "use_sliding_window", False)
    if model_type not in SUPPORTED_MODEL_TYPES or windowed and not study.model.attn_implementation.startswith("flash"):
        return (f"model type {model_type!r} has no variable-length attention in memlens (supported: "
                f"{sorted(SUPPORTED_MODEL_TYPES)}, without sliding window)")
    return None


def training_groups(study: StudyConfig, cells: Sequence[CellConfig], *,
                    announce: bool = False) -> list[list[CellConfig]]:
    """`cells` in training groups: up to `train.together` cells sharing the adapted matrices, in the order of
    `cells`; a cell that cannot join one is a group of its own. `announce`: log (warning) the cells that train
    one at a time although `train.together` > 1, with why."""
    size = study.train.together
    by_matrices: dict[tuple[str, ...], list[CellConfig]] = {}
    groups: list[list[CellConfig]] = []
    alone: dict[str, list[str]] = {}
    model_reason = _model_reason(study) if size > 1 and cells else None
    for cell in cells:
        reason = (_cell_reason(study, cell) or model_reason) if size > 1 else None
        if reason is not None:
            alone.setdefault(reason, []).append(cell.run_id(study))
            groups.append([cell])
            continue
        pending = by_matrices.setdefault(tuple(cell.target_modules), [])
        if not pending:
            groups.append(pending)
        pending.append(cell)
        if len(pending) == size:
            by_matrices[tuple(cell.target_modules)] = []
    if announce:
        for reason, run_ids in alone.items():
            log.warning("train.together %d: %d run(s) train one at a time: %s: %s", size, len(run_ids), reason,
                        ", ".join(run_ids))
    return [g for g in groups if g]


# ------------------------------------------------------------------------------------- training a group
class AdapterParameters(torch.nn.Module):
    """One adapter's parameters in a PEFT model holding several, as that adapter's Trainer sees its model: its
    optimizer, gradient clipping and `zero_grad` touch nothing else. Never called: the group's pass is."""

    def __init__(self, model: torch.nn.Module, adapter: str):
        super().__init__()
        own = re.compile(rf"\.lora_[AB]\.{re.escape(adapter)}\.")
        self.weights = torch.nn.ParameterList([p for n, p in model.named_parameters() if own.search(n)])

    def forward(self, *args, **kwargs):
        raise RuntimeError("an adapter of a group is trained through the group's stacked pass")


def _loss_traits(model: torch.nn.Module, args, tokenizer) -> dict:
    """What a Trainer of `model` (the real PEFT model, as one at a time) decides about its loss: whether the model
    takes `num_items_in_batch` and whether its labels are shifted. Given to each adapter's Trainer, whose own
    model (:class:`AdapterParameters`) says nothing about the loss."""
    probe = Trainer(model=model, args=args, processing_class=tokenizer)
    return {name: getattr(probe, name) for name in
            ("model_accepts_loss_kwargs", "_loss_shifts_labels", "label_names", "can_return_loss")}


@contextmanager
def _group_attention(model: torch.nn.Module) -> Iterator[str]:
    """The attention of a stacked pass (one row of segments): flash-attn's variable-length path when the model
    was loaded with it, else memlens' varlen attention."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    implementation = str(getattr(base.config, "_attn_implementation", ""))
    if implementation.startswith("flash_attention"):
        yield implementation
        return
    if not supports_varlen(model):
        raise RuntimeError(f"train.together: model type {getattr(base.config, 'model_type', '?')!r} has no "
                           "variable-length attention; its cells train one at a time")
    with varlen_attention(model):
        yield "varlen"


def _enable_checkpointing(model: torch.nn.Module, args) -> None:
    """Activation checkpointing on the shared model, as Trainer.train() enables it on a model of its own."""
    kwargs = dict(args.activation_checkpointing_kwargs or {})
    every, offload = kwargs.pop("every_n_layers", 1), kwargs.pop("offload", False)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs or None, every_n_layers=every,
                                          offload=offload)


def finetune_group(study: StudyConfig, cells: Sequence[tuple[CellConfig, StudyData]], layout: StudyLayout,
                   tokenizer: PreTrainedTokenizerBase | None = None, *, progress: Progress | None = None,
                   base_model: PreTrainedModel | None = None) -> list[Path]:
    """Train `cells` (each with its records) in training groups (:func:`training_groups`: up to `train.together`
    cells sharing their matrices in one pass; a cell left alone through :func:`~memlens.train.finetune.finetune_cell`)
    and write each `<runs>/<run_id>/`; returns the folders, in order. Finished runs are left as they are.
    `base_model`: a loaded model to train on instead of `study.model` (modified in place: one group only)."""
    records = {cell.run_id(study): data for cell, data in cells}
    todo = [cell for cell, _ in cells if not layout.run_dir(cell.run_id(study)).is_dir()]
    groups = training_groups(study, todo)
    if base_model is not None and len(groups) > 1:
        raise ValueError(f"finetune_group: a base_model trains one group; these cells make {len(groups)}")
    tokenizer = tokenizer or (load_tokenizer(study.model) if todo else None)
    for group in groups:
        if len(group) == 1:
            finetune_cell(study, group[0], records[group[0].run_id(study)], layout, tokenizer, progress=progress,
                          base_model=base_model)
            continue
        for cell in group:
            check_quantized(study, cell)
        _Group(study, [(c, records[c.run_id(study)]) for c in group], layout, tokenizer, base_model).train(progress)
    return [layout.run_dir(cell.run_id(study)) for cell, _ in cells]


class _Group:
    """One group's model (a PEFT model with an adapter per cell), Trainers and run folders."""

    def __init__(self, study: StudyConfig, cells: list[tuple[CellConfig, StudyData]], layout: StudyLayout,
                 tokenizer: PreTrainedTokenizerBase, base_model: PreTrainedModel | None):
        self.study, self.cells, self.layout, self.tokenizer = study, cells, layout, tokenizer
        self.device = resolve_device(study.model.device)
        self.precision = precision_flags(study.train.precision, self.device)
        self.inputs = [cell_training(study, cell, data, tokenizer) for cell, data in cells]
        self.names = [f"together_{i}" for i in range(len(cells))]
        self.run_ids = [cell.run_id(study) for cell, _ in cells]
        model = base_model if base_model is not None else load_base_model(study.model, self.device)
        model.config.use_cache = False
        plan = plan_targets(model, cells[0][0].target_modules)
        self.fused = plan.fused_suffixes
        split_fused_modules(model, self.fused)
        if getattr(model, "is_loaded_in_8bit", False):
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        for i, (cell, _) in enumerate(cells):
            set_seed(cell.seed)  # as finetune_cell: the adapter's initialisation is the one it gets alone
            config = lora_config(study, cell, plan.module_names)
            with quiet_peft_wrap():
                if i == 0:
                    model = get_peft_model(model, config, adapter_name=self.names[0])
                else:
                    model.add_adapter(self.names[i], config)
        bad = unsupported_layers(model)
        if bad:
            raise RuntimeError(f"train.together: cannot stack these LoRA layers: {bad[:3]}")
        self.params = [AdapterParameters(model, name) for name in self.names]
        for holder in self.params:
            for param in holder.weights:
                param.requires_grad_(True)  # PEFT trains the active adapter only; here every one trains
        self.model = model
        self.trainable = [sum(p.numel() for p in holder.weights) for holder in self.params]
        self.base_params = count_parameters(model)[1] - sum(self.trainable)
        self.start = 0.0

    def train(self, progress: Progress | None) -> None:
        tcfg = self.study.train
        rows, width = step_shape([len(x) for inputs in self.inputs for x in inputs.input_ids],
                                 tcfg.batch_size, tcfg.packing, tcfg.pack_tokens)
        self.checkpointing = use_checkpointing(tcfg.gradient_checkpointing, self.model, self.device,
                                               rows * len(self.cells), width)
        scratch = Path(tempfile.mkdtemp(prefix="memlens-together-"))
        try:
            with stacked_adapters(self.model) as plan, progress_or_own(progress) as display, \
                    _group_attention(self.model) as self.attention:
                group_seed = int(stable_hash(self.run_ids)[:8], 16)  # no adapter's: its own stream is its seed's
                lockstep = Lockstep(self.model, plan, {}, self._save, group_seed=group_seed)
                trainers = self._trainers(lockstep, scratch, display)
                if self.checkpointing:
                    _enable_checkpointing(self.model, training_arguments(tcfg, self.cells[0][0], scratch, self.device,
                                                                         self.precision, True))
                log.info("training %d adapters together: %s", len(trainers), ", ".join(self.run_ids))
                self.start = time.perf_counter()
                with frozen_heap():
                    lockstep.run(trainers)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _trainers(self, lockstep: Lockstep, scratch: Path, display: Progress) -> dict[str, AdapterTrainer]:
        """Each adapter's Trainer (its arguments, collator and seed those of the cell alone) and random stream."""
        tcfg = self.study.train
        traits = None
        self.collators, trainers = [], {}
        for i, ((cell, _), inputs) in enumerate(zip(self.cells, self.inputs)):
            args = training_arguments(tcfg, cell, scratch / str(i), self.device, self.precision, checkpointing=False)
            if traits is None:
                traits = _loss_traits(self.model, args, self.tokenizer)
            collator = training_collator(tcfg, self.tokenizer.pad_token_id)
            trainer = make_trainer(self.params[i], args, inputs.input_ids, collator, self.tokenizer, AdapterTrainer,
                                   lockstep=lockstep, adapter=self.names[i])
            lockstep.streams[self.names[i]] = RandomStream()  # right after the Trainer's set_seed(seed)
            for name, value in traits.items():
                setattr(trainer, name, value)
            trainer.add_callback(RichProgressCallback(display, self.run_ids[i]))
            self.collators.append(collator)
            trainers[self.names[i]] = trainer
        self.trainers = trainers
        return trainers

    def _save(self, adapter: str) -> None:
        """Write the finished adapter's run folder, as finetune_cell writes it (called on the adapter's thread)."""
        i = self.names.index(adapter)
        (cell, data), inputs = self.cells[i], self.inputs[i]
        wall = time.perf_counter() - self.start
        info = run_info(self.study, cell, data, self.device, self.trainable[i], self.base_params + self.trainable[i],
                        inputs)
        info.update(train_summary(self.trainers[adapter], self.collators[i], self.study.train, self.attention,
                                  self.checkpointing, self.precision, wall))
        info["wall_time_s"] = wall
        info["together"] = {"size": len(self.cells), "run_ids": self.run_ids}
        with atomic_dir(self.layout.run_dir(self.run_ids[i])) as tmp:
            write_run(tmp, self.study, cell, inputs, info,
                      lambda folder: save_adapter(self.model, folder / ADAPTER_DIR, self.fused, adapter_name=adapter))
        log.info("finished %s in %.1fs (%d adapters together)", self.run_ids[i], wall, len(self.cells))


__all__ = ["AdapterParameters", "finetune_group", "training_groups"]
