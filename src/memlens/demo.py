"""`memlens demo`: a complete small study that downloads nothing.

With the project's shared fixtures present (`../shared`, or `$MEMLENS_SHARED`) it uses PHEE and the
pretrained llama-tiny. Otherwise it builds everything here, in `<out>/assets/`: a synthetic
clinical-note dataset (train / test / dev splits plus a disjoint pretraining corpus), a byte-level BPE
tokenizer (`tokenizers`), and a tiny Llama pretrained for a few hundred steps on the pretraining
corpus, so the base model knows the language of the notes but none of the member records.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from memlens.config import StudyConfig, load_study
from memlens.runner import run_study
from memlens.store import atomic_dir

DEMO_GRID = {"target_modules": [["q"], ["v"]], "rank": [1, 4, 16], "canary_copies": [1, 16], "seed": [0]}


def find_shared() -> Path | None:
    """The shared fixtures folder, if this checkout has one."""
    candidates = [os.environ.get("MEMLENS_SHARED"), Path.cwd().parent / "shared",
                  Path(__file__).resolve().parents[2].parent / "shared"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "data/phee/train.jsonl").exists() and \
                (Path(candidate) / "models/llama-tiny/config.json").exists():
            return Path(candidate).resolve()
    return None


# --------------------------------------------------------------------------------------- synthetic data
_DRUGS = ["amoxicillin", "warfarin", "metformin", "lisinopril", "atorvastatin", "ibuprofen", "cisplatin",
          "vancomycin", "carbamazepine", "lithium", "methotrexate", "amiodarone", "clozapine", "heparin",
          "prednisone", "digoxin", "phenytoin", "tacrolimus", "allopurinol", "isoniazid"]
_EVENTS = ["a maculopapular rash", "acute kidney injury", "severe hepatotoxicity", "agranulocytosis",
           "QT prolongation", "Stevens-Johnson syndrome", "lactic acidosis", "angioedema", "rhabdomyolysis",
           "hyponatremia", "thrombocytopenia", "interstitial pneumonitis", "a seizure", "bradycardia",
           "pancreatitis", "ototoxicity"]
_CONDITIONS = ["type 2 diabetes", "atrial fibrillation", "hypertension", "epilepsy", "bipolar disorder",
               "rheumatoid arthritis", "tuberculosis", "gout", "heart failure", "schizophrenia", "pneumonia",
               "a kidney transplant", "osteomyelitis", "non-small cell lung cancer"]
_TEMPLATES = [
    "A {age}-year-old {sex} with {condition} developed {event} {days} days after starting {drug} {dose} mg daily.",
    "We report a {age}-year-old {sex} treated with {drug} for {condition} who presented with {event}.",
    "{event_cap} occurred in a {age}-year-old {sex} receiving {dose} mg of {drug} for {condition}.",
    "After {days} days of {drug} therapy for {condition}, a {age}-year-old {sex} was admitted with {event}.",
    "A {sex} aged {age} on {drug} {dose} mg for {condition} developed {event}; the drug was withdrawn.",
    "{drug_cap}-induced {event_bare} was diagnosed in a {age}-year-old {sex} with {condition} after {days} days.",
]


def synthetic_notes(n: int, seed: int) -> list[str]:
    """`n` distinct synthetic adverse-drug-event case sentences (PHEE-like), seeded."""
    rng = np.random.default_rng(seed)
    notes: dict[str, None] = {}
    while len(notes) < n:
        event = _EVENTS[rng.integers(len(_EVENTS))]
        drug = _DRUGS[rng.integers(len(_DRUGS))]
        bare = event[2:] if event.startswith("a ") else event
        text = _TEMPLATES[rng.integers(len(_TEMPLATES))].format(
            age=int(rng.integers(18, 90)), sex=["man", "woman"][rng.integers(2)],
            condition=_CONDITIONS[rng.integers(len(_CONDITIONS))], event=event, event_cap=event[0].upper() + event[1:],
            event_bare=bare, drug=drug, drug_cap=drug.capitalize(), dose=int(rng.choice([5, 10, 20, 50, 100, 250, 500])),
            days=int(rng.integers(2, 60)))
        notes.setdefault(text)
    return list(notes)


def _write_dataset(folder: Path, seed: int = 0) -> list[str]:
    """train/test/dev jsonl (300/300/300) and a disjoint pretraining corpus; returns the corpus."""
    notes = synthetic_notes(900 + 3000, seed)
    splits = {"train": notes[:300], "test": notes[300:600], "dev": notes[600:900]}
    for name, texts in splits.items():
        lines = [json.dumps({"id": f"{name}-{i}", "context": t}) for i, t in enumerate(texts)]
        (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return notes[900:]


def _build_tokenizer(corpus: list[str], folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=128)
    fast.save_pretrained(str(folder))
    return fast


def _pretrain_model(corpus: list[str], tokenizer, folder: Path, steps: int = 200, seed: int = 0) -> None:
    """A 2-layer Llama trained from random init on the pretraining corpus (plain loop: a few seconds)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=96, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    rng = np.random.default_rng(seed)
    model.train()
    for _ in range(steps):
        batch = [corpus[i] for i in rng.integers(0, len(corpus), size=32)]
        enc = tokenizer(batch, padding=True, return_tensors="pt")
        labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step(), schedule.step(), optimizer.zero_grad()
    model.eval()
    model.save_pretrained(str(folder), safe_serialization=True)
    (folder / "pretraining.json").write_text(json.dumps({"steps": steps, "final_loss": loss.item(), "seed": seed}))


def build_synthetic_assets(root: Path) -> tuple[Path, Path]:
    """Synthetic data folder and tiny pretrained model under `root` (built once, atomically)."""
    data_dir, model_dir = root / "data", root / "model"
    if not data_dir.is_dir():
        with atomic_dir(data_dir) as tmp:
            _write_dataset(tmp)
    if not model_dir.is_dir():
        corpus = synthetic_notes(900 + 3000, 0)[900:]
        with atomic_dir(model_dir) as tmp:
            tokenizer = _build_tokenizer(corpus, tmp)
            _pretrain_model(corpus, tokenizer, tmp)
    return data_dir, model_dir


# --------------------------------------------------------------------------------------- study
def demo_study(out: Path, shared: Path | None = None, overrides: list[str] | None = None) -> StudyConfig:
    """The demo's study: [q] vs [v] at ranks 1, 4, 16, an inserted secret once or 16 times."""
    out = Path(out).resolve()
    if shared is not None:
        data, model, subset = shared / "data/phee", shared / "models/llama-tiny", 128
    else:
        data, model = build_synthetic_assets(out.parent / f"{out.name}-assets")
        subset = 128
    raw = {
        "name": "demo",
        "out": str(out),
        "data": {"source": str(data), "subset": subset, "max_length": 128},
        "model": {"name_or_path": str(model), "device": "cpu"},
        "grid": DEMO_GRID,
        "canary": {"mode": "insert"},
        "train": {"epochs": 3, "batch_size": 16, "grad_accum": 1, "warmup_steps": 2, "learning_rate": 3e-3,
                  "logging_steps": 2},
        "mia": {"bootstrap": 200},
        "extraction": {"members": 24, "non_members": 24, "exposure_candidates": 500},
    }
    return load_study(raw=raw, overrides=overrides)


def run_demo(out: Path = Path("memlens-out/demo"), show_progress: bool = True, synthetic: bool = False,
             overrides: list[str] | None = None):
    """Run the demo study into `out` and write its report; returns the run's StudySummary.
    `synthetic`: build the data and model here even when the shared fixtures exist; `overrides`:
    `key=value` changes to the demo study (as `--set`)."""
    study = demo_study(out, None if synthetic else find_shared(), overrides)
    return run_study(study, show_progress=show_progress)


__all__ = ["build_synthetic_assets", "demo_study", "find_shared", "run_demo", "synthetic_notes"]
