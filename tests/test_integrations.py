"""MemlensCallback inside a real transformers Trainer on llama-tiny: its metrics reach the logs the reporting
callbacks see, agree with memlens' own scoring of the saved adapter, leave the training mode as it was, and
stop training above a threshold."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from memlens.attacks.mia import attack_models
from memlens.config import ConfigError, MIAConfig, TrainConfig, read_recipe
from memlens.integrations import MemlensCallback

from .conftest import LLAMA_TINY, PHEE

CANARY = {"id": "mrn", "text": "Patient MRN 4812093377 was given 40 mg of the study drug and developed a rash.",
          "secret": "4812093377"}


class Recorder(TrainerCallback):
    """Stands for a report_to integration: it only sees what is in the logs when its on_log runs."""

    def __init__(self):
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def _trainer(tmp_path, model, tokenizer, texts: list[str], callbacks, max_steps: int) -> Trainer:
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=max_steps, learning_rate=2e-2,
                             per_device_train_batch_size=8, save_strategy="no", report_to=[], logging_steps=1,
                             use_cpu=True, disable_tqdm=True, seed=0)
    return Trainer(model=model, args=args, train_dataset=Dataset.from_dict(tokenizer(texts)),
                   data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), processing_class=tokenizer,
                   callbacks=callbacks)


@pytest.fixture(scope="module")
def records():
    members = pd.read_json(PHEE / "train.jsonl", lines=True).context.tolist()[:16]
    non_members = pd.read_json(PHEE / "test.jsonl", lines=True).context.tolist()[:16]
    return members, non_members


def test_callback_logs_membership_inside_a_trainer(tmp_path, records):
    members, non_members = records
    tokenizer = AutoTokenizer.from_pretrained(LLAMA_TINY)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(LLAMA_TINY, dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "v_proj"],
                                      task_type="CAUSAL_LM"))
    recorder = Recorder()
    callback = MemlensCallback(members=members, non_members=non_members, canaries=[CANARY], every=1,
                               exposure_candidates=20)
    trainer = _trainer(tmp_path, model, tokenizer, members + [CANARY["text"]] * 4, [recorder, callback], max_steps=2)
    trainer.train()
    logged = [entry for entry in recorder.logs if "memlens/auc" in entry]
    # a callback given before it (as report_to's are) sees the metrics: logged after steps 1 and 2
    assert len(logged) == 2 and len(callback.seconds) == 2
    last = logged[-1]
    assert {"memlens/auc", "memlens/tpr_at_10pct_fpr", "memlens/auc/loss", "memlens/auc/ref_ratio",
            "memlens/canary_exposure"} <= set(last)
    assert last["memlens/auc"] == last["memlens/auc/ref_ratio"]  # the headline attack, the base as reference
    assert callback.headline == "ref_ratio"
    assert "memlens/tpr_at_1pct_fpr" not in last  # 16 non-members: not estimable, so not logged (said once)
    assert 0 <= last["memlens/tpr_at_10pct_fpr"] <= 1
    assert any("memlens/auc" in entry for entry in trainer.state.log_history)
    # the same number as memlens' own scoring of the saved adapter (base = the adapter disabled)
    model.save_pretrained(str(tmp_path / "adapter"))
    _, results = attack_models(LLAMA_TINY, {"cb": tmp_path / "adapter"}, members, non_members,
                               mia={"attacks": ["ref_ratio", "loss"], "bootstrap": 0, "bag_of_words_baseline": False},
                               show_progress=False)
    auc = results[results.stage == "mia"].set_index("attack").auc
    assert last["memlens/auc/ref_ratio"] == pytest.approx(auc["ref_ratio"], abs=1e-6)
    assert last["memlens/auc/loss"] == pytest.approx(auc["loss"], abs=1e-6)
    # the Trainer's recipe, written when training began, is what an audit's references repeat
    recipe = read_recipe(tmp_path / "trainer" / "memlens-recipe.json")
    assert recipe.train_config() == TrainConfig(max_steps=2, epochs=3, learning_rate=2e-2, batch_size=8, grad_accum=1,
                                                warmup_steps=0, lr_scheduler="linear", weight_decay=0.0)
    assert recipe.lora == {"r": 8, "lora_alpha": 16, "lora_dropout": 0.1, "target_modules": ["q_proj", "v_proj"],
                           "bias": "none"}
    assert recipe.train_records == 20 and recipe.total_steps == 2
    # scoring leaves the training mode as it found it
    for mode in (True, False):
        model.train(mode)
        callback.evaluate(model, tokenizer, trainer.state.global_step)
        assert model.training is mode


def test_callback_stops_training_above_the_threshold(tmp_path, records):
    members, non_members = records
    tokenizer = AutoTokenizer.from_pretrained(LLAMA_TINY)
    model = AutoModelForCausalLM.from_pretrained(LLAMA_TINY, dtype=torch.float32)  # full fine-tuning: no adapter
    callback = MemlensCallback(members=members[:8], non_members=non_members[:8], every=1, stop_above=0.0)
    trainer = _trainer(tmp_path, model, tokenizer, members[:8], [callback], max_steps=5)
    trainer.train()
    assert trainer.state.global_step == 1  # stopped after the first evaluation
    first = callback.history[0]
    assert "memlens/auc/ref_ratio" in first  # the model before its first step was the reference
    with pytest.raises(ConfigError, match="every"):
        MemlensCallback(members=members, non_members=non_members, every="step")
    with pytest.raises(ConfigError, match=r"canaries: \['canary-0'\] have no `secret`"):
        MemlensCallback(members=members, non_members=non_members, canaries=[{"text": "no secret here"}])


def test_bad_attacks_and_overlapping_records_are_refused_before_training(records):
    members, non_members = records
    valid = r"valid choices: \['ez_mia', 'learned', 'loss', 'min_k', 'min_k_pp', .*'ref_ratio', 'wbc', 'zlib'\]"
    with pytest.raises(ConfigError, match=r"MemlensCallback\(attacks=...\): unknown attack 'no_such_attack'; " + valid):
        MemlensCallback(members=members, non_members=non_members, attacks=["no_such_attack"])
    for attack, need in [("lira", "reference adapters"), ("recall", "a non-member prefix"),
                         ("dc_pdd", "mia.reference_corpus"), ("lowercase", "the lowercased texts' scores")]:
        with pytest.raises(ConfigError, match=rf"'{attack}' needs {need}.*, which a callback inside training cannot "
                                              rf"give; {valid}"):
            MemlensCallback(members=members, non_members=non_members, attacks=["loss", attack])
    with pytest.raises(ConfigError, match=r"MemlensCallback\(attacks=...\): 'min_k@2': fraction: Input should be less"):
        MemlensCallback(members=members, non_members=non_members, attacks=["min_k@2"])
    with pytest.raises(ConfigError, match=r"given twice"):
        MemlensCallback(members=members, non_members=non_members, attacks=["loss", "loss"])
    # the audit's rule and words for a text on both sides
    with pytest.raises(ConfigError, match=r"MemlensCallback: 1 text\(s\) occur in both the members and the "
                                          r"non-members \(e\.g\. .*\); a record cannot be both"):
        MemlensCallback(members=members, non_members=non_members + members[:1])
    with pytest.raises(ConfigError, match=r"MemlensCallback: 1 text\(s\) occur in both the canaries and the "
                                          "non-members"):
        MemlensCallback(members=members, non_members=[*non_members, CANARY["text"]], canaries=[CANARY])
    with pytest.raises(ConfigError, match="max_records"):
        MemlensCallback(members=members, non_members=non_members, max_records=1)


def test_a_seeded_sample_of_at_most_max_records_a_side(records):
    members, non_members = records
    callback = MemlensCallback(members=members, non_members=non_members, max_records=5, seed=3)
    assert len(callback.members) == len(callback.non_members) == 5 and len(callback.labels) == 10
    assert callback.members == [t for t in members if t in callback.members]  # in the given order
    assert set(callback.non_members) <= set(non_members)
    again = MemlensCallback(members=members, non_members=non_members, max_records=5, seed=3)
    assert (again.members, again.non_members) == (callback.members, callback.non_members)
    every = MemlensCallback(members=members, non_members=non_members, max_records=None)
    assert (every.members, every.non_members) == (members, non_members)


def test_the_headline_the_base_only_when_read_and_a_reused_callback_starts_clean(tmp_path, records):
    members, non_members = records
    tokenizer = AutoTokenizer.from_pretrained(LLAMA_TINY)
    bare = AutoTokenizer.from_pretrained(LLAMA_TINY)
    bare.pad_token = None  # the caller's tokenizer has no pad token, and keeps none
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(LLAMA_TINY, dtype=torch.float32),
                           LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    # no attack reads the base model: it is not scored; the headline is min_k_pp's (the registry's order)
    callback = MemlensCallback(members=members[:8], non_members=non_members[:8], every=1, tokenizer=bare,
                               attacks=["loss", "zlib", "min_k_pp"])
    for run in range(2):  # the same callback in two trainings: each starts clean
        recorder = Recorder()
        _trainer(tmp_path / str(run), model, tokenizer, members[:8], [recorder, callback], max_steps=1).train()
        assert len(callback.history) == len(callback.seconds) == 1 and callback._reference is None
        assert any("memlens/auc" in entry for entry in recorder.logs)  # moved before the new reporters too
    assert bare.pad_token is None
    last = callback.history[-1]
    assert callback.headline == "min_k_pp" and last["memlens/auc"] == last["memlens/auc/min_k_pp"]
    assert not math.isnan(last["memlens/auc/min_k_pp"])  # the moments were computed for it


# ------------------------------------------------------------------------------------- canaries, as the audit reads
def _tiny():
    tokenizer = AutoTokenizer.from_pretrained(LLAMA_TINY)
    return AutoModelForCausalLM.from_pretrained(LLAMA_TINY, dtype=torch.float32), tokenizer


def test_held_out_twins_are_kept_apart_and_exposure_is_over_inserted_canaries(records):
    members, non_members = records
    twin = {"id": "twin", "text": "Patient MRN 5930114482 was given 40 mg of the study drug and developed a rash.",
            "secret": "5930114482", "inserted": False}
    inserted = {**CANARY, "inserted": True}
    with pytest.raises(ConfigError, match=r"canary 0: `inserted` is missing"):  # as in a file: every row says
        MemlensCallback(members=members, non_members=non_members, canaries=[CANARY, twin])
    callback = MemlensCallback(members=members, non_members=non_members, canaries=[inserted, twin],
                               exposure_candidates=20, attacks=["loss"])
    assert [c.sample_id for c in callback.canaries] == ["mrn"]  # exposure: the inserted canary only
    assert callback.canary_labels.tolist() == [True, False] and callback.canary_texts[1] == twin["text"]
    model, tokenizer = _tiny()
    metrics = callback.evaluate(model, tokenizer)
    assert "memlens/canary_exposure/twin" not in metrics and "memlens/canary_exposure" in metrics
    assert metrics["memlens/canary_auc"] in (0.0, 1.0)  # one inserted against one twin
    assert "memlens/canary_tpr_at_10pct_fpr" not in metrics  # one twin sets no threshold
    # a held-out twin among the members, an inserted canary among the non-members: refused, as the audit does
    with pytest.raises(ConfigError, match="held-out canaries and the members"):
        MemlensCallback(members=[*members, twin["text"]], non_members=non_members, canaries=[inserted, twin])
    with pytest.raises(ConfigError, match=r"canaries: \['canary-1'\] have no `secret` and no canary is held out"):
        MemlensCallback(members=members, non_members=non_members, canaries=[CANARY, {"text": "no secret here"}])
    with pytest.raises(ConfigError, match=r"`inserted` is 'yes'"):
        MemlensCallback(members=members, non_members=non_members, canaries=[{**twin, "inserted": "yes"}])


def test_a_memaudit_manifest_is_read_through_the_audits_reader(records, tmp_path):
    from .test_user_canaries import _manifest, _memaudit_entry

    members, non_members = records
    entries = [_memaudit_entry(i, True, 4) for i in range(3)] + [_memaudit_entry(i, False, 4) for i in range(3, 13)]
    (tmp_path / "memaudit-manifest.json").write_text(json.dumps(_manifest(entries)))
    callback = MemlensCallback(members=members, non_members=non_members, canaries=str(tmp_path), attacks=["loss"])
    assert callback.canary_file.kind == "memaudit" and callback.canaries == []  # token secrets: no exposure
    assert callback.canary_labels.sum() == 3 and len(callback.canary_texts) == 13
    metrics = callback.evaluate(*_tiny())
    assert 0 <= metrics["memlens/canary_auc"] <= 1 and 0 <= metrics["memlens/canary_tpr_at_10pct_fpr"] <= 1
    assert "memlens/canary_exposure" not in metrics


def test_scores_are_cut_to_max_length_with_the_studys_stride(records, monkeypatch):
    from memlens import integrations

    members, non_members = records
    seen = {}
    original = integrations.token_stats

    def spy(model, sequences, **kwargs):
        seen.update(lengths=[len(s) for s in sequences], stride=kwargs.get("stride"))
        return original(model, sequences, **kwargs)

    monkeypatch.setattr(integrations, "token_stats", spy)
    callback = MemlensCallback(members=members, non_members=non_members, max_length=12, attacks=["loss"])
    callback.evaluate(*_tiny())
    assert max(seen["lengths"]) == 12 and seen["stride"] == MIAConfig().stride
    uncut = MemlensCallback(members=members, non_members=non_members, attacks=["loss"])
    uncut.evaluate(*_tiny())
    assert max(seen["lengths"]) > 12


def test_only_the_tprs_its_records_can_estimate_are_logged_said_once(records, caplog):
    members, non_members = records
    with caplog.at_level("WARNING", logger="memlens.integrations"):
        callback = MemlensCallback(members=members, non_members=non_members, attacks=["loss"])
    said = [r.getMessage() for r in caplog.records if "not logged" in r.getMessage()]
    assert len(said) == 1 and "memlens/tpr_at_1pct_fpr (needs 100 non-members)" in said[0]
    assert list(callback.fpr_points) == ["10pct"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="memlens.integrations"):
        metrics = callback.evaluate(*_tiny())
        callback.evaluate(*_tiny())
    assert not any("not logged" in r.getMessage() or "NaN" in r.getMessage() for r in caplog.records)
    assert all(not math.isnan(v) for k, v in metrics.items() if "tpr" in k)


def test_the_callbacks_attack_check_is_the_registrys():
    from memlens.attacks.registry import check_available

    with pytest.raises(ConfigError, match=r"somewhere: 'lira' needs reference adapters.*, which a place cannot give"):
        check_available(["lira"], frozenset({"ref"}), "somewhere", "a place")
    assert [a.name for a in check_available(["loss", "min_k@0.3"], frozenset(), "w", "p")] == ["loss", "min_k@0.3"]
