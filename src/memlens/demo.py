"""`memlens demo`: a complete small study that downloads nothing and shows memorization.

With the project's shared fixtures present (`../shared`, or `$MEMLENS_SHARED`) it uses PHEE and the
pretrained llama-tiny. Otherwise it builds everything in `<out>-assets/`: a synthetic clinical-note dataset
(train / test / dev splits plus a disjoint pretraining corpus), a byte-level BPE tokenizer (`tokenizers`,
one token per digit), and a tiny Llama pretrained for 200 steps on the pretraining corpus. Every note
carries values drawn independently per note (a medical record number, a date, an age, a dose, a day
count), so the base model knows the language and the format of the notes but cannot know a record's
values: what a fine-tune learns of them is memorization.

Both paths run the same grid under the random membership design (a seeded coin per record of the train
split: members and non-members are exchangeable but for training), with a recipe where memorization is
measurable within a few minutes on two CPU cores: about 64 members, small batches, a high learning rate,
several epochs (20 on the synthetic notes, 3 on PHEE, which llama-tiny never saw).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from memlens.config import DEFAULT_MIA_ATTACKS, StudyConfig, load_study
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
    ("Patient MRN {mrn}, seen {date}: a {age}-year-old {sex} with {condition} developed {event} {days} days after "
     "starting {drug} {dose} mg daily."),
    ("Patient MRN {mrn} ({date}): a {age}-year-old {sex} treated with {drug} {dose} mg for {condition} presented "
     "with {event} on day {days}."),
    ("Patient MRN {mrn}, reported {date}: {event} occurred in a {age}-year-old {sex} receiving {dose} mg of {drug} "
     "for {condition}."),
    ("Patient MRN {mrn}, admitted {date}: after {days} days of {drug} {dose} mg for {condition}, a {age}-year-old "
     "{sex} had {event}."),
    ("Patient MRN {mrn} ({date}): a {sex} aged {age} on {drug} {dose} mg for {condition} developed {event}; the "
     "drug was withdrawn on day {days}."),
    ("Patient MRN {mrn}, seen {date}: {drug}-induced {event_bare} in a {age}-year-old {sex} with {condition}, "
     "{dose} mg for {days} days."),
]


def synthetic_notes(n: int, seed: int) -> list[str]:
    """`n` distinct synthetic adverse-drug-event case notes (PHEE-like), seeded.

    Besides a template, a drug, an event and a condition (words the base model learns to expect), every note
    carries values drawn independently and uniformly per note: a 10-digit medical record number (the format
    of the inserted canary's secret), a date, an age, a dose with one decimal and a day count (about 70 bits).
    A model can learn their format from other notes but can only know a note's own values by having trained
    on it: that is what a membership attack measures."""
    rng = np.random.default_rng(seed)
    notes: dict[str, None] = {}
    while len(notes) < n:
        event = _EVENTS[rng.integers(len(_EVENTS))]
        date = f"{rng.integers(2005, 2025)}-{rng.integers(1, 13):02d}-{rng.integers(1, 29):02d}"
        text = _TEMPLATES[rng.integers(len(_TEMPLATES))].format(
            mrn="".join(str(d) for d in rng.integers(0, 10, size=10)), date=date, age=int(rng.integers(18, 90)),
            sex=["man", "woman"][rng.integers(2)], condition=_CONDITIONS[rng.integers(len(_CONDITIONS))],
            event=event, event_bare=event.removeprefix("a "),
            drug=_DRUGS[rng.integers(len(_DRUGS))], dose=f"{rng.integers(5, 5000) / 10:.1f}",
            days=int(rng.integers(2, 60)))
        notes.setdefault(re.sub(r"\ba (8\d|11|18)-year", r"an \1-year", text))
    return list(notes)


# train is the random design's pool (a coin per record makes about half of it members), test the non-member
# split of the `splits` design (unused by the demo), dev the utility split; then the pretraining corpus
_SPLITS = {"train": 512, "test": 256, "dev": 256}
_CORPUS = 3000


def _notes(splits: dict[str, int] = _SPLITS, corpus: int = _CORPUS) -> tuple[dict[str, list[str]], list[str]]:
    """The splits' notes and the pretraining corpus: one seeded draw, so no corpus note is a record."""
    notes = synthetic_notes(sum(splits.values()) + corpus, seed=0)
    drawn, start = {}, 0
    for name, size in splits.items():
        drawn[name], start = notes[start:start + size], start + size
    return drawn, notes[start:]


def canary_template() -> str:
    """The synthetic demo's canary: one more note of the same generator (not a record: its own seed), whose
    medical record number is the secret. The base model knows the format of an MRN from the pretraining
    corpus, not which 10 digits this patient has; how many copies of the note the fine-tune sees is the
    grid's `canary_copies`."""
    note = synthetic_notes(1, seed=1)[0]
    return re.sub(r"MRN \d{10}", "MRN {secret}", note, count=1)


def _write_dataset(folder: Path) -> None:
    for name, texts in _notes()[0].items():
        lines = [json.dumps({"id": f"{name}-{i}", "context": t}) for i, t in enumerate(texts)]
        (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n")


# PHEE's splits (records per split); its sentences, unlike the demo's notes, do not all open on a patient's record
# number (about 30% mention a patient), vary in length and in words, and a few repeat within a split
PHEE_SPLITS = {"train": 2898, "test": 968, "dev": 961}
_PREFIX = re.compile(r"^Patient MRN \d{10}(?:, (?:seen|reported|admitted) [\d-]+: | \([\d-]+\): )")
_FOLLOW_UPS = [
    "The reaction resolved after the drug was discontinued.", "Rechallenge was not attempted.",
    "Serum concentrations were within the therapeutic range.", "No other cause was identified on workup.",
    "Symptoms recurred when treatment was resumed at a lower dose.", "Biopsy findings supported a drug reaction.",
    "The patient recovered fully within two weeks.", "Naranjo scoring indicated a probable association.",
    "Concomitant medications included aspirin and omeprazole.", "Renal function returned to baseline.",
    "Eosinophilia was noted on the blood count.", "Corticosteroids were given with rapid improvement.",
    "Clinicians should monitor liver enzymes during therapy.", "A similar case has been described previously.",
    "Genetic testing revealed a slow metabolizer phenotype.", "Hospital stay was prolonged by nine days.",
]


def _phee_style(note: str, rng: np.random.Generator) -> str:
    """A note as one of PHEE's sentences might read: half lose their record-number opening, 40% gain a follow-up
    sentence."""
    if rng.random() < 0.5:
        rest = _PREFIX.sub("", note)
        note = rest[:1].upper() + rest[1:]
    if rng.random() < 0.4:
        note = f"{note} {_FOLLOW_UPS[rng.integers(len(_FOLLOW_UPS))]}"
    return note


def write_phee_shaped(folder: Path, splits: dict[str, int] = PHEE_SPLITS, corpus: int = _CORPUS,
                      seed: int = 0) -> list[str]:
    """Synthetic notes in PHEE's layout under `folder`: `<split>.jsonl`, one `{"id", "context"}` per line, the
    id `<doc>_<n>` (a document number and the note's number in it, as PHEE's PubMed id and sentence number;
    1 to 4 notes per document, documents never span splits), styled as PHEE's sentences (`_phee_style`), the
    last record of train and of dev an exact repeat of the first (as PHEE has). Returns the pretraining corpus
    drawn with the notes, in the same style (disjoint from them), for `build_tokenizer` and `pretrain_model`."""
    rng = np.random.default_rng(seed)
    drawn, pretraining = _notes(splits, corpus)
    doc = 10_000_000
    for name, texts in drawn.items():
        texts = [_phee_style(t, rng) for t in texts]
        if name in ("train", "dev"):
            texts[-1] = texts[0]
        lines, i = [], 0
        while i < len(texts):
            doc += int(rng.integers(1, 1000))
            for n in range(1, min(int(rng.integers(1, 5)), len(texts) - i) + 1):
                lines.append(json.dumps({"id": f"{doc}_{n}", "context": texts[i]}))
                i += 1
        (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return [_phee_style(t, rng) for t in pretraining]


def build_tokenizer(corpus: list[str], folder: Path, vocab_size: int = 1024, max_length: int = 128,
                    extra: Sequence[str] = ()):
    """A byte-level BPE tokenizer trained on `corpus` (and `extra` texts), saved to `folder` and returned: `<s>`
    prepended, `</s>` and `<pad>`, one token per digit."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # one token per digit: a number's digits are predicted one at a time, as the random values of the notes
    # and the canary's secret are drawn
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([*corpus, *extra], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=max_length)
    fast.save_pretrained(str(folder))
    return fast


def tiny_llama_config(tokenizer, hidden: int = 128, layers: int = 2, heads: int = 4, intermediate: int | None = None,
                      positions: int = 128):
    """A small Llama's configuration for `tokenizer` (tied embeddings; the MLP 8/3 of the width by default)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden,
                       intermediate_size=intermediate or hidden * 8 // 3, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=positions,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)


def pretrain_model(config, corpus: list[str], tokenizer, folder: Path, steps: int = 200, seed: int = 0,
                   lr: float = 3e-3, batch_size: int = 32, save_dtype=None) -> None:
    """A causal LM of `config` trained from random init on `corpus` (plain loop; AdamW, one cycle of `lr`),
    saved to `folder` as safetensors (in `save_dtype`, e.g. torch.float16, when given) with a
    `pretraining.json` of its recipe and final loss. `steps=0` saves the random init."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    loss = None
    if steps:
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
        rng = np.random.default_rng(seed)
        model.train()
        for _ in range(steps):
            batch = [corpus[i] for i in rng.integers(0, len(corpus), size=batch_size)]
            enc = tokenizer(batch, padding=True, return_tensors="pt", return_token_type_ids=False)
            labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
            loss = model(**enc, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step(), schedule.step(), optimizer.zero_grad()
    model.eval()
    if save_dtype is not None:
        model.to(save_dtype)
    model.save_pretrained(str(folder), safe_serialization=True)
    (folder / "pretraining.json").write_text(json.dumps({
        "steps": steps, "final_loss": None if loss is None else loss.item(), "seed": seed, "corpus": len(corpus),
        "architecture": config.model_type, "hidden": config.hidden_size, "layers": config.num_hidden_layers}))


def build_synthetic_assets(root: Path) -> tuple[Path, Path]:
    """Synthetic data folder and tiny pretrained model under `root` (built once, atomically)."""
    data_dir, model_dir = root / "data", root / "model"
    if not data_dir.is_dir():
        with atomic_dir(data_dir) as tmp:
            _write_dataset(tmp)
    if not model_dir.is_dir():
        corpus = _notes()[1]
        with atomic_dir(model_dir) as tmp:
            tokenizer = build_tokenizer(corpus, tmp)
            # about 10 s on 2 cores; about 2 epochs of the corpus: the loss reaches the notes' own entropy (their
            # random values), so the base model has learned their language and formats and has nothing left to
            # learn but the values
            pretrain_model(tiny_llama_config(tokenizer), corpus, tokenizer, tmp)
    return data_dir, model_dir


# --------------------------------------------------------------------------------------- study
# The recipe of each path: (data, train) settings on top of the common ones below. Records: `subset` x 2
# drawn from train, about half of them members. Chosen for the regime, not for any finding: memorization
# measurable (AUC clearly above chance) but not saturated, within the time budget.
_SHARED_RECIPE = ({"group": r"^(\d+)_", "subset": 64}, {"epochs": 3, "batch_size": 4, "learning_rate": 1e-2})
_SYNTHETIC_RECIPE = ({"subset": 64}, {"epochs": 20, "batch_size": 4, "learning_rate": 1e-2})


def demo_study(out: Path, shared: Path | None = None, overrides: list[str] | None = None) -> StudyConfig:
    """The demo's study: [q] vs [v] at ranks 1, 4, 16, an inserted secret once or 16 times, members drawn by
    a seeded coin per record (the random design; PHEE records keep their abstract as `data.group` for the
    bag-of-words check)."""
    out = Path(out).resolve()
    canary = {"mode": "insert", "secret_format": "digits:10"}
    if shared is not None:
        data, model = shared / "data/phee", shared / "models/llama-tiny"
        data_cfg, train = _SHARED_RECIPE
    else:
        data, model = build_synthetic_assets(out.parent / f"{out.name}-assets")
        data_cfg, train = _SYNTHETIC_RECIPE
        canary["template"] = canary_template()
    raw = {
        "name": "demo",
        "out": str(out),
        "data": {"source": str(data), "membership": "random", "pool": ["train"], "membership_unit": "record",
                 "max_length": 128, **data_cfg},
        "model": {"name_or_path": str(model), "device": "cpu"},
        "grid": DEMO_GRID,
        "canary": canary,
        "train": {"grad_accum": 1, "warmup_steps": 2, "logging_steps": 10, **train},
        # the learned attack beside the default ones (on PHEE its shipped weights saw the records, and its rows say so)
        "mia": {"bootstrap": 200, "attacks": [*DEFAULT_MIA_ATTACKS, "learned"]},
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


__all__ = ["PHEE_SPLITS", "build_synthetic_assets", "build_tokenizer", "canary_template", "demo_study", "find_shared",
           "pretrain_model", "run_demo", "synthetic_notes", "tiny_llama_config", "write_phee_shaped"]
