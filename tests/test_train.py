"""Fine-tuning one cell on real models and data: where LoRA lands, parameter counts, reproducibility,
packed == padded training, the loss going down, DP hook, deduplication, configuration errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from memlens.config import ConfigError, load_study
from memlens.data import load_study_data
from memlens.models import AdapterBank, load_base_model, load_tokenizer
from memlens.store import StudyLayout
from memlens.train import finetune_cell, read_members, read_train_info, tokenize_records
from memlens.train.collate import CausalLMCollator
from memlens.train.finetune import estimate_training_bytes, step_shape, use_checkpointing
from tests.conftest import GPT2_SMALL, PHEE, make_study

SUBSET = 32


def _study(out, **sections):
    base = {"data": {"source": str(PHEE), "subset": SUBSET},
            "train": {"epochs": 1, "batch_size": 8, "grad_accum": 2, "warmup_steps": 0, "logging_steps": 1}}
    for key, values in sections.items():
        base.setdefault(key, {}).update(values)
    return make_study(out, **base)


def _train(study, cell_index: int = 0):
    data = load_study_data(study.data)
    return finetune_cell(study, study.cells()[cell_index], data, StudyLayout(study.out_dir))


def _adapter(run_dir) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def llama_runs(tmp_path_factory):
    """The same llama-tiny [q] rank-2 cell trained packed (twice, separate folders) and padded, without
    dropout so that packed and padded training are the same computation (a high learning rate so that
    4 steps visibly fit the records)."""
    root = tmp_path_factory.mktemp("llama")
    runs = {}
    for name, packing, attention in (("packed", "packed", "auto"), ("packed_again", "packed", "auto"),
                                     ("padded", "padded", "auto"), ("packed_mask", "packed", "block_mask")):
        study = _study(root / name, lora={"dropout": 0.0},
                       train={"packing": packing, "epochs": 2, "learning_rate": 1e-2, "packed_attention": attention})
        runs[name] = (study, _train(study))
    return runs


@pytest.mark.real_fixtures("llama-tiny's 3.3M parameters")
def test_lora_on_q_projections_only_and_parameter_count(llama_runs):
    study, run = llama_runs["packed"]
    weights = _adapter(run)
    assert weights and all(".self_attn.q_proj.lora_" in k for k in weights)
    assert {k.split(".layers.")[1].split(".")[0] for k in weights} == {"0", "1", "2", "3"}
    info = read_train_info(run)
    layers, rank, width = 4, 2, 192  # llama-tiny: 4 x 192, q is 192 -> 192
    assert info.trainable_params == layers * rank * (width + width)
    assert sum(w.numel() for w in weights.values()) == info.trainable_params
    assert info.total_params > 3_000_000 and info.packing == "packed" and info.attention == "varlen"
    assert info.padding_fraction == 0.0 and info.real_tokens > 0


def test_same_seed_gives_bit_identical_adapters(llama_runs):
    a, b = _adapter(llama_runs["packed"][1]), _adapter(llama_runs["packed_again"][1])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_packed_training_matches_padded_training(llama_runs):
    """Same records per step, same tokens predicted: the same loss curve and (to float tolerance) adapter."""
    packed, padded = read_train_info(llama_runs["packed"][1]), read_train_info(llama_runs["padded"][1])
    assert packed.steps == padded.steps == 4  # 2 epochs x 32 records / (8 x 2)
    assert packed.real_tokens == padded.real_tokens and padded.padding_fraction > 0.1
    for p, q in zip(packed.loss_curve, padded.loss_curve, strict=True):
        assert p["loss"] == pytest.approx(q["loss"], rel=1e-4)
    a, b = _adapter(llama_runs["packed"][1]), _adapter(llama_runs["padded"][1])
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-5)


def test_varlen_and_block_mask_packing_train_the_same_model(llama_runs):
    varlen, mask = read_train_info(llama_runs["packed"][1]), read_train_info(llama_runs["packed_mask"][1])
    assert (varlen.attention, mask.attention) == ("varlen", "block_mask")
    for p, q in zip(varlen.loss_curve, mask.loss_curve, strict=True):
        assert p["loss"] == pytest.approx(q["loss"], rel=1e-5)
    a, b = _adapter(llama_runs["packed"][1]), _adapter(llama_runs["packed_mask"][1])
    # Adam divides by the gradient's own scale, so float-rounding differences of the two attention paths
    # reach ~2e-5 on an element near zero (seen on an Intel Xeon): compared at 0.1% of each tensor's scale.
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-3 * float(a[key].abs().max()))


@pytest.mark.real_fixtures("a loss drop measured on PHEE")
def test_fine_tuning_lowers_the_loss_on_its_training_records(llama_runs):
    study, run = llama_runs["packed"]
    tok = load_tokenizer(study.model)
    members = read_members(run)
    ids = tokenize_records(members.text.tolist(), tok, 512)
    bank = AdapterBank(load_base_model(study.model))
    bank.add("run", run)

    batch = CausalLMCollator(tok.pad_token_id)([{"input_ids": x} for x in ids])

    def mean_loss(name):  # token-weighted mean NLL over all training records, one padded batch
        with bank.use(name) as model, torch.no_grad():
            return model(**batch).loss.item()

    assert mean_loss("run") < mean_loss(None) - 0.05


def test_train_json_records_the_run(llama_runs):
    study, run = llama_runs["packed"]
    info = read_train_info(run)
    for key in ("loss_curve", "wall_time_s", "seed", "data_hash", "canary", "gradient_checkpointing", "precision",
                "train_tokens_per_s", "deduplicate"):
        assert key in info.to_json()
    assert info.gradient_checkpointing is False and info.precision == "fp32"  # auto on CPU
    assert info.canary["copies"] == 1 and info.n_train_records == SUBSET
    assert (run / "cell.json").is_file() and (run / "study.yaml").is_file() and not (run / "trainer").exists()


def test_gpt2_q_adapts_only_the_q_third_of_c_attn(tmp_path):
    study = _study(tmp_path, model={"name_or_path": str(GPT2_SMALL)}, train={"max_steps": 2})
    run = _train(study)
    weights = _adapter(run)
    assert weights and all(".attn.c_attn.q.lora_" in k for k in weights)
    assert read_train_info(run).trainable_params == 4 * 2 * (384 + 384)
    bank = AdapterBank(load_base_model(study.model))
    bank.add("run", run)
    outputs = []
    c_attn = bank.base.transformer.h[0].attn.c_attn  # layer 0: its input (the embeddings) is not adapted
    handle = c_attn.register_forward_hook(lambda mod, args, out: outputs.append(out.detach().clone()))
    ids = torch.tensor([tokenize_records(["Aspirin caused a rash in two patients."],
                                         load_tokenizer(study.model), 64)[0]])
    with torch.no_grad():
        with bank.use("run") as model:
            model(input_ids=ids)
        with bank.use(None) as model:
            model(input_ids=ids)
    handle.remove()
    changed = (outputs[0] - outputs[1]).abs().amax(dim=(0, 1)) > 0
    assert changed[:384].any() and not changed[384:].any()


def test_full_fine_tuning_and_length_grouped(tmp_path):
    study = _study(tmp_path, grid={"method": ["full"]}, train={"max_steps": 1, "packing": "length_grouped"})
    run = _train(study)
    info = read_train_info(run)
    assert (run / "model" / "model.safetensors").is_file() and not (run / "adapter").exists()
    assert info.trainable_params == info.total_params and info.packing == "length_grouped"


def test_deduplicate_drops_repeated_canary_copies_with_checkpointing_forced_on(tmp_path):
    study = _study(tmp_path, grid={"canary_copies": [4]},
                   train={"max_steps": 1, "deduplicate": True, "gradient_checkpointing": "on"})
    info = read_train_info(_train(study))
    assert info.gradient_checkpointing is True and info.final_loss > 0
    assert info.deduplicate is True and info.duplicates_dropped == 3
    assert info.n_train_records == SUBSET - 3  # repeat mode: 3 records displaced, then the copies dropped
    assert info.canary["copies"] == 4  # the cell's setting stays recorded


def test_dp_cell_calls_train_with_dp(tmp_path):
    study = _study(tmp_path, grid={"noise_multiplier": [1.0]}, train={"max_steps": 2})
    info = read_train_info(_train(study))
    assert info.dp["noise_multiplier"] == 1.0 and info.dp["steps"] == 2
    assert info.dp["epsilon"] > 0 and info.packing == "dp"


def test_bad_configurations_fail_with_clear_messages(tmp_path):
    with pytest.raises(ConfigError, match=r"train.packing: .*'packed'"):
        load_study(raw={"train": {"packing": "sometimes"}})
    with pytest.raises(ConfigError, match="train.gradient_checkpointing"):
        load_study(raw={"train": {"gradient_checkpointing": "maybe"}})
    with pytest.raises(ConfigError, match="fp16 mixed precision needs a CUDA GPU"):
        _train(_study(tmp_path / "fp16", train={"precision": "fp16"}, model={"device": "cpu"}))
    with pytest.raises(ConfigError, match=r"GPT2LMHeadModel \(gpt2\) has no 'gate' matrix; it has: "):
        _train(_study(tmp_path / "gate", model={"name_or_path": str(GPT2_SMALL)}, grid={"target_modules": [["gate"]]}))
    with pytest.raises(ConfigError, match=r"data.max_length: .* exceed 8 tokens"):
        _train(_study(tmp_path / "long", data={"max_length": 8}))
    assert not any(list((tmp_path / name / "runs").glob("*")) for name in ("fp16", "gate", "long"))


def test_checkpointing_auto_is_off_on_cpu_and_the_estimate_grows_with_the_step(llama_runs):
    study, _ = llama_runs["packed"]
    model = load_base_model(study.model)
    cpu = torch.device("cpu")
    assert not use_checkpointing("auto", model, cpu, 64, 1024) and use_checkpointing("on", model, cpu, 1, 8)
    small, large = estimate_training_bytes(model, 1, 256), estimate_training_bytes(model, 4, 1024)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert weights < small < large
    assert step_shape([5, 50, 7, 40], 2, "padded", 1024) == (2, 50)
    assert step_shape([5, 50, 7, 40], 2, "packed", 1024) == (1, 90)
