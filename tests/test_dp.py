"""DP-SGD on llama-tiny: runs with LoRA and full fine-tuning, records the accountant's epsilon, is seeded,
refuses models whose per-sample gradients are wrong, and measurably reduces membership leakage; the
one-run empirical epsilon lower bound stays below the accountant's epsilon."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from opacus.accountants import create_accountant
from peft import LoraConfig, get_peft_model
from sklearn.metrics import roc_auc_score

from memlens.config import CellConfig
from memlens.data import load_study_data
from memlens.metrics.privacy import one_run_epsilon_lower_bound
from memlens.models import load_base_model, load_tokenizer, plan_targets, split_fused_modules
from memlens.score import sequence_nll
from memlens.train import dp as dp_module
from memlens.train.collate import CausalLMCollator
from memlens.train.dp import DPUnsupportedError, _check_per_sample_gradients, _functorch_types, _wrap, train_with_dp
from tests.conftest import GPT2_SMALL, make_study


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    study = make_study(tmp_path_factory.mktemp("dp"), data={"subset": 64},
                       train={"max_steps": 2, "batch_size": 8, "grad_accum": 1, "learning_rate": 1e-3,
                              "warmup_steps": 0, "logging_steps": 1})
    tokenizer = load_tokenizer(study.model)
    data = load_study_data(study.data)
    ids = tokenizer(data.members.text.tolist())["input_ids"]
    return study, tokenizer, ids


def _cell(method="lora", noise=1.0, seed=0, targets=("q",)):
    return CellConfig(method=method, target_modules=list(targets), rank=2 if method == "lora" else 0,
                      canary_copies=1, seed=seed, noise_multiplier=noise)


def _model(study, cell, model_cfg=None):
    torch.manual_seed(cell.seed)
    model = load_base_model(model_cfg or study.model, torch.device("cpu"))
    if cell.method == "lora":
        plan = plan_targets(model, cell.target_modules)
        split_fused_modules(model, plan.fused_suffixes)
        model = get_peft_model(model, LoraConfig(r=cell.rank, lora_alpha=16, lora_dropout=0.05,
                                                 target_modules=plan.module_names, task_type="CAUSAL_LM"))
    return model


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_lora_dp_records_accountant_epsilon_and_is_seeded(setup):
    study, tok, ids = setup
    cell = _cell()
    runs = []
    for _ in range(2):
        model = _model(study, cell)
        before = _trainable(model)
        info = train_with_dp(model, ids, study, cell, pad_token_id=tok.pad_token_id, device="cpu")
        runs.append((before, _trainable(model), info, model))
    (before, after, info, model), (_, again, info2, _) = runs
    assert all(n.endswith(("lora_A.default.weight", "lora_B.default.weight")) for n in after)
    assert any(not torch.equal(before[n], after[n]) for n in after), "DP-SGD did not update the adapter"
    # the recorded epsilon is the accountant's for exactly these steps, rate and noise
    accountant = create_accountant("prv")
    accountant.history = [(1.0, 8 / len(ids), 2)]
    assert info["epsilon"] == pytest.approx(accountant.get_epsilon(delta=1 / len(ids) ** 1.1), rel=1e-6)
    assert info["delta"] == pytest.approx(1 / len(ids) ** 1.1)
    assert info["steps"] == 2 and info["noise_multiplier"] == 1.0 and info["max_grad_norm"] == 1.0
    assert info["accountant"] == "prv" and info["loss_curve"] and np.isfinite(info["loss_curve"][-1]["loss"])
    # seeded: same cell, same adapter, bit for bit (Poisson batches, noise and dropout all seeded)
    assert all(torch.equal(after[n], again[n]) for n in after)
    assert info2["loss_curve"] == info["loss_curve"]
    # Opacus is detached: no hooks, no per-sample attributes left on the trained model
    assert not any(hasattr(p, "grad_sample") or hasattr(p, "summed_grad") for p in model.parameters())
    assert not hasattr(model, "autograd_grad_sample_hooks")


def test_physical_chunks_give_the_same_step_as_one_batch(setup):
    """A Poisson batch larger than train.batch_size is clipped chunk by chunk and noised once: the update
    must not depend on the chunking."""
    study, tok, ids = setup
    cell = _cell()
    adapters = []
    for batch_size, accum in ((8, 1), (2, 4)):  # expected batch 8 records: one chunk, or four chunks of 2
        s = study.model_copy(update={"train": study.train.model_copy(
            update={"batch_size": batch_size, "grad_accum": accum, "max_steps": 1})})
        model = _model(study, cell)
        for module in model.modules():  # no dropout: the chunks would draw different masks
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        info = train_with_dp(model, ids, s, cell, pad_token_id=tok.pad_token_id, device="cpu")
        assert info["expected_batch_size"] == 8
        adapters.append(_trainable(model))
    # (Adam is blind to a uniform gradient scale, but noise added per chunk or clipped sums lost between
    # chunks would change the update's direction)
    assert all(torch.allclose(adapters[0][n], adapters[1][n], atol=1e-6) for n in adapters[0])


def test_full_finetuning(setup):
    study, tok, ids = setup
    cell = _cell(method="full", noise=1.0, targets=("all",))
    model = _model(study, cell)
    before = _trainable(model)
    study = study.model_copy(update={"train": study.train.model_copy(update={"max_steps": 2})})
    info = train_with_dp(model, ids, study, cell, pad_token_id=tok.pad_token_id, device="cpu")
    after = _trainable(model)
    assert len(after) == len(list(model.parameters()))  # every weight trained
    assert sum(not torch.equal(before[n], after[n]) for n in after) == len(after)
    assert "LlamaRMSNorm" in info["functorch_modules"]  # no Opacus rule: its functorch fallback, probed
    assert info["steps"] == 2 and 0 < info["epsilon"] < math.inf and info["target_epsilon"] is None


def test_wrong_per_sample_gradients_are_refused_with_the_module_named(setup, monkeypatch):
    """GPT-2 builds position ids with batch size 1 when none are passed, so Opacus would sum the whole
    batch's position-embedding gradients into one "per-sample" gradient. memlens passes batched position
    ids (full fine-tuning of GPT-2 works); without them the probe must refuse, naming the parameter."""
    study, tok, ids = setup
    gpt2 = study.model.model_copy(update={"name_or_path": str(GPT2_SMALL)})
    model = load_base_model(gpt2, torch.device("cpu"))
    for p in model.parameters():  # keep the probe cheap: train the embeddings and the final norm only
        p.requires_grad_(False)
    for name in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight"):
        model.get_parameter(name).requires_grad_(True)
    gsm = _wrap(model)
    gsm.train()
    probe = sorted(ids, key=len)[:1] + sorted(ids, key=len)[16:17]
    collate = CausalLMCollator(tok.pad_token_id)
    try:
        _check_per_sample_gradients(gsm, collate, probe, torch.device("cpu"), _functorch_types(model))  # passes

        def loss_without_positions(m, batch):
            logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:],
                                                    reduction="none", ignore_index=-100)
            return nll.sum(1) / (batch["labels"][:, 1:] != -100).sum(1)

        monkeypatch.setattr(dp_module, "per_record_loss", loss_without_positions)
        with pytest.raises(DPUnsupportedError, match=r"transformer\.wpe\.weight \(Embedding\)"):
            _check_per_sample_gradients(gsm, collate, probe, torch.device("cpu"), _functorch_types(model))
    finally:
        gsm.cleanup()


# ------------------------------------------------------------------------ leakage with and without DP
def _plain_train(model, ids, study, seed, pad):
    """The same run without DP: same Poisson batches, loss, optimizer and steps, no clipping or noise."""
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    from memlens.train.dp import dp_schedule, per_record_loss

    expected, rate, steps = dp_schedule(study, len(ids))
    torch.manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=study.train.learning_rate)
    collate = CausalLMCollator(pad)
    model.train()
    for batch in UniformWithReplacementSampler(num_samples=len(ids), sample_rate=rate,
                                               generator=torch.Generator().manual_seed(seed), steps=steps):
        if not batch:
            continue
        opt.zero_grad()
        # sum / expected batch size: the same scaling as DP-SGD's mean with Poisson sampling
        (per_record_loss(model, collate([{"input_ids": ids[i]} for i in batch])).sum() / expected).backward()
        opt.step()
    model.eval()


def test_dp_reduces_membership_leakage_and_audit_stays_below_epsilon(setup):
    study, tok, pool = setup
    # A valid one-run audit: each pool record is a member by an independent fair coin flip.
    is_member = np.random.default_rng(7).random(len(pool)) < 0.5
    members = [ids for ids, m in zip(pool, is_member) if m]
    study = study.model_copy(update={
        "train": study.train.model_copy(update={"max_steps": 12, "learning_rate": 1e-2}),
        "dp": study.dp.model_copy(update={"delta": 1e-5}),
    })
    base = load_base_model(study.model, torch.device("cpu"))
    nll_base = sequence_nll(base, pool, pad_token_id=tok.pad_token_id)

    def leakage(model):
        score = nll_base - sequence_nll(model, pool, pad_token_id=tok.pad_token_id)  # higher: member
        audit = one_run_epsilon_lower_bound(score, is_member, delta=1e-5, random_split=True)
        return roc_auc_score(is_member, score), audit

    cell = _cell(noise=3.0, targets=("q", "k", "v", "o", "gate", "up", "down")).model_copy(update={"rank": 8})
    plain = _model(study, cell)
    _plain_train(plain, members, study, cell.seed, tok.pad_token_id)
    auc_plain, audit_plain = leakage(plain)

    private = _model(study, cell)
    info = train_with_dp(private, members, study, cell, pad_token_id=tok.pad_token_id, device="cpu")
    auc_dp, audit_dp = leakage(private)

    assert auc_plain > 0.8, f"the non-private run should memorize (AUC {auc_plain:.3f})"
    assert auc_dp < auc_plain - 0.2, f"DP AUC {auc_dp:.3f} vs {auc_plain:.3f} without DP"
    assert audit_plain["eps_lower"] > 0.5, audit_plain  # a memorizing run is detectably not private
    assert audit_dp["valid"] and audit_dp["eps_lower"] <= info["epsilon"], (audit_dp, info["epsilon"])


def test_finetune_cell_records_dp_in_train_json(tmp_path):
    """The train stage routes DP cells here and stores the privacy record with the run."""
    from memlens.store import StudyLayout
    from memlens.train import finetune_cell, read_train_info

    study = make_study(tmp_path / "study", data={"subset": 32}, grid={"noise_multiplier": [None, "auto"]},
                       dp={"target_epsilon": 8.0, "accountant": "rdp"},
                       train={"max_steps": 2, "batch_size": 8, "grad_accum": 1})
    dp_cells = [c for c in study.cells() if c.noise_multiplier is not None]
    assert len(study.cells()) == 2 and len(dp_cells) == 1
    run_dir = finetune_cell(study, dp_cells[0], load_study_data(study.data), StudyLayout(study.out_dir))
    assert "-dpeps8-" in run_dir.name
    dp = read_train_info(run_dir).dp
    # calibrated noise reaches the target (binary-search tolerance 0.01) without exceeding it
    assert 7.95 <= dp["epsilon"] <= 8.0 and dp["accountant"] == "rdp" and dp["steps"] == 2
    assert dp["target_epsilon"] == 8.0 and dp["noise_multiplier"] > 0
    assert dp["delta"] == pytest.approx(1 / dp["n_records"] ** 1.1)
