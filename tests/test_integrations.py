"""MemlensCallback inside a real transformers Trainer on llama-tiny: its metrics reach the logs the reporting
callbacks see, agree with memlens' own scoring of the saved adapter, leave the training mode as it was, and
stop training above a threshold."""

from __future__ import annotations

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
from memlens.config import ConfigError
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
    assert {"memlens/auc", "memlens/tpr_at_1pct_fpr", "memlens/auc/loss", "memlens/auc/ref_ratio",
            "memlens/canary_exposure"} <= set(last)
    assert last["memlens/auc"] == last["memlens/auc/ref_ratio"]  # the primary attack, the base as reference
    assert math.isnan(last["memlens/tpr_at_1pct_fpr"])  # 16 non-members: not estimable, not 0
    assert any("memlens/auc" in entry for entry in trainer.state.log_history)
    # the same number as memlens' own scoring of the saved adapter (base = the adapter disabled)
    model.save_pretrained(str(tmp_path / "adapter"))
    _, results = attack_models(LLAMA_TINY, {"cb": tmp_path / "adapter"}, members, non_members,
                               mia={"attacks": ["ref_ratio", "loss"], "bootstrap": 0, "bag_of_words_baseline": False},
                               show_progress=False)
    auc = results[results.stage == "mia"].set_index("attack").auc
    assert last["memlens/auc/ref_ratio"] == pytest.approx(auc["ref_ratio"], abs=1e-6)
    assert last["memlens/auc/loss"] == pytest.approx(auc["loss"], abs=1e-6)
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
