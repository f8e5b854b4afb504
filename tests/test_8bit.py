"""8-bit base models (`model.load_in_8bit: true`, the study's Llama-2-7B configuration): llama-tiny loaded with
bitsandbytes' LLM.int8() on the CPU, LoRA-fine-tuned on it and attacked; full fine-tuning and DP-SGD, which
cannot train on an int8 base, refused with the fields named."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from memlens.attacks.mia import attack_models
from memlens.config import ConfigError
from memlens.data import load_study_data
from memlens.models import check_quantized, load_base_model, load_tokenizer
from memlens.store import StudyLayout
from memlens.train import finetune_cell
from memlens.train.finetune import read_train_info
from tests.conftest import LLAMA_TINY, make_study

TEXTS = ["A 54-year-old woman developed a rash after starting amoxicillin.",
         "Hepatotoxicity was reported in a patient treated with isoniazid for tuberculosis."]


def _bitsandbytes() -> None:
    pytest.importorskip("bitsandbytes", reason="model.load_in_8bit needs bitsandbytes: pip install 'memlens[int8]'")


def _study(tmp_path, **sections):
    base = {"model": {"name_or_path": str(LLAMA_TINY), "load_in_8bit": True, "device": "cpu"},
            "data": {"subset": 24, "max_length": 128},
            "train": {"epochs": 1, "max_steps": 2, "batch_size": 8, "grad_accum": 1, "warmup_steps": 0,
                      "logging_steps": 1}}
    for section, values in sections.items():
        base[section] = {**base.get(section, {}), **values}
    return make_study(tmp_path / "study", **base)


def test_llama_tiny_loads_in_8_bits_on_the_cpu_and_scores_like_float32(tmp_path, caplog):
    _bitsandbytes()
    study = _study(tmp_path)
    caplog.set_level(logging.WARNING)
    model = load_base_model(study.model)
    assert model.is_loaded_in_8bit
    int8 = [name for name, m in model.named_modules() if type(m).__name__ == "Linear8bitLt"]
    assert int8 and model.get_parameter(f"{int8[0]}.weight").dtype == torch.int8
    tokenizer = load_tokenizer(study.model)
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    with torch.no_grad():
        loss8 = model(**batch, labels=labels).loss.item()
        loss32 = load_base_model(study.model.model_copy(update={"load_in_8bit": False}))(
            **batch, labels=labels).loss.item()
    assert math.isfinite(loss8) and abs(loss8 - loss32) < 0.02 * loss32  # LLM.int8() is close to the full model
    # bitsandbytes' "inputs will be cast to float16" line, once per layer and forward, is not shown
    assert not [r for r in caplog.records if r.name.startswith("bitsandbytes")], caplog.records


def test_lora_fine_tune_and_attack_on_an_8_bit_base(tmp_path, caplog):
    _bitsandbytes()
    study = _study(tmp_path)
    cell = study.cells()[0]
    data = load_study_data(study.data)
    caplog.set_level(logging.WARNING)
    run_dir = finetune_cell(study, cell, data, StudyLayout(study.out_dir))
    info = read_train_info(run_dir)
    assert info.steps == 2 and all(math.isfinite(p["loss"]) for p in info.loss_curve)
    assert 0 < info.trainable_params < info.total_params
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()

    members, non_members = data.members.text.tolist()[:8], data.non_members.text.tolist()[:8]
    scores, results = attack_models(study.model, {"int8": run_dir}, members, non_members,
                                    mia={"bootstrap": 10}, cache_dir=tmp_path / "cache", show_progress=False)
    mia = results[results.stage == "mia"]
    assert len(mia) and mia.auc.between(0, 1).all()
    assert scores.nll_ft.notna().all() and scores.nll_ref.notna().all()
    assert (scores.nll_ft != scores.nll_ref).any()  # the adapter is active on the 8-bit base
    assert not [r for r in caplog.records if r.name.startswith("bitsandbytes")], caplog.records


@pytest.mark.parametrize(("grid", "field"), [
    ({"method": ["full"]}, "grid.method"),
    ({"noise_multiplier": [1.0]}, "grid.noise_multiplier"),
    ({"method": ["lora", "full"]}, "grid.method"),
    ({"noise_multiplier": [None, "auto"]}, "grid.noise_multiplier"),
])
def test_full_fine_tuning_and_dp_are_refused_on_an_8_bit_base(tmp_path, grid, field):
    dp = {"dp": {"target_epsilon": 8.0}} if "auto" in grid.get("noise_multiplier", []) else {}
    study = _study(tmp_path, grid=grid, **dp)
    with pytest.raises(ConfigError) as err:
        check_quantized(study)
    assert str(err.value).startswith(field) and "model.load_in_8bit" in str(err.value)
    refused = [c for c in study.cells() if c.method == "full" or c.noise_multiplier is not None]
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):  # at fine-tune time too, before any work
        finetune_cell(study, refused[0], None, StudyLayout(study.out_dir))
    assert not StudyLayout(study.out_dir).run_dir(refused[0].run_id(study)).exists()
    check_quantized(study.model_copy(update={"model": study.model.model_copy(update={"load_in_8bit": False})}))


def test_lora_cells_pass_the_check_on_an_8_bit_base(tmp_path):
    study = _study(tmp_path, grid={"rank": [1, 2]})
    check_quantized(study)
    for cell in study.cells():
        check_quantized(study, cell)
