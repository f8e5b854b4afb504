"""Fine-tune one grid cell (LoRA or full) with the Hugging Face Trainer and save it atomically."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pandas as pd
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from transformers import PreTrainedTokenizerBase, Trainer, TrainingArguments, set_seed

from memlens.config import CellConfig, ConfigError, StudyConfig, dump_study
from memlens.data import StudyData, build_training_set
from memlens.models import (
    count_parameters,
    load_base_model,
    load_tokenizer,
    plan_targets,
    resolve_device,
    save_adapter,
    split_fused_modules,
)
from memlens.models.adapters import ADAPTER_DIR, FULL_MODEL_DIR
from memlens.store import StudyLayout, atomic_dir, atomic_write_json, atomic_write_parquet
from memlens.train.collate import CausalLMCollator

log = logging.getLogger(__name__)


def tokenize_records(texts: list[str], tokenizer: PreTrainedTokenizerBase, max_length: int) -> list[list[int]]:
    """Token ids of each record (with the tokenizer's bos). Records over `max_length` are refused:
    truncating them would silently train on a different text than the one attacked."""
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    too_long = [i for i, seq in enumerate(ids) if len(seq) > max_length]
    if too_long:
        raise ConfigError(
            f"data.max_length: {len(too_long)} training record(s) exceed {max_length} tokens "
            f"(longest {max(len(ids[i]) for i in too_long)}); raise data.max_length or shorten them"
        )
    return ids


def _precision_flags(precision: str, device: torch.device) -> dict:
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def finetune_cell(study: StudyConfig, cell: CellConfig, data: StudyData, layout: StudyLayout,
                  tokenizer: PreTrainedTokenizerBase | None = None) -> Path:
    """Train `cell` and write `<out>/runs/<run_id>/`; returns that folder. An existing finished folder
    is returned untouched (the run_id hashes everything that determines the result)."""
    run_id = cell.run_id(study)
    final = layout.run_dir(run_id)
    if final.is_dir():
        return final
    if cell.noise_multiplier is not None:
        raise ConfigError("grid.noise_multiplier: DP-SGD training is not available in this version; "
                          "set grid.noise_multiplier: [null]")
    tokenizer = tokenizer or load_tokenizer(study.model)
    device = resolve_device(study.model.device)
    training = build_training_set(data.members, study.canary, cell.canary_copies, cell.seed)
    input_ids = tokenize_records(training.texts, tokenizer, study.data.max_length)

    set_seed(cell.seed)  # same RNG state before adapter init -> bit-identical adapters
    model = load_base_model(study.model, device)
    fused: list[str] = []
    if cell.method == "lora":
        plan = plan_targets(model, cell.target_modules)
        fused = plan.fused_suffixes
        split_fused_modules(model, fused)
        lcfg = study.lora
        model = get_peft_model(model, PeftLoraConfig(
            r=cell.rank, lora_alpha=lcfg.alpha, lora_dropout=lcfg.dropout, bias=lcfg.bias,
            target_modules=plan.module_names, task_type="CAUSAL_LM",
        ))
    trainable, total = count_parameters(model)

    tcfg = study.train
    collator = CausalLMCollator(tokenizer.pad_token_id)
    dataset = [{"input_ids": ids} for ids in input_ids]
    with atomic_dir(final) as tmp:
        args = TrainingArguments(
            output_dir=str(tmp / "trainer"),
            num_train_epochs=tcfg.epochs,
            max_steps=tcfg.max_steps or -1,
            per_device_train_batch_size=tcfg.batch_size,
            gradient_accumulation_steps=tcfg.grad_accum,
            learning_rate=tcfg.learning_rate,
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
            **_precision_flags(tcfg.precision, device),
        )
        trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                          processing_class=tokenizer)
        start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start
        model.eval()
        if cell.method == "lora":
            save_adapter(model, tmp / ADAPTER_DIR, fused)
        else:
            model.save_pretrained(str(tmp / FULL_MODEL_DIR), safe_serialization=True)
        curve = [{"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history if "loss" in h]
        real_tokens = sum(len(ids) for ids in input_ids) * tcfg.epochs if not tcfg.max_steps else None
        atomic_write_json(tmp / "cell.json", {"run_id": run_id, **cell.determinants(study)})
        atomic_write_json(tmp / "train.json", {
            "run_id": run_id,
            "trainable_params": trainable,
            "total_params": total,
            "trainable_pct": 100.0 * trainable / total,
            "loss_curve": curve,
            "final_loss": curve[-1]["loss"] if curve else None,
            "steps": trainer.state.global_step,
            "wall_time_s": wall,
            "train_tokens_per_s": real_tokens / wall if real_tokens else None,
            "seed": cell.seed,
            "data_hash": data.data_hash,
            "n_train_records": len(training.texts),
            "canary": training.canary.to_dict(),
            "device": str(device),
        })
        atomic_write_parquet(tmp / "members.parquet", training.members)
        (tmp / "study.yaml").write_text(dump_study(study))
        import shutil

        shutil.rmtree(tmp / "trainer", ignore_errors=True)
    log.info("finished %s in %.1fs", run_id, wall)
    return final


def read_train_info(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "train.json").read_text())


def read_members(run_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(Path(run_dir) / "members.parquet")
