"""Fine-tune one grid cell (LoRA or full) with the Hugging Face Trainer and save it atomically."""

from __future__ import annotations

import gc
import logging
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from rich.progress import Progress

from memlens.config import CellConfig, ConfigError, StudyConfig, dump_study
from memlens.data import StudyData, build_training_set
from memlens.data.designed_canaries import insert_canaries, study_canaries
from memlens.data.repeated_canary import TrainingSet
from memlens.models import (
    check_quantized,
    count_parameters,
    load_base_model,
    load_tokenizer,
    plan_targets,
    quiet_bitsandbytes_import,
    resolve_device,
    save_adapter,
    split_fused_modules,
)
from memlens.models.adapters import ADAPTER_DIR, FULL_MODEL_DIR, quiet_peft_wrap
from memlens.models.varlen import SUPPORTED_MODEL_TYPES, supports_varlen, varlen_attention
from memlens.store import RunFile, StudyFile, StudyLayout, atomic_dir, atomic_write_parquet, atomic_write_text
from memlens.store.integrity import digest_files
from memlens.store.records import CellRecord, TrainRecord
from memlens.train.collate import CausalLMCollator, PackedCollator, pack_rows
from memlens.train.progress import RichProgressCallback, progress_or_own

with quiet_bitsandbytes_import():  # PEFT (and transformers' Trainer, through it) import bitsandbytes
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainingArguments, set_seed
    from transformers.trainer_callback import PrinterCallback

log = logging.getLogger(__name__)


def tokenize_records(texts: list[str], tokenizer: PreTrainedTokenizerBase, max_length: int,
                     names: Sequence[str] | None = None) -> list[list[int]]:
    """Token ids of each record (with the tokenizer's bos). Records over `max_length` are refused (the longest
    named by its entry of `names`, the records' ids, when given): truncating them would silently train on a
    different text than the one attacked."""
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    too_long = [i for i, seq in enumerate(ids) if len(seq) > max_length]
    if too_long:
        longest = max(too_long, key=lambda i: len(ids[i]))
        which = f", record {names[longest]!r}" if names is not None else ""
        raise ConfigError(
            f"data.max_length: {len(too_long)} training record(s) exceed {max_length} tokens "
            f"(longest {len(ids[longest])}{which}); raise data.max_length or shorten them"
        )
    return ids


def check_training_records(study: StudyConfig, cells: Sequence[CellConfig], data_of: Callable[[CellConfig], StudyData],
                           tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuse, before any fine-tune, what would stop one of `cells` at its start: more canary copies than member
    records (repeat mode) or a training record, the canary included, over `data.max_length` tokens. `data_of(cell)`
    gives a cell's records (its design in its record draw). Each problem is said once for all the cells: their
    records are tokenized once."""
    names: dict[str, str] = {}  # training text -> its record id
    for cell in cells:
        try:
            training = build_training_set(data_of(cell).members, study.canary, cell.canary_copies, cell.seed)
        except ValueError as exc:  # grid.canary_copies beyond the member records
            raise ConfigError(str(exc)) from None
        for sample_id, text in zip(training.members.sample_id, training.members.text):
            names.setdefault(text, str(sample_id))
    tokenize_records(list(names), tokenizer, study.data.max_length, list(names.values()))


def precision_flags(precision: str, device: torch.device) -> dict:
    """Trainer mixed-precision flags: `auto` is bf16 on GPUs that have it, else fp32 (CPU: fp32, since
    bf16 autocast there is slower on most CPUs and lossy). fp16 (the study's recipe) needs CUDA."""
    cuda = device.type == "cuda"
    if precision == "auto":
        precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and not cuda:
        raise ConfigError("train.precision: fp16 mixed precision needs a CUDA GPU; use auto or fp32 on "
                          f"{device.type}")
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ConfigError("train.precision: this GPU has no bf16; use fp16 or auto")
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def step_shape(lengths: list[int], records_per_step: int, packing: str, pack_tokens: int) -> tuple[int, int]:
    """(rows, width) of the largest forward batch a step can produce (the longest records together)."""
    longest = sorted(lengths, reverse=True)[:records_per_step]
    if packing == "packed":
        rows = pack_rows(longest, pack_tokens)
        return len(rows), max(sum(longest[i] for i in row) for row in rows)
    return len(longest), longest[0]


def estimate_training_bytes(model: torch.nn.Module, rows: int, width: int) -> int:
    """Rough peak memory of one training step without checkpointing: weights, trainable state (grad +
    two Adam moments + fp32 copy), activations per layer ~34 x hidden bytes per token in 16-bit
    (Korthikanti et al. 2022, "Reducing Activation Recomputation"; doubled for fp32) plus the logits
    and their fp32 loss copies."""
    cfg = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) * 16
    act_bytes = next(model.parameters()).element_size()
    tokens = rows * width
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd")
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer")
    activations = layers * tokens * 34 * hidden * act_bytes // 2
    logits = tokens * cfg.vocab_size * (act_bytes + 8)
    mask = rows * width * width  # the boolean block mask SDPA/eager get for packed rows
    if getattr(cfg, "_attn_implementation", "sdpa") == "eager":  # eager keeps the attention probabilities
        heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head")
        mask += layers * heads * rows * width * width * act_bytes * 2
    return weights + trainable + activations + logits + mask


def use_checkpointing(mode: str, model: torch.nn.Module, device: torch.device, rows: int, width: int) -> bool:
    """`auto`: only on a GPU whose free memory the estimate does not fit with a 20% margin; CPU memory is
    rarely the limit and recomputation costs a third more compute, so never there."""
    if mode != "auto":
        return mode == "on"
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    # The weights are already on the GPU: `free` excludes them.
    need = estimate_training_bytes(model, rows, width) - sum(p.numel() * p.element_size() for p in model.parameters())
    return need * 1.2 > free


class TokenCounter:
    """Wraps a collator to count real (non-pad) tokens and tensor slots it produced."""

    def __init__(self, collate):
        self.collate, self.real, self.slots = collate, 0, 0

    def __call__(self, features: list[dict]) -> dict:
        batch = self.collate(features)
        self.real += sum(len(f["input_ids"]) for f in features)
        self.slots += batch["input_ids"].numel()
        return batch


@dataclass
class CellTraining:
    """What one cell trains on: its training set (canary planted), the designed audit canaries (`audit`, with their
    coins; None when `dp.audit_canaries` is 0) and `planted`, the training texts with the canaries whose coin says
    so; the texts after deduplication, and their tokens."""

    training: TrainingSet
    audit: pd.DataFrame | None
    planted: list[str]
    texts: list[str]
    input_ids: list[list[int]]

    @property
    def duplicates_dropped(self) -> int:
        return len(self.planted) - len(self.texts)


def cell_training(study: StudyConfig, cell: CellConfig, data: StudyData,
                  tokenizer: PreTrainedTokenizerBase) -> CellTraining:
    """The cell's training records with its canary and the designed audit canaries planted, deduplicated when
    `train.deduplicate`, tokenized."""
    training = build_training_set(data.members, study.canary, cell.canary_copies, cell.seed)
    # the designed canaries of the one-run audit (dp.audit_canaries): those whose coin says so are trained on
    audit = study_canaries(study.dp, tokenizer, data.members.text.tolist())
    planted = insert_canaries(training.texts, audit, study.dp.audit_copies)
    texts = list(dict.fromkeys(planted)) if study.train.deduplicate else planted  # first occurrence kept, in order
    return CellTraining(training, audit, planted, texts, tokenize_records(texts, tokenizer, study.data.max_length))


def lora_config(study: StudyConfig, cell: CellConfig, module_names: list[str]) -> PeftLoraConfig:
    """PEFT's configuration of the cell's adapter."""
    lcfg = study.lora
    return PeftLoraConfig(r=cell.rank, lora_alpha=lcfg.alpha_for(cell.rank), lora_dropout=lcfg.dropout,
                          bias=lcfg.bias, target_modules=module_names, task_type="CAUSAL_LM")


def run_info(study: StudyConfig, cell: CellConfig, data: StudyData, device: torch.device, trainable: int, total: int,
             inputs: CellTraining) -> dict:
    """The start of the run's train.json: what is known before training."""
    return {"run_id": cell.run_id(study), "seed": cell.seed, "data_hash": data.data_hash, "device": str(device),
            "trainable_params": trainable, "total_params": total, "trainable_pct": 100.0 * trainable / total,
            "n_train_records": len(inputs.input_ids), "canary": inputs.training.canary.to_dict(),
            "deduplicate": study.train.deduplicate, "duplicates_dropped": inputs.duplicates_dropped,
            **({"audit_canaries": {"canaries": len(inputs.audit), "inserted": int(inputs.audit.is_member.sum()),
                                   "copies": study.dp.audit_copies, "design": list(study.dp.audit_design),
                                   "seed": study.dp.audit_seed}} if inputs.audit is not None else {})}


def write_run(tmp: Path, study: StudyConfig, cell: CellConfig, inputs: CellTraining, info: dict,
              save_weights: Callable[[Path], None]) -> None:
    """Fill the run's temporary folder: the weights (`save_weights(tmp)`), their checksums, cell.json, train.json,
    members.parquet, the designed canaries with their coins (when the study has them) and study.yaml."""
    info["final_loss"] = info["loss_curve"][-1]["loss"] if info["loss_curve"] else None
    save_weights(tmp)
    info["artifacts"] = digest_files(tmp, ADAPTER_DIR if cell.method == "lora" else FULL_MODEL_DIR)
    CellRecord.model_validate({"run_id": info["run_id"], **cell.determinants(study)}).save(tmp / RunFile.CELL)
    TrainRecord.model_validate(info).save(tmp / RunFile.TRAIN)
    atomic_write_parquet(tmp / RunFile.MEMBERS, inputs.training.members)
    if inputs.audit is not None:
        atomic_write_parquet(tmp / RunFile.AUDIT_CANARIES, inputs.audit)
    atomic_write_text(tmp / RunFile.STUDY, dump_study(study))


def finetune_cell(study: StudyConfig, cell: CellConfig, data: StudyData, layout: StudyLayout,
                  tokenizer: PreTrainedTokenizerBase | None = None, *, progress: Progress | None = None,
                  base_model: PreTrainedModel | None = None) -> Path:
    """Train `cell` and write `<out>/runs/<run_id>/`; returns that folder. An existing finished folder
    is returned untouched (the run_id hashes everything that determines the result). `progress`: a rich
    display to add this cell's bar to (the sweep's); by default the cell shows its own. `base_model`:
    an already loaded model to train instead of loading `study.model` (it is modified in place; the
    throughput benchmark uses it for random-weight models of a given shape)."""
    run_id = cell.run_id(study)
    final = layout.run_dir(run_id)
    if final.is_dir():
        return final
    check_quantized(study, cell)
    tokenizer = tokenizer or load_tokenizer(study.model)
    device = resolve_device(study.model.device)
    inputs = cell_training(study, cell, data, tokenizer)
    precision = precision_flags(study.train.precision, device)

    set_seed(cell.seed)  # same RNG state before adapter init -> bit-identical adapters
    model = base_model if base_model is not None else load_base_model(study.model, device)
    model.config.use_cache = False  # a cache would also disable transformers' packed-sequence detection
    fused: list[str] = []
    if cell.method == "lora":
        plan = plan_targets(model, cell.target_modules)
        fused = plan.fused_suffixes
        split_fused_modules(model, fused)
        if getattr(model, "is_loaded_in_8bit", False):
            # PEFT's recipe for a quantized base: layer norms and the head in float32, inputs that require
            # gradients; activation checkpointing stays the Trainer's (train.gradient_checkpointing).
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        with quiet_peft_wrap():
            model = get_peft_model(model, lora_config(study, cell, plan.module_names))
    trainable, total = count_parameters(model)

    with atomic_dir(final) as tmp:
        info = run_info(study, cell, data, device, trainable, total, inputs)
        start = time.perf_counter()
        if cell.noise_multiplier is not None:
            # DP-SGD needs per-sample gradients: Opacus' own loop (memlens.train.dp), not the Trainer.
            from memlens.train.dp import train_with_dp

            dp = train_with_dp(model, inputs.input_ids, study, cell, pad_token_id=tokenizer.pad_token_id,
                               device=device)
            wall = time.perf_counter() - start
            info.update(dp=dp, loss_curve=dp["loss_curve"], steps=dp["steps"], packing="dp",
                        gradient_checkpointing=False, precision="fp32", train_tokens_per_s=None)
        else:
            info.update(_train_with_trainer(model, inputs.input_ids, study, cell, tokenizer, device, precision,
                                            tmp, progress))
            wall = time.perf_counter() - start
        info["wall_time_s"] = wall
        model.eval()

        def save_weights(folder: Path) -> None:
            if cell.method == "lora":
                save_adapter(model, folder / ADAPTER_DIR, fused)
            else:
                model.save_pretrained(str(folder / FULL_MODEL_DIR), safe_serialization=True)

        write_run(tmp, study, cell, inputs, info, save_weights)
    log.info("finished %s in %.1fs", run_id, wall)
    return final


def training_collator(tcfg, pad_token_id: int) -> TokenCounter:
    """The micro-batch collator of the configured packing mode, counting the tokens it produces."""
    # Packed micro-batches hold the same batch_size records as `padded` ones (same sampler, same seed), packed
    # into rows instead of padded; the Trainer's token-count normalisation over the grad_accum micro-batches
    # makes each step's loss and gradient those of the padded recipe. Packing a whole step into one forward
    # was measured slower on CPU: the step's logits outgrow the cache (for more per forward on a GPU, raise
    # batch_size and lower grad_accum: a step then sees the same records).
    packed = tcfg.packing == "packed"
    return TokenCounter(PackedCollator(pad_token_id, tcfg.pack_tokens) if packed else CausalLMCollator(pad_token_id))


def training_arguments(tcfg, cell: CellConfig, output_dir: Path, device: torch.device, precision: dict,
                       checkpointing: bool) -> TrainingArguments:
    """The Trainer's arguments of a cell (its seed seeds the adapter's data order)."""
    return TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=tcfg.epochs,
        max_steps=tcfg.max_steps or -1,
        per_device_train_batch_size=tcfg.batch_size,
        gradient_accumulation_steps=tcfg.grad_accum,
        learning_rate=cell.effective_learning_rate(tcfg),
        weight_decay=tcfg.weight_decay,
        warmup_steps=tcfg.warmup_steps,
        lr_scheduler_type=tcfg.lr_scheduler,
        logging_steps=tcfg.logging_steps,
        save_strategy="no",
        report_to=[],
        seed=cell.seed,
        data_seed=cell.seed,
        use_cpu=device.type == "cpu",
        dataloader_num_workers=0,
        train_sampling_strategy="group_by_length" if tcfg.packing == "length_grouped" else "random",
        remove_unused_columns=False,
        disable_tqdm=True,
        activation_checkpointing=checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
        log_level="passive",  # keep the verbosity the caller set (memlens -q: errors only)
        **precision,
    )


def make_trainer(model: torch.nn.Module, args: TrainingArguments, input_ids: list[list[int]], collate: TokenCounter,
                 tokenizer: PreTrainedTokenizerBase, trainer_class: type[Trainer] = Trainer, **kwargs) -> Trainer:
    """A Trainer of `input_ids` without the printed log dicts (`trainer_class`: a subclass, with its `kwargs`)."""
    dataset = [{"input_ids": ids} for ids in input_ids]
    trainer = trainer_class(model=model, args=args, train_dataset=dataset, data_collator=collate,
                            processing_class=tokenizer, **kwargs)
    trainer.remove_callback(PrinterCallback)  # it prints every log dict to stdout
    return trainer


def train_summary(trainer: Trainer, collate: TokenCounter, tcfg, attention: str, checkpointing: bool,
                  precision: dict, wall: float) -> dict:
    """What train.json records of a Trainer run."""
    curve = [{"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history if "loss" in h]
    return {
        "loss_curve": curve,
        "steps": trainer.state.global_step,
        "packing": tcfg.packing,
        "attention": attention,
        "gradient_checkpointing": checkpointing,
        "precision": "bf16" if precision["bf16"] else "fp16" if precision["fp16"] else "fp32",
        "real_tokens": collate.real,
        "padding_fraction": 1.0 - collate.real / collate.slots if collate.slots else None,
        "train_tokens_per_s": collate.real / wall,
    }


@contextmanager
def frozen_heap() -> Iterator[None]:
    """`gc.freeze()` for the block. The Trainer's `accelerator.free_memory()` runs a full `gc.collect()` at the start
    of every `train()`: 0.5 s over the objects of torch's and transformers' imports (cProfile, 2 cores), a third of
    a 64-record llama-tiny fine-tune. Frozen, the objects that exist before training are not scanned; those made
    during training still are."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _train_with_trainer(model, input_ids: list[list[int]], study: StudyConfig, cell: CellConfig,
                        tokenizer: PreTrainedTokenizerBase, device: torch.device, precision: dict, tmp: Path,
                        progress: Progress | None) -> dict:
    """Train with the HF Trainer in the configured packing mode; returns what train.json records."""
    tcfg = study.train
    rows, width = step_shape([len(x) for x in input_ids], tcfg.batch_size, tcfg.packing, tcfg.pack_tokens)
    checkpointing = use_checkpointing(tcfg.gradient_checkpointing, model, device, rows, width)
    counter = training_collator(tcfg, tokenizer.pad_token_id)
    args = training_arguments(tcfg, cell, tmp / "trainer", device, precision, checkpointing)
    trainer = make_trainer(model, args, input_ids, counter, tokenizer)
    with progress_or_own(progress) as display:
        trainer.add_callback(RichProgressCallback(display, cell.run_id(study)))
        with _packed_attention(model, tcfg) as attention, frozen_heap():
            start = time.perf_counter()
            trainer.train()
            wall = time.perf_counter() - start
    shutil.rmtree(tmp / "trainer", ignore_errors=True)
    return train_summary(trainer, counter, tcfg, attention, checkpointing, precision, wall)


@contextmanager
def _packed_attention(model: torch.nn.Module, tcfg) -> Iterator[str]:
    """Switch the model to the varlen attention path for packed training when asked (or `auto` and
    supported); yields what the run used: `varlen`, `block_mask`, `flash_attention_*` (a model loaded with
    flash-attn keeps it) or `padded` (not packed)."""
    if tcfg.packing != "packed":
        yield "padded"
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    implementation = str(getattr(base.config, "_attn_implementation", ""))
    if implementation.startswith("flash_attention"):
        yield implementation  # flash-attn's own varlen path: transformers derives it from the position ids
        return
    if tcfg.packed_attention == "block_mask" or tcfg.packed_attention == "auto" and not supports_varlen(model):
        yield "block_mask"
        return
    if not supports_varlen(model):
        raise ConfigError(f"train.packed_attention: varlen is not available for model type "
                          f"{getattr(base.config, 'model_type', '?')!r} (supported: {sorted(SUPPORTED_MODEL_TYPES)}, "
                          "without sliding window); use auto or block_mask")
    with varlen_attention(model):
        yield "varlen"


def read_train_info(run_dir: Path) -> TrainRecord:
    """The run's train.json (parameter counts, loss curve, wall time, canary, ...)."""
    return TrainRecord.load(Path(run_dir) / RunFile.TRAIN)


def read_members(run_dir: Path) -> pd.DataFrame:
    """Distinct member records the run trained on: sample_id, text, is_canary."""
    return pd.read_parquet(Path(run_dir) / RunFile.MEMBERS)


def merge_audit_canaries(layout: StudyLayout, designs: dict[str, str]) -> None:
    """Write `<out>/audit_canaries.parquet`: the designed canaries of the runs `designs` (run id -> membership design)
    and their coins, once per design (every run of a design has the same ones), with a `membership` column; rewritten
    only when it changes, and left alone when no run has canaries."""
    parts = {}
    for run_id, design in designs.items():
        path = layout.run_file(run_id, RunFile.AUDIT_CANARIES)
        if design not in parts and path.exists():
            parts[design] = pd.read_parquet(path).assign(membership=design)
    if not parts:
        return
    frame = pd.concat(parts.values(), ignore_index=True)
    target = layout.study_level(StudyFile.AUDIT_CANARIES)
    if not (target.exists() and pd.read_parquet(target).equals(frame)):
        atomic_write_parquet(target, frame)
