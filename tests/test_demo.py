"""`memlens demo` on a fresh machine: it builds its own data, tokenizer and model, then runs a study that
shows memorization (issue #17)."""

from __future__ import annotations

import json
import re
import warnings

import pandas as pd
from typer.testing import CliRunner

from memlens.cli import app
from memlens.data import load_study_data
from memlens.demo import _notes, canary_template, demo_study, find_shared, synthetic_notes


def test_synthetic_notes_are_seeded_and_distinct():
    notes = synthetic_notes(500, seed=3)
    assert notes == synthetic_notes(500, seed=3) and len(set(notes)) == 500
    assert notes != synthetic_notes(500, seed=4)


def test_every_note_carries_its_own_values_and_the_canary_is_a_note():
    splits, corpus = _notes()
    records = [t for texts in splits.values() for t in texts]
    assert not set(records) & set(corpus)  # the pretraining corpus holds none of the records
    mrns = [re.match(r"Patient MRN (\d{10})\b", t).group(1) for t in records + corpus]
    assert len(set(mrns)) == len(mrns)  # a value drawn per note: the corpus cannot predict a record's
    template = canary_template()
    assert template.startswith("Patient MRN {secret}") and template.format(secret="0" * 10) not in records + corpus


def test_demo_uses_the_shared_fixtures_when_present(tmp_path):
    shared = find_shared()
    assert shared is not None  # this checkout has ../shared
    study = demo_study(tmp_path / "demo", shared)
    assert study.model.name_or_path.endswith("llama-tiny") and len(study.cells()) == 12
    data = study.data
    assert data.membership == ["random"] and data.pool_splits == ["train"] and data.coin_unit == "record"
    assert data.group == r"^(\d+)_"  # PHEE's abstracts, for the bag-of-words check's grouped folds


def test_synthetic_demo_runs_a_whole_study(tmp_path):
    out = tmp_path / "demo"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = CliRunner().invoke(app, [
            "demo", "--synthetic", "--out", str(out), "--no-progress",
            "--set", "grid.target_modules=[[q]]", "--set", "grid.rank=[4]", "--set", "grid.canary_copies=[16]",
            "--set", "extraction.members=4", "--set", "extraction.non_members=4",
            "--set", "extraction.exposure_candidates=100", "--set", "mia.bootstrap=20",
        ])
    assert result.exit_code == 0, result.output
    # a quiet console: no warning a user would have to learn to ignore (building the model included)
    shown = [f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}" for w in caught
             if not issubclass(w.category, DeprecationWarning)]
    assert not shown, shown
    assets = tmp_path / "demo-assets"
    assert (assets / "model" / "model.safetensors").exists() and (assets / "model" / "tokenizer.json").exists()
    assert json.loads((assets / "model" / "pretraining.json").read_text())["steps"] > 0
    report = out / "report" / "index.html"
    assert f"report: {report}" in result.output and report.exists()
    study = demo_study(out)  # the assets now exist: same study, nothing rebuilt
    data = load_study_data(study.data)
    assert not set(data.members.text) & set(data.non_members.text)
    results = pd.read_parquet(out / "results.parquet")
    assert {"mia", "utility", "extraction", "exposure"} <= set(results.stage)
    assert results[results.stage == "mia"].auc.between(0, 1).all()
    # it demonstrates (issue #17), on this one cell too ([q] r4, 16 copies; measured: AUC 0.84, interval
    # 0.78-0.91; members' NLL 1.049 vs 1.065; exposure 15.6 vs 3.8 bits): membership is detected beyond
    # chance, the fine-tuned model knows its members better than the base model, and the repeated secret
    # is exposed far beyond the base model's own guess. Every draw is seeded: the margins are not luck.
    primary = results[(results.stage == "mia") & (results.attack == "ref_ratio")].iloc[0]
    assert primary.auc_ci_low > 0.5, primary[["auc", "auc_ci_low", "auc_ci_high"]]
    scores = pd.read_parquet(out / "mia_scores.parquet")
    members = scores[scores.is_member & ~scores.is_canary]
    assert members.nll_ft.mean() < members.nll_ref.mean()
    exposure = results[results.stage == "exposure"].set_index("attack").exposure_skewnorm
    assert exposure["exposure"] > exposure["exposure:base"] + 3, exposure
